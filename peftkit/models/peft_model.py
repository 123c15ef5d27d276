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
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftkit.config import PeftConfig
from peftkit.errors import NoMatchingPeftModuleError
from peftkit.experts.routes import ExpertRoutes
from peftkit.methods.base import Adapter, Mergeable
from peftkit.methods.registry import adapter_class_for
from peftkit.models.call_routing import BASE_ADAPTER_NAME, PeftRouting
from peftkit.models.files import PeftFiles
from peftkit.models.forward import is_checkpointing, run_base_model, user_logits
from peftkit.models.inspection import PeftInspection
from peftkit.models.merging import PeftMerging
from peftkit.models.routing import Routing
from peftkit.models.tasks import is_causal_lm, keep_given_config, prepare_task_config
from peftkit.models.tuner_model import PEFT_TYPE_TO_TUNER_MAPPING, AdapterHost, TunerModel

__all__ = ["BASE_ADAPTER_NAME", "PeftModel", "get_peft_model", "is_checkpointing", "user_logits"]

NO_LOW_CPU_MEM = "low_cpu_mem_usage=True is not supported: adapters are created on the model's device"
NO_AUTOCAST_OFF = "autocast_adapter_dtype=False is not supported: adapters of fp16/bf16 layers are kept in fp32"


def check_loading_options(low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True) -> None:
    """Refuse PEFT loading options peftkit does not implement (never ignore them)."""
    if low_cpu_mem_usage:
        raise NotImplementedError(NO_LOW_CPU_MEM)
    if not autocast_adapter_dtype:
        raise NotImplementedError(NO_AUTOCAST_OFF)


class PeftModel(PeftRouting, PeftMerging, PeftFiles, PeftInspection, nn.Module):
    """A base model with one or more adapters (drop-in for ``peft.PeftModel``).

    Soft prompts need a causal LM; weight adapters work on any ``nn.Module`` (a transformers model
    of any task, or a plain MLP), where ``forward`` is the model's own forward with the adapters
    inside its layers.

    As in PEFT, ``base_model`` is a tuner layer whose ``.model`` is the user's model when the first
    adapter is a weight adapter (:class:`~peftkit.models.tuner_model.TunerModel`), and the user's model
    itself when it is a soft prompt; :meth:`get_base_model` always returns the user's model.

    Args:
        model: the model to adapt; its parameters are frozen.
        peft_config: the first adapter's config; ``None`` wraps the base model with no adapter yet
            (it then computes exactly what the base model computes, e.g. to evaluate it alone).
        adapter_name: the first adapter's name.
        autocast_adapter_dtype: only ``True`` (PEFT's default) is supported: adapters of fp16/bf16
            layers are kept in fp32.
        low_cpu_mem_usage: accepted for PEFT compatibility; only ``False`` is supported.
        **context: passed to the method's ``create`` (e.g. ``tokenizer=`` for text init).
    """

    #: Module names a task's head goes by; a weight adapter saves them whole (PEFT's task classes).
    default_modules_to_save: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | None,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **context: Any,
    ) -> None:
        super().__init__()
        check_loading_options(low_cpu_mem_usage, autocast_adapter_dtype)
        if isinstance(model, TunerModel):  # built by a tuner class (LoraModel(model, config)): it is ours
            object.__setattr__(model, "_peft_model", self)
            self.base_model = model
        elif peft_config is not None and peft_config.is_prompt_learning:
            self.base_model = model
        else:
            tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type, TunerModel) if peft_config else TunerModel
            self.base_model = tuner(model, peft_model=self)
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self.adapters: dict[str, Adapter] = {}
        self.routing = Routing()
        for param in model.parameters():
            param.requires_grad_(False)
        if peft_config is not None:
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
        """Inside :meth:`disable_adapter` (in this thread / task)."""
        return self.routing.disabled

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's single-adapter view)."""
        if not self.active_adapters:
            raise AttributeError("this PeftModel has no active adapter")
        return self.active_adapters[0]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The user's model (with the adapters inside its layers)."""
        base = self.base_model
        return base.model if isinstance(base, TunerModel) else base

    @property
    def is_causal_lm(self) -> bool:
        """Whether ``forward`` takes the causal-LM path (soft prompts, aligned logits, label loss).

        True for a generating decoder-only model (a transformers ``...ForCausalLM``) with task type
        ``CAUSAL_LM`` or ``None``; any other model runs its own forward with the adapters inside.
        """
        return is_causal_lm(self.get_base_model())

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        **context: Any,
    ) -> Adapter:
        """Create and attach a new adapter (not activated: see :meth:`set_adapter`).

        ``peft_model.peft_config[adapter_name]`` is the config object given (as in PEFT), updated in
        place with the values resolved from the model (e.g. default ``target_modules``).
        """
        check_loading_options(low_cpu_mem_usage, autocast_adapter_dtype)
        if not adapter_name or not adapter_name.replace("-", "_").isidentifier():
            raise ValueError(f"adapter name {adapter_name!r} must be a non-empty identifier (letters, digits, _ -)")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for rows that use no adapter")
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        model = self.get_base_model()
        task_config = prepare_task_config(self, model, peft_config)
        try:
            adapter = adapter_class_for(peft_config).create(model, task_config, adapter_name, **context)
        except ValueError as error:
            if "matches no module" in str(error):  # PEFT's error class for this case (still a ValueError)
                raise NoMatchingPeftModuleError(str(error)) from error
            raise
        adapter.attach(AdapterHost(self), adapter_name)
        self.adapters[adapter_name] = adapter
        keep_given_config(peft_config, adapter.config)
        adapter.config = peft_config
        self.peft_config[adapter_name] = peft_config
        if adapter.config.inference_mode:
            adapter.freeze()
        return adapter

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (e.g. a soft prompt on top of a LoRA).

        ``inference_mode=True`` also freezes the activated adapters (as in PEFT).

        Activation does not change which adapters train (unlike PEFT, which freezes inactive ones):
        an adapter is trainable unless it was loaded with ``is_trainable=False`` / ``inference_mode``
        or frozen with ``peft_model.adapters[name].freeze()``.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        self.active_adapters = names
        if inference_mode:
            for name in names:
                self.adapters[name].freeze()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter completely (a merged one is unmerged first, so the base weights come back).

        If it was the only active adapter, another one becomes active, as in PEFT: the first remaining
        one by name for weight adapters, by creation order for soft prompts (with a warning).
        """
        self._check_names([adapter_name])
        adapter = self.adapters[adapter_name]
        if isinstance(adapter, Mergeable) and adapter.merged:
            adapter.unmerge()
        was_prompt = self.peft_config[adapter_name].is_prompt_learning
        self.adapters.pop(adapter_name).detach(AdapterHost(self), adapter_name)
        del self.peft_config[adapter_name]
        was_active = adapter_name in self.active_adapters
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if was_active and not self.active_adapters and self.adapters:
            remaining = list(self.adapters) if was_prompt else sorted(self.adapters)
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.",
                UserWarning,
                stacklevel=2,
            )
            self.active_adapters = [remaining[0]]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this context the model computes exactly what the base model computes.

        The switch belongs to the calling thread (or asyncio task): another request served at the
        same time still uses its adapters.
        """
        with self.routing.disabled_scope():
            yield

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.adapters)}")

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
        model = self.get_base_model()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the adapted model: :meth:`lm_forward` for a causal LM, otherwise the model's own forward.

        On a model that is not a causal LM (a classifier, an encoder, a plain ``nn.Module``) the
        arguments go to the model unchanged, with the weight adapters acting inside its layers;
        ``adapter_names=[...]`` (one per row of the first tensor argument) still mixes adapters per row.
        A ``loss`` the model returns gets the adapters' regularisation terms (AdaLoRA), as in PEFT.
        """
        if self.is_causal_lm:
            return self.lm_forward(*args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        with self._routed(adapter_names, args, kwargs):
            out = self.get_base_model()(*args, **kwargs)
        if isinstance(getattr(out, "loss", None), Tensor):
            routes = (
                None if adapter_names is None else {n: torch.zeros(1) for n in set(adapter_names) if n in self.adapters}
            )
            extra = self.regularization_loss(routes)
            if extra is not None:
                out.loss = out.loss + extra
        return out

    def lm_forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
        experts: ExpertRoutes | None = None,
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
            experts: one mapping per row, adapter name → expert id or index in that adapter's bank
                (e.g. ``{"unified": 0, "cluster": "c3", "persona": "p017"}``; ``{}`` = base model), or
                an :class:`~peftkit.experts.hierarchy.ExpertHierarchy` resolution. Adapters apply in
                the order they were added to the model (see ``docs/experts.md``).
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
        routes = self.routes(batch_size, adapter_names, device, experts)
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep cannot be combined with labels (use return_logits=False)")
        with self.routing.scope(routes):
            inputs = self.prepare_inputs(input_ids, attention_mask, inputs_embeds, labels, routes)
            out = run_base_model(
                self.get_base_model(),
                inputs,
                use_cache=use_cache,
                return_logits=return_logits,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if out.loss is not None:
            extra = self.regularization_loss(routes)
            if extra is not None:
                out.loss = out.loss + extra
        return out

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Decode with the KV cache; see :func:`peftkit.models.generation.generate`.

        ``return_dict_in_generate=True`` returns a transformers ``GenerateDecoderOnlyOutput`` (with
        ``scores`` when ``output_scores=True``: the processed next-token scores of each step, as in
        transformers). A model that is not a causal LM (e.g. an encoder-decoder) uses its own
        ``generate`` with the adapters inside its layers.
        """
        if not self.is_causal_lm:
            adapter_names = kwargs.pop("adapter_names", None)
            with self._routed(adapter_names, args, kwargs):
                return self.get_base_model().generate(*args, **kwargs)
        from peftkit.models.generate_output import generate_with_output
        from peftkit.models.generation import generate

        if kwargs.get("return_dict_in_generate") or kwargs.get("output_scores"):
            return generate_with_output(self, generate, *args, **kwargs)
        return generate(self, *args, **kwargs)

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, **options: Any
    ) -> None:
        """A new LoRA adapter combined from ``adapters`` (``combination_type="svd"``, ``"cat"``, ``"linear"``,
        ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` and the ``_svd`` variants, as PEFT);
        see :func:`peftkit.models.weighted.add_weighted_adapter`."""
        from peftkit.models.weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, **options)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
    **context: Any,
) -> PeftModel:
    """Wrap ``model`` with a new adapter (drop-in for ``peft.get_peft_model``).

    ``context`` reaches the method's ``create``: e.g. ``tokenizer=`` for text-initialised prompts
    instead of loading ``tokenizer_name_or_path``.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config)")
    if mixed:
        raise NotImplementedError(
            "mixed=True (PeftMixedModel) is not needed in peftkit: a PeftModel holds adapters of different "
            "methods at once; call get_peft_model(model, config) and add_adapter(name, other_config)"
        )
    check_loading_options(low_cpu_mem_usage, autocast_adapter_dtype)
    # PEFT's rule: the model's own name (a model built from a config has none)
    name = getattr(model, "__dict__", {}).get("name_or_path", None) or None
    if peft_config.base_model_name_or_path != name:
        peft_config.base_model_name_or_path = name
    if revision is not None:
        peft_config.revision = revision
    from peftkit.models.task_models import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    task_type = peft_config.task_type
    if "task_type" not in peft_config.model_fields_set and not is_causal_lm(model):
        task_type = None  # PEFT's default for a model that is not a causal LM (see prepare_task_config)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(task_type), PeftModel)
    return cls(model, peft_config, adapter_name, **context)
