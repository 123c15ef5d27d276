"""``PeftModel``: a frozen causal LM plus named adapters, with PEFT's public API.

The wrapper knows nothing about individual methods. A forward pass:

1. embeds the user's tokens and wraps them as :class:`~peftkit.methods.base.ModelInputs`;
2. routes rows to adapters (all rows to the active adapters, or one adapter per row with
   ``adapter_names=[...]``) and lets each adapter prepare the batch;
3. runs the base model with explicit positions and, for a key/value prefix, a cache;
4. returns logits for the user's own tokens only, ``(B, L, V)``: virtual tokens never appear in
   the output, so ``logits[:, i]`` always predicts the user's token ``i + 1``.

The loss is the mean next-token cross-entropy over labelled positions, virtual positions included
in the shift (so a prompt can be trained to predict the first user token), as in PEFT.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig
from peftkit.io import atomic_save_safetensors
from peftkit.methods.base import Adapter, Mergeable, ModelInputs
from peftkit.methods.registry import adapter_class_for
from peftkit.models.cache import cache_survives_checkpointing, growing_prefix_cache, readonly_prefix_cache
from peftkit.models.routing import Routing

BASE_ADAPTER_NAME = "__base__"
"""Name that routes a row of a mixed batch to the bare base model (as in PEFT)."""


class PeftModel(nn.Module):
    """A base causal LM with one or more adapters (drop-in for ``peft.PeftModel``).

    Args:
        model: a Hugging Face causal LM; its parameters are frozen.
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name.
        **context: passed to the method's ``create`` (e.g. ``tokenizer=`` for text init).
    """

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **context: Any
    ) -> None:
        super().__init__()
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self.adapters: dict[str, Adapter] = {}
        self.routing = Routing()
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config, **context)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        """The adapters applied to every row when no ``adapter_names`` are given."""
        return self.routing.active

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self.routing.active = list(names)

    @property
    def _adapters_disabled(self) -> bool:
        return self.routing.disabled

    @_adapters_disabled.setter
    def _adapters_disabled(self, value: bool) -> None:
        self.routing.disabled = value

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's single-adapter view)."""
        return self.active_adapters[0]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, **context: Any) -> Adapter:
        """Create and attach a new adapter (not activated: see :meth:`set_adapter`)."""
        if not adapter_name or not adapter_name.replace("-", "_").isidentifier():
            raise ValueError(f"adapter name {adapter_name!r} must be a non-empty identifier (letters, digits, _ -)")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for rows that use no adapter")
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        adapter = adapter_class_for(peft_config).create(self.base_model, peft_config, adapter_name, **context)
        adapter.attach(self, adapter_name)
        self.adapters[adapter_name] = adapter
        self.peft_config[adapter_name] = adapter.config
        if adapter.config.inference_mode:
            adapter.freeze()
        return adapter

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter, or several at once (e.g. a soft prompt on top of a LoRA).

        Activation does not change which adapters train (unlike PEFT, which freezes inactive ones):
        an adapter is trainable unless it was loaded with ``is_trainable=False`` / ``inference_mode``
        or frozen with ``peft_model.adapters[name].freeze()``.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter completely (a merged one is unmerged first, so the base weights come back)."""
        self._check_names([adapter_name])
        adapter = self.adapters[adapter_name]
        if isinstance(adapter, Mergeable) and adapter.merged:
            adapter.unmerge()
        self.adapters.pop(adapter_name).detach(self, adapter_name)
        del self.peft_config[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this context the model computes exactly what the base model computes."""
        previous, self._adapters_disabled = self._adapters_disabled, True
        try:
            yield
        finally:
            self._adapters_disabled = previous

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.adapters)}")

    # ------------------------------------------------------------------ merging
    def _mergeable(self, adapter_names: Sequence[str] | None) -> list[tuple[str, Mergeable]]:
        if adapter_names is None:
            return [(n, a) for n in self.active_adapters if isinstance(a := self.adapters[n], Mergeable)]
        self._check_names(list(adapter_names))
        refused = [n for n in adapter_names if not isinstance(self.adapters[n], Mergeable)]
        if refused:
            raise TypeError(f"adapter(s) {refused} cannot be merged (soft prompts have no weights to fold in)")
        return [(n, self.adapters[n]) for n in adapter_names]  # type: ignore[misc]

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold weight adapters (default: the active mergeable ones) into the base weights.

        Merged adapters cost nothing at inference; every row must then use them (mixing per row or
        ``disable_adapter()`` raises until :meth:`unmerge_adapter`). ``safe_merge`` checks every new
        weight for NaN/inf first and leaves the model untouched if one is found.
        """
        done: list[Mergeable] = []
        try:
            for _, adapter in self._mergeable(adapter_names):
                if not adapter.merged:
                    adapter.merge(safe_merge=safe_merge)
                    done.append(adapter)
        except Exception:
            for adapter in reversed(done):
                adapter.unmerge()
            raise

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights again (in reverse merge order)."""
        for name in reversed(list(self.adapters)):
            adapter = self.adapters[name]
            if isinstance(adapter, Mergeable) and adapter.merged:
                adapter.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge weight adapters (default: the active mergeable ones) and return the bare base model.

        Every adapter is removed from the model afterwards (those not merged are dropped), so the
        result is a plain transformers model, as with PEFT. ``progressbar`` is accepted for PEFT
        compatibility.
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the bare base model (its original weights)."""
        self.unmerge_adapter()
        return self._unload()

    def _unload(self) -> nn.Module:
        for name in list(self.adapters):
            adapter = self.adapters.pop(name)
            adapter.detach(self, name)
            del self.peft_config[name]
        self.active_adapters = []
        return self.base_model

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def after_optimizer_step(self, global_step: int) -> None:
        """Call after every optimiser step: adapters that adapt during training (e.g. AdaLoRA's rank
        budget) implement an optional ``after_optimizer_step(global_step)``."""
        for adapter in self.adapters.values():
            hook = getattr(adapter, "after_optimizer_step", None)
            if hook is not None:
                hook(global_step)

    update_and_allocate = after_optimizer_step  # PEFT's name (AdaLoRA)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in the backward pass (works with prefix tuning too)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if not kwargs["use_reentrant"]:  # recompute wrapped layers under the routing of their forward pass
            kwargs.setdefault("context_fn", self.routing.checkpoint_contexts)
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ forward
    def routes(self, batch_size: int, adapter_names: Sequence[str] | None, device: torch.device) -> dict[str, Tensor]:
        """Adapter name → ``(B,)`` expert index per row (``-1``: row not served)."""
        if self._adapters_disabled:
            return {}
        if adapter_names is None:
            rows = torch.zeros(batch_size, dtype=torch.long, device=device)
            return dict.fromkeys(self.active_adapters, rows)
        if len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows")
        self._check_names(sorted(set(adapter_names) - {BASE_ADAPTER_NAME}))
        return {
            name: torch.tensor([0 if n == name else -1 for n in adapter_names], device=device)
            for name in dict.fromkeys(adapter_names)
            if name != BASE_ADAPTER_NAME
        }

    def prepare_inputs(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        routes: dict[str, Tensor] | None = None,
    ) -> ModelInputs:
        """The batch after every routed adapter has prepared it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        inputs = ModelInputs.from_user(inputs_embeds, attention_mask, labels)
        for name, rows in (routes or {}).items():
            inputs = self.adapters[name].prepare_inputs(inputs, rows)
        return inputs

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
        use_cache: bool = False,
        return_logits: bool | Literal["labelled"] = True,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the adapted model.

        Args:
            input_ids: ``(B, L)`` token ids (or ``inputs_embeds`` ``(B, L, D)``).
            attention_mask: ``(B, L)``; left or right padding both work.
            labels: ``(B, L)`` next-token targets (``-100`` = ignored), as for Hugging Face models.
            adapter_names: one adapter name per row (``"__base__"`` = no adapter) for mixed batches.
            use_cache: return the attention cache (it includes virtual positions).
            return_logits: ``False`` skips the vocabulary projection everywhere except at labelled
                positions (a training fast path): ``logits`` is then ``None``. ``"labelled"`` takes the
                same path and returns those logits, ``(T, V)`` for the ``T`` labelled targets in
                row-major order (as ``labels[:, 1:][labels[:, 1:] != -100]`` when the first token
                carries no label), and hidden states (if requested) as ``(T, D)`` per layer at the
                same positions: what distillation and hidden-state losses need.
            logits_to_keep: without labels, compute logits for the last ``k`` user tokens only
                (``0`` = all), as in Hugging Face models.

        Returns:
            ``CausalLMOutputWithPast`` with ``logits`` ``(B, L, V)`` aligned with the user's tokens.
        """
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise NotImplementedError(f"{key}= is not accepted: PeftModel manages the cache; use generate()")
            kwargs.pop(key, None)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        routes = self.routes(batch_size, adapter_names, device)
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep cannot be combined with labels (use return_logits=False)")
        with self.routing.scope(routes):
            inputs = self.prepare_inputs(input_ids, attention_mask, inputs_embeds, labels, routes)
            out = self.run_base_model(
                inputs,
                use_cache=use_cache,
                return_logits=return_logits,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if out.loss is not None:
            for name in routes:
                term = getattr(self.adapters[name], "regularization_loss", None)
                extra = term() if term is not None else None
                if extra is not None:
                    out.loss = out.loss + extra
        return out

    def run_base_model(
        self,
        inputs: ModelInputs,
        *,
        use_cache: bool = False,
        return_logits: bool | Literal["labelled"] = True,
        logits_to_keep: int = 0,
        cache: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the base model on a prepared batch; loss and logits as described in :meth:`forward`."""
        guard: contextlib.AbstractContextManager = contextlib.nullcontext()
        if cache is None and use_cache:
            cache = growing_prefix_cache(inputs.prefix, self.base_model.config)
        elif cache is None and inputs.prefix is not None:
            cache = readonly_prefix_cache(inputs.prefix)
            if self.training and is_checkpointing(self.base_model):
                guard = cache_survives_checkpointing(self.base_model)
        predicting = inputs.prediction_mask()
        labelled = return_logits == "labelled"
        if predicting is None:
            keep: int | Tensor = inputs.user_positions[:, -logits_to_keep:] if logits_to_keep else inputs.user_positions
        else:
            keep = predicting if labelled or not return_logits else 0
        with guard:
            out = self.base_model(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.full_attention_mask(),
                position_ids=inputs.position_ids(),
                cache=cache,
                use_cache=use_cache,
                logits_to_keep=keep,
                **kwargs,
            )
        logits, loss, hidden_states = out.logits, None, out.hidden_states
        if predicting is not None:
            targets = inputs.next_token_targets()[predicting]
            scored = logits if keep is predicting else logits[predicting]  # (T, V)
            loss = F.cross_entropy(scored.float(), targets)
            if labelled:
                logits = scored
                if hidden_states is not None:
                    hidden_states = tuple(h[predicting] for h in hidden_states)  # each (T, D)
            else:
                logits = user_logits(logits, inputs.user_positions) if return_logits else None
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache if use_cache else None,
            hidden_states=hidden_states,
            attentions=out.attentions,
        )

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        """Decode with the KV cache; see :func:`peftkit.models.generation.generate`."""
        from peftkit.models.generation import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> None:
        """Write each adapter as PEFT does: ``default`` at the top, others in a subfolder."""
        if not safe_serialization:
            raise ValueError("peftkit writes safetensors only (safe_serialization=False is not supported)")
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.adapters)
        self._check_names(names)
        root = Path(save_directory)
        if root.is_file():
            raise ValueError(f"{root} is a file, expected a directory")
        for name in names:
            folder = root if name == "default" else root / name
            folder.mkdir(parents=True, exist_ok=True)
            config = self.peft_config[name].model_copy(update={"inference_mode": True})
            if config.base_model_name_or_path is None:
                base_name = getattr(self.base_model.config, "name_or_path", None) or None
                config = config.model_copy(update={"base_model_name_or_path": base_name})
            atomic_save_safetensors(self.adapters[name].adapter_state_dict(), folder / WEIGHTS_NAME)
            config.save_pretrained(folder)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        **context: Any,
    ) -> PeftModel:
        """Load an adapter folder written by peftkit or PEFT onto ``model``.

        Args:
            is_trainable: keep the adapter trainable (to resume training); otherwise it is frozen.
        """
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        config = config or PeftConfig.from_pretrained(folder)
        config = config.model_copy(update={"inference_mode": not is_trainable})
        peft_model = cls(model, config, adapter_name, initialize=False, **context)
        peft_model._load_weights(adapter_name, folder, is_trainable)
        return peft_model

    def load_adapter(
        self, model_id: str | Path, adapter_name: str, is_trainable: bool = False, **context: Any
    ) -> Adapter:
        """Load another adapter folder onto this model under ``adapter_name`` (not activated)."""
        config = PeftConfig.from_pretrained(model_id).model_copy(update={"inference_mode": not is_trainable})
        adapter = self.add_adapter(adapter_name, config, initialize=False, **context)
        self._load_weights(adapter_name, Path(model_id), is_trainable)
        return adapter

    def _load_weights(self, adapter_name: str, folder: Path, trainable: bool) -> None:
        path = folder / WEIGHTS_NAME
        if not path.is_file():
            legacy = [p.name for p in folder.glob("adapter_model.*")]
            hint = f" (found {legacy}: peftkit never loads pickle files)" if legacy else ""
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{hint}")
        if not (folder / CONFIG_NAME).is_file():
            warnings.warn(f"no {CONFIG_NAME} beside {path}", UserWarning, stacklevel=3)
        adapter = self.adapters[adapter_name]
        device = next(iter(self.base_model.parameters())).device
        adapter.load_adapter_state_dict(load_file(path, device=str(device)), trainable=trainable)
        if trainable:
            adapter.unfreeze()
        else:
            adapter.freeze()


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, across transformers' renames."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def user_logits(logits: Tensor, user_positions: Tensor) -> Tensor:
    """``(B, L, V)`` logits at the user's token positions of a ``(B, S, V)`` tensor."""
    return torch.take_along_dim(logits, user_positions.unsqueeze(-1), dim=1)


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **context: Any
) -> PeftModel:
    """Wrap ``model`` with a new adapter (drop-in for ``peft.get_peft_model``).

    ``context`` reaches the method's ``create``: e.g. ``tokenizer=`` for text-initialised prompts
    instead of loading ``tokenizer_name_or_path``.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config)")
    return PeftModel(model, peft_config, adapter_name, **context)
