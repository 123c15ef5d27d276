"""The run configuration: one YAML file (plus ``key=value`` overrides) describes a training run.

::

    model:      {name: smollm2-135m-instruct, dtype: float32}
    adapters:   {default: {peft_type: PROMPT_TUNING, num_virtual_tokens: 20}}
    data:       {train: rotten_tomatoes, formatter: rotten_tomatoes, max_length: 256}
    training:   {lr: 1.0e-2, max_steps: 200, batch_size: 8, scheduler: linear, warmup_steps: 10}
    loss:       cross_entropy
    output_dir: runs/sentiment

Every section is a pydantic model with a docstring under each field; ``docs/training.md`` lists
them all. An invalid value is an error that names the field, the value and what is allowed
(:func:`describe_errors`). Names that refer to registries (methods, formatters, losses, callbacks,
gradient hooks) are checked against them, after the modules listed in ``imports`` are imported
(that is where user code registers its own).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftkit.config_files import ConfigError, describe_errors
from peftkit.evaluation.config import TaskEvaluationConfig
from peftkit.sections import ImportsUserCode, ModelConfig, Section, SourceConfig

__all__ = ["ConfigError", "ModelConfig", "RunConfig", "SourceConfig", "describe_errors"]

PEFTKIT_ADAPTER_KEYS = ("trainable", "from_pretrained")


class DataConfig(Section):
    """What to train (and evaluate) on, and how records become token batches."""

    train: SourceConfig
    """Training records."""
    eval: SourceConfig | None = None
    """Held-out records: the evaluation loss is computed on them at ``training.eval_every``."""
    formatter: str = "prompt_completion"
    """Formatter name: ``prompt_completion``, ``template``, ``text``, ``chat``, ``scifact``, ``fever``,
    ``gsm8k``, ``rotten_tomatoes``, or one you registered with ``register_formatter``."""
    formatter_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the formatter (e.g. ``{prompt_field: question}``)."""
    max_length: int | None = Field(512, ge=2)
    """Longest example in tokens (``null``: no limit)."""
    truncation: Literal["left", "right", "drop"] = "left"
    """Over-long examples: ``left`` drops the oldest prompt tokens (the completion survives),
    ``right`` cuts the end, ``drop`` skips the example."""
    padding_side: Literal["left", "right"] = "left"
    """Where padding goes (results are the same either way: positions skip padding)."""
    shuffle: bool = True
    """Shuffle every epoch (seeded by ``training.seed`` and the epoch)."""
    bucket_window: int = Field(16, ge=1)
    """Sort windows of this many batches by length before cutting batches (1 = no bucketing)."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Rows per evaluation batch (default: ``training.batch_size``)."""

    @model_validator(mode="after")
    def _known_formatter(self) -> DataConfig:
        from peftkit.data.formatters import check_formatter

        check_formatter(self.formatter, self.formatter_options)
        return self


class TrainingConfig(Section):
    """Optimisation, schedule, cadence and precision."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimiser: ``adamw`` (decoupled weight decay), ``adam`` (L2 in the gradient) or ``sgd``."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (``adamw``: decoupled)."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """Adam's first-moment decay."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """Adam's second-moment decay."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """Adam's denominator epsilon."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """SGD momentum (``optimizer: sgd`` only)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (``null``: no clipping)."""
    epochs: int | None = Field(None, ge=1)
    """Passes over the training data (default 1 when ``max_steps`` is not set)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimiser steps; with ``epochs`` too, training stops at whichever comes first."""
    batch_size: int = Field(8, ge=1)
    """Rows per micro-batch, *global*: under ``torchrun`` each of N processes takes 1/N of them."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimiser step. The loss is normalised by the label tokens of all of them,
    so accumulating 4 × 2 rows equals one batch of 8."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate shape after warmup: flat, linear decay, or cosine decay."""
    warmup_steps: int | None = Field(None, ge=0)
    """Linear warmup steps (give this or ``warmup_ratio``, not both; default 0)."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Warmup as a fraction of the total steps."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Where ``linear`` / ``cosine`` decay ends, as a fraction of ``lr``."""
    seed: int = Field(0, ge=0)
    """Seeds adapter initialisation, data order and every random number generator."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16`` runs forward and backward under bfloat16 autocast; weights and optimiser stay fp32."""
    log_every: int = Field(1, ge=1)
    """Write a metrics record every this many steps."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every this many steps (needs ``data.eval`` or an ``evaluate`` function)."""
    eval_at_end: bool = True
    """Evaluate once more after the last step (when there is something to evaluate)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every this many steps (one is always written at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError(f"give warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both")
        return self


class LossComponent(BaseModel):
    """One weighted term of the loss; further keys are the loss's own options."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: str
    """Loss name: ``cross_entropy``, ``kl_divergence``, ``mse``, or one you registered."""
    weight: float = Field(1.0, gt=0)
    """Weight of this term in the total."""

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_loss(self) -> LossComponent:
        from peftkit.training.losses import check_loss

        check_loss(self.name, self.options)
        return self


class GradientHooksConfig(Section):
    """Opt-in gradient statistics, computed on the real gradients at optimiser-step cadence."""

    hooks: list[str] = Field(default_factory=list)
    """Which: ``norm``, ``distribution``, ``flow``, ``health``, or registered ones (empty: off)."""
    every: int = Field(1, ge=1)
    """Compute them every this many optimiser steps."""
    vanishing_threshold: float = Field(1e-7, ge=0)
    """``health``: a parameter whose gradient norm is below this is counted as vanishing."""
    exploding_threshold: float = Field(1e3, gt=0)
    """``health``: a parameter whose gradient norm is above this is counted as exploding."""

    @field_validator("hooks")
    @classmethod
    def _known_hooks(cls, value: list[str]) -> list[str]:
        from peftkit.training.gradients import known_gradient_hooks

        unknown = [h for h in value if h not in known_gradient_hooks()]
        if unknown:
            raise ValueError(f"unknown gradient hook(s) {unknown}; known: {', '.join(known_gradient_hooks())}")
        return value


class CallbackConfig(BaseModel):
    """A callback by name; further keys are its options."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: str
    """``early_stopping``, ``best_checkpoint`` or a callback class you registered with ``register_callback``."""

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_callback(self) -> CallbackConfig:
        from peftkit.training.callbacks import check_callback

        check_callback(self.name, self.options)
        return self


class ExpertsConfig(Section):
    """Many experts in one run: each trains exactly as it would alone (see docs/experts.md).

    Every record names its expert in ``field``; the ``bank`` adapter holds one table row per
    expert (created from the ids found in ``data.train``, or grown onto a bank loaded with
    ``from_pretrained``). Other adapters apply to every row, unless ``routes`` routes them per row
    by a record field (e.g. a frozen cluster bank by ``cluster``). Train in stages by running
    twice: first the cluster bank (``field: cluster``), then the persona bank on top of it
    (frozen, ``routes: {cluster: cluster}``).
    """

    field: str = "expert"
    """The record field naming each row's expert (its id in the bank)."""
    bank: str | None = None
    """The adapter holding the bank that trains (default: the only trainable adapter)."""
    routes: dict[str, str] = Field(default_factory=dict)
    """Adapter name → record field: adapters (frozen banks) applied per row by that field's value."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Rows per forward pass; a step holds every expert's batch (default: ``training.batch_size``)."""


class RunConfig(ImportsUserCode):
    """A whole training run (the YAML file)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base model."""
    adapters: dict[str, dict[str, Any]]
    """Adapter name → its PEFT config fields (``peft_type`` plus the method's fields, as in
    ``adapter_config.json``). All adapters are active together. Two peftkit keys: ``trainable``
    (default true) and ``from_pretrained`` (start from a saved adapter folder)."""
    data: DataConfig
    """Training and evaluation data."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Optimisation, schedule, cadence and precision."""
    loss: list[LossComponent] = Field(default_factory=lambda: [LossComponent(name="cross_entropy")])
    """The loss: a name, or a list of weighted components (each logged on its own)."""
    gradient_hooks: GradientHooksConfig = Field(default_factory=GradientHooksConfig)
    """Gradient statistics (off unless hooks are listed)."""
    callbacks: list[CallbackConfig] = Field(default_factory=list)
    """Callbacks by name, with their options."""
    evaluation: TaskEvaluationConfig | None = None
    """Task metrics (accuracy, F1, JSON validity, ...) on ``data.eval`` at ``training.eval_every``, logged
    as ``eval/<metric>``: see docs/evaluation.md."""
    experts: ExpertsConfig | None = None
    """Many experts in one run, each as if trained alone (a bank adapter, records naming their expert)."""
    output_dir: str = "runs/train"
    """Where checkpoints, the final adapter, metrics.jsonl and loss_curve.png go."""
    tensorboard: bool = False
    """Also write TensorBoard events (needs the ``tensorboard`` package)."""

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"name": value}]
        if isinstance(value, dict):
            return [value]
        return value

    @field_validator("adapters")
    @classmethod
    def _valid_adapters(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("at least one adapter is needed, e.g. {default: {peft_type: PROMPT_TUNING}}")
        return {name: resolve_adapter(name, spec) for name, spec in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        streamed = [k for k in ("train", "eval") if getattr(self.data, k) and getattr(self.data, k).streaming]
        if "train" in streamed and self.training.max_steps is None:
            raise ValueError(
                "data.train.streaming=true needs training.max_steps (a stream's length is unknown until read)"
            )
        if len(self.loss) == 0:
            raise ValueError("loss needs at least one component")
        check_evaluation_setup(self)  # evaluation needs data.eval; best_checkpoint needs a checkpoint per eval
        if self.experts is not None:
            self._check_experts(self.experts)
        return self

    def _check_experts(self, experts: ExpertsConfig) -> None:
        trainable = [n for n, spec in self.adapters.items() if spec.get("trainable", True)]
        bank = experts.bank or (trainable[0] if len(trainable) == 1 else None)
        if bank is None:
            raise ValueError(f"experts.bank: name the adapter that holds the experts (trainable: {trainable})")
        if bank not in self.adapters:
            raise ValueError(f"experts.bank = {bank!r}: no such adapter (adapters: {sorted(self.adapters)})")
        if trainable != [bank]:
            raise ValueError(
                f"experts: only the bank {bank!r} may train (each expert alone); "
                f"set trainable: false on {sorted(set(trainable) - {bank})}"
            )
        unknown = sorted(set(experts.routes) - set(self.adapters))
        if unknown:
            raise ValueError(f"experts.routes names no adapter {unknown} (adapters: {sorted(self.adapters)})")
        if self.training.gradient_accumulation_steps != 1:
            raise ValueError("experts: training.gradient_accumulation_steps must be 1 (use experts.micro_batch_size)")
        if self.data.train.streaming:
            raise ValueError("experts: data.train cannot be streamed (each expert's rows are grouped first)")
        experts.bank = bank

    def peft_configs(self) -> dict[str, Any]:
        """Adapter name → validated ``PeftConfig`` (``None`` for ``from_pretrained`` adapters)."""
        from peftkit.methods.registry import config_class_for

        configs = {}
        for name, spec in self.adapters.items():
            fields = {k: v for k, v in spec.items() if k not in PEFTKIT_ADAPTER_KEYS}
            configs[name] = config_class_for(fields["peft_type"])(**fields) if "peft_type" in fields else None
        return configs


def resolve_adapter(name: str, spec: Any) -> dict[str, Any]:
    """Check one ``adapters.<name>`` entry against its method's config; return it with defaults filled."""
    from peftkit.methods.registry import config_class_for

    where = f"adapters.{name}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping of PEFT config fields, got {spec!r}")
    if not name.replace("-", "_").isidentifier():
        raise ValueError(f"{where}: adapter name {name!r} must be an identifier (letters, digits, _ -)")
    extra = {k: spec[k] for k in PEFTKIT_ADAPTER_KEYS if k in spec}
    if "trainable" in extra and not isinstance(extra["trainable"], bool):
        raise ValueError(f"{where}.trainable = {extra['trainable']!r}: must be true or false")
    fields = {k: v for k, v in spec.items() if k not in PEFTKIT_ADAPTER_KEYS}
    if "from_pretrained" in extra:
        if fields:
            raise ValueError(f"{where}: from_pretrained takes its config from the folder; remove {sorted(fields)}")
        return extra
    if "peft_type" not in fields:
        raise ValueError(f"{where}.peft_type is missing (known methods: {', '.join(_known_methods())})")
    try:
        config_cls = config_class_for(fields["peft_type"])
    except ValueError as exc:
        raise ValueError(f"{where}.peft_type = {fields['peft_type']!r}: {exc}") from None
    try:
        config = config_cls(**fields)
    except ValidationError as exc:
        raise ValueError("; ".join(describe_errors(exc, where, config_cls))) from None
    return {**config.model_dump(mode="json", exclude_none=True), **extra}


def _known_methods() -> list[str]:
    from peftkit.methods.registry import known_methods

    return known_methods()


def check_evaluation_setup(run: Any) -> None:
    """Checks of a training run config that involve evaluation (called by its validator).

    * ``evaluation`` needs ``data.eval``;
    * ``best_checkpoint`` keeps the checkpoint written at the best evaluation, so every evaluation
      step must also be a checkpoint step: ``training.checkpoint_every`` must divide
      ``training.eval_every``.
    """
    if getattr(run, "evaluation", None) is not None and run.data.eval is None:
        raise ValueError("evaluation needs data.eval: the records its metrics are computed on")
    if any(c.name == "best_checkpoint" for c in run.callbacks):
        every, checkpoint = run.training.eval_every, run.training.checkpoint_every
        if every is not None and (checkpoint is None or every % checkpoint):
            raise ValueError(
                f"callbacks: best_checkpoint keeps the checkpoint written at the best evaluation, so "
                f"training.checkpoint_every ({checkpoint}) must divide training.eval_every ({every})"
            )
