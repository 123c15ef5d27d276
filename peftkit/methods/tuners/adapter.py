"""What every weight adapter shares: targeting, wrapping, PEFT file keys, merging, freezing.

A method subclasses :class:`WeightAdapter` and supplies only its maths:

- :meth:`~WeightAdapter.build_parts`: the per-layer tensors (``{"lora_A": nn.Linear(...), ...}``),
  initialised as the config says;
- :meth:`~WeightAdapter.delta` and :meth:`~WeightAdapter.delta_weight` for additive methods, or
  ``transform_input`` / ``transform_output`` / ``merged_tensors`` / ``unmerged_tensors`` for others.

Parts live on the wrapped layer as ``layer.<slot>[adapter_name]``, so a part's key in the model is
``<module path>.<slot>.<adapter>[.<param>]`` and its key in PEFT's ``adapter_model.safetensors`` is
``base_model.model.<module path>.<slot>[.<param>]``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.methods.base import ModelInputs, ParameterOwner
from peftkit.methods.tuners.layer import AdaptedLayer, add_to_rows, base_of, dense_weight, unwrap, wrap
from peftkit.methods.tuners.targeting import LINEAR_TYPES, default_targets, find_saved_modules, find_targets

if TYPE_CHECKING:
    from peftkit.methods.tuners.config import TunerConfig
    from peftkit.models.peft_model import PeftModel

PREFIX = "base_model.model."


class WeightAdapter(ParameterOwner):
    """Base class of the weight adapters (LoRA, IA³, AdaLoRA, LoHa, LoKr, OFT, BOFT, VeRA).

    Follows :class:`~peftkit.methods.base.Adapter`, :class:`~peftkit.methods.base.Mergeable` and
    :class:`~peftkit.methods.base.Trainable`; each instance is also the
    :class:`~peftkit.methods.tuners.layer.LayerPart` of every layer it wraps.
    """

    config: TunerConfig
    #: Module types the method wraps.
    supported_types: ClassVar[tuple[type[nn.Module], ...]] = LINEAR_TYPES
    #: Which PEFT default table ``target_modules=None`` reads.
    default_targets_table: ClassVar[str] = "lora"
    #: PEFT's spelling of "train the biases of adapted layers" for the ``bias`` field (e.g. ``"lora_only"``).
    bias_only: ClassVar[str | None] = None

    def __init__(self, config: TunerConfig, adapter_name: str) -> None:
        self.config = config
        self.name = adapter_name
        self.parts: dict[str, dict[str, nn.Module | nn.Parameter]] = {}
        self.saved: dict[str, SavedModule] = {}
        self.biases: list[nn.Parameter] = []
        self.model: nn.Module | None = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, base_model: nn.Module, config: TunerConfig, adapter_name: str = "default", **context: Any):
        """Find the targets, build and initialise the parts (not yet placed on the model: see :meth:`attach`)."""
        config = cls.resolve_config(base_model, config)
        adapter = cls(config, adapter_name)
        adapter.model = base_model
        paths = find_targets(base_model, config, cls.supported_types)
        modules = {path: base_of(base_model.get_submodule(path)) for path in paths}
        adapter.prepare(modules)
        for path, module in modules.items():
            weight = dense_weight(module)
            parts = adapter.build_parts(path, module)
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            adapter.parts[path] = {k: _moved(v, weight.device, dtype) for k, v in parts.items()}
        for path in find_saved_modules(base_model, config.modules_to_save):
            original = base_of(base_model.get_submodule(path))
            adapter.saved[path] = SavedModule(copy.deepcopy(original).requires_grad_(True))
        adapter.biases = adapter._trainable_biases(base_model, modules)
        return adapter

    @classmethod
    def resolve_config(cls, base_model: nn.Module, config: TunerConfig) -> TunerConfig:
        """A copy with defaults that depend on the model filled in (as PEFT writes them to the file)."""
        updates: dict[str, Any] = {}
        if config.target_modules is None:
            updates["target_modules"] = default_targets(base_model, cls.default_targets_table)
        if "fan_in_fan_out" in type(config).model_fields:
            probe = config.model_copy(update=updates)
            paths = find_targets(base_model, probe, cls.supported_types)
            updates["fan_in_fan_out"] = any(
                type(base_of(base_model.get_submodule(p))).__name__ == "Conv1D" for p in paths
            )
        return config.model_copy(update=updates) if updates else config

    def prepare(self, modules: dict[str, nn.Module]) -> None:
        """Hook before the parts are built (VeRA builds its shared projections here)."""

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """The adapter's tensors for one target (``module`` is the base Linear / Conv1D)."""
        raise NotImplementedError

    def _trainable_biases(self, base_model: nn.Module, modules: dict[str, nn.Module]) -> list[nn.Parameter]:
        mode = getattr(self.config, "bias", "none")
        if mode == "all":
            return [p for name, p in base_parameters(base_model) if name.endswith("bias")]
        if mode == self.bias_only:
            return [m.bias for m in modules.values() if getattr(m, "bias", None) is not None]
        return []

    # ------------------------------------------------------------------ Adapter protocol
    def attach(self, model: PeftModel, adapter_name: str) -> None:
        """Wrap the target layers of ``model.base_model`` and register the parts on them."""
        if adapter_name != self.name:
            raise ValueError(f"adapter was created as {self.name!r}, not {adapter_name!r}")
        base = model.base_model
        for path, parts in self.parts.items():
            layer = wrap(base, path, model.routing)
            for slot, value in parts.items():
                layer.add_part(slot, adapter_name, value)
            layer.parts[adapter_name] = self
        for path, saved in self.saved.items():
            layer = wrap(base, path, model.routing)
            layer.add_part("modules_to_save", adapter_name, saved.module)
            layer.parts[adapter_name] = saved
        for param in self.biases:
            param.requires_grad_(True)

    def detach(self, model: PeftModel, adapter_name: str) -> None:
        """Remove the parts; a layer left without adapters is unwrapped (its weights as they are now)."""
        base = model.base_model
        for path in [*self.parts, *self.saved]:
            layer = base.get_submodule(path)
            if isinstance(layer, AdaptedLayer):
                layer.remove_parts(adapter_name)
                if not layer.parts:
                    unwrap(base, path)
        for param in self.biases:
            param.requires_grad_(False)

    def prepare_inputs(self, inputs: ModelInputs, rows: Tensor) -> ModelInputs:
        """Weight adapters act inside the layers: the batch passes unchanged."""
        return inputs

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for parts in self.parts.values():
            for value in parts.values():
                yield from [value] if isinstance(value, nn.Parameter) else value.parameters()
        for saved in self.saved.values():
            yield from saved.module.parameters()
        yield from self.biases

    # ------------------------------------------------------------------ files
    def named_tensors(self) -> dict[str, Tensor]:
        """PEFT file key → the live tensor (parameter or buffer) it is read from and written to."""
        tensors: dict[str, Tensor] = {}
        for path, parts in self.parts.items():
            for slot, value in parts.items():
                if isinstance(value, nn.Parameter):
                    tensors[f"{PREFIX}{path}.{slot}"] = value
                else:
                    for name, param in value.named_parameters():
                        tensors[f"{PREFIX}{path}.{slot}.{name}"] = param
        for path, saved in self.saved.items():
            for name, param in saved.module.named_parameters():
                tensors[f"{PREFIX}{path}.{name}"] = param
        if self.biases and self.model is not None:
            wanted = {id(p) for p in self.biases}
            for name, param in base_parameters(self.model):
                if id(param) in wanted:
                    tensors[f"{PREFIX}{name}"] = param
        return tensors

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """PEFT file key → tensor, each contiguous and owning its memory (safetensors refuses shared tensors,
        which tied layers have)."""
        seen: set[int] = set()
        tensors = {}
        for key, value in self.named_tensors().items():
            value = value.detach()
            pointer = value.untyped_storage().data_ptr()
            tensors[key] = value.clone() if pointer in seen or not value.is_contiguous() else value
            seen.add(pointer)
        return tensors

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        """Copy PEFT-format tensors in. Keys missing ``base_model.model.`` are read under the full key;
        any key left unmatched, or missing, or of the wrong shape is an error (nothing stays at init)."""
        live = self.named_tensors()
        given: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            given[PREFIX + key if key not in live and PREFIX + key in live else key] = value
        self._check_base_copies(given, live)
        unexpected = sorted(set(given) - set(live))
        missing = sorted(set(live) - set(given))
        if unexpected or missing:
            raise KeyError(
                f"adapter weights do not fit adapter {self.name!r} ({type(self.config).__name__}): "
                f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}, "
                f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            )
        with torch.no_grad():
            for key, target in live.items():
                value = given[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))

    def _check_base_copies(self, given: dict[str, Tensor], live: dict[str, Tensor]) -> None:
        """PEFT also saves the base weights of targeted embedding / output layers (``lm_head.base_layer.weight``).
        They are accepted when they equal the base model's (then dropped from ``given``); a file whose base
        weights differ (e.g. a resized vocabulary) is refused rather than silently half-applied."""
        if self.model is None:
            return
        base = dict(base_parameters(self.model))
        for key in [k for k in given if k not in live and k.startswith(PREFIX) and ".base_layer." in k]:
            name = key.removeprefix(PREFIX)
            if name in base:
                value = given.pop(key)
                if value.shape != base[name].shape or not torch.equal(value.to(base[name].dtype), base[name].detach()):
                    raise ValueError(
                        f"the adapter file carries base weights {name!r} that differ from this base model's "
                        "(a resized or modified layer); peftkit does not overwrite base weights from adapter files"
                    )

    # ------------------------------------------------------------------ merging
    def layers(self) -> list[AdaptedLayer]:
        """The wrapped layers this adapter acts on (targets, then saved modules)."""
        if self.model is None:
            return []
        found = [self.model.get_submodule(p) for p in [*self.parts, *self.saved]]
        return [layer for layer in found if isinstance(layer, AdaptedLayer) and self.name in layer.parts]

    @property
    def merged(self) -> bool:
        return any(self.name in layer.merged for layer in self.layers())

    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weights.

        With ``safe_merge`` every layer's new weights are computed and checked before any is written,
        so a NaN/inf anywhere leaves the model bit-for-bit untouched. Otherwise layers merge one by one
        and an error part-way unmerges those already done.
        """
        layers = [layer for layer in self.layers() if self.name not in layer.merged]
        for layer in layers:
            refuse_tied_weights(self.model, layer)
        if safe_merge:
            planned = [(layer, layer.plan_merge(self.name, safe_merge=True)) for layer in layers]
            for layer, tensors in planned:
                layer.commit_merge(self.name, tensors)
            return
        done: list[AdaptedLayer] = []
        try:
            for layer in layers:
                layer.merge(self.name)
                done.append(layer)
        except Exception:
            for layer in reversed(done):
                layer.unmerge(self.name)
            raise

    def unmerge(self) -> None:
        for layer in self.layers():
            layer.unmerge(self.name)

    # ------------------------------------------------------------------ LayerPart (defaults: additive)
    def transform_input(self, layer: AdaptedLayer, x: Tensor, rows: Tensor | None) -> Tensor:
        return x

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        return add_to_rows(y, rows, lambda xs: self.delta(layer, xs), x)

    def delta(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """``(..., out)`` what the adapter adds to the layer's output for input ``x`` ``(..., in)``."""
        raise NotImplementedError

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``(out, in)`` the weight update equivalent to :meth:`delta` (for merging)."""
        raise NotImplementedError

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        weight = layer.dense_weight()
        return {"weight": layer.stored_weight(weight.float() + self.delta_weight(layer).float())}

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        weight = layer.dense_weight()
        return {"weight": layer.stored_weight(weight.float() - self.delta_weight(layer).float())}

    def part(self, layer: AdaptedLayer, slot: str) -> Any:
        """This adapter's entry in ``layer.<slot>``."""
        return getattr(layer, slot)[self.name]


class SavedModule:
    """``modules_to_save``: a trainable full copy of a module, used for the rows its adapter serves.

    Merging copies its values into the original module (keeping the originals to restore on unmerge),
    which is what ``merge_and_unload`` leaves behind, as in PEFT.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._originals: dict[str, Tensor] = {}

    def transform_input(self, layer: AdaptedLayer, x: Tensor, rows: Tensor | None) -> Tensor:
        return x

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        if rows is None:
            return self.module(x, *args, **kwargs)
        index = rows.nonzero().squeeze(1)
        return y.index_copy(0, index, self.module(x.index_select(0, index), *args, **kwargs).to(y.dtype))

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        self._originals = {n: p.detach().clone() for n, p in layer.base_layer.named_parameters()}
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        return self._originals


def base_parameters(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
    """The base model's own parameters (inside wrapped layers only ``base_layer``'s), with their paths."""
    for name, param in model.named_parameters(recurse=False):
        yield f"{prefix}{name}", param
    for name, child in model.named_children():
        if isinstance(model, AdaptedLayer) and name != "base_layer":
            continue
        yield from base_parameters(child, f"{prefix}{name}.")


def refuse_tied_weights(model: nn.Module | None, layer: AdaptedLayer) -> None:
    """Merging into a weight tied to another module (GPT-2's ``lm_head`` and ``wte``) would change both."""
    if model is None:
        return
    own = {id(p) for p in layer.base_layer.parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in own and not name.startswith(f"{layer.path}."):
            raise ValueError(
                f"cannot merge into {layer.path}: its weight is tied to {name} and both would change; "
                "keep the adapter unmerged, or untie the weights first"
            )


def _moved(value: nn.Module | nn.Parameter, device: torch.device, dtype: torch.dtype) -> nn.Module | nn.Parameter:
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.data.to(device=device, dtype=dtype), requires_grad=value.requires_grad)
    return value.to(device=device, dtype=dtype)
