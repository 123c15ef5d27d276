"""From a :class:`~peftkit.training.config.RunConfig` to a finished run: what ``peftkit train`` does.

1. join the process group if ``torchrun`` started us; seed every RNG;
2. load the base model and tokenizer; build every adapter through the method registry (so any
   registered method trains: soft prompts, LoRA, or several jointly);
3. build the data pipelines, the loss (loading teacher models if a loss names one), the callbacks;
4. train (or resume from the newest checkpoint), then print a summary.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from peftkit.data.experts import ExpertData
from peftkit.data.formatters import get_formatter
from peftkit.data.pipeline import TokenizedData
from peftkit.data.sources import open_source
from peftkit.training.callbacks import build_callback
from peftkit.training.checkpoint import latest_checkpoint, list_checkpoints, remove_stale_temporaries
from peftkit.training.config import RunConfig
from peftkit.training.distributed import Distributed
from peftkit.training.losses import CompositeLoss
from peftkit.training.overrides import dump_run_config
from peftkit.training.trainer import Evaluator, Trainer, TrainResult
from peftkit.training.update import ParameterUpdate


@dataclass
class Run:
    """Everything a run is made of, built but not started."""

    config: RunConfig
    model: Any
    tokenizer: Any
    trainer: Trainer
    train_data: TokenizedData | ExpertData
    dist: Distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def expert_ids(config: RunConfig) -> list[str]:
    """The experts named in ``data.train`` (``experts.field``), in order of first appearance."""
    assert config.experts is not None
    field, seen = config.experts.field, {}
    for index, record in enumerate(open_source(config.data.train)):
        value = record.get(field)
        if value in (None, ""):
            raise ValueError(f"data.train: record {index} has no {field!r} (experts.field)")
        seen.setdefault(str(value), None)
    return list(seen)


def build_model(config: RunConfig, device: torch.device) -> tuple[Any, Any]:
    """The base model with every configured adapter attached and active (with ``experts``, the bank
    adapter holds one row per expert of ``data.train``)."""
    from peftkit.models.loading import load_base
    from peftkit.models.peft_model import PeftModel, get_peft_model

    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    base, tokenizer = load_base(config.model.name, dtype=dtype, device=device)
    bank, ids = (config.experts.bank, expert_ids(config)) if config.experts is not None else (None, [])
    peft_model = None
    for (name, spec), peft_config in zip(config.adapters.items(), config.peft_configs().values(), strict=True):
        trainable = spec.get("trainable", True)
        if name == bank and peft_config is not None:
            if not hasattr(peft_config, "expert_ids"):
                raise ValueError(f"experts.bank = {name!r}: {peft_config.peft_type} cannot hold a bank of experts")
            peft_config = peft_config.model_copy(update={"expert_ids": ids})
        if "from_pretrained" in spec:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    base, spec["from_pretrained"], adapter_name=name, is_trainable=trainable, tokenizer=tokenizer
                )
            else:
                peft_model.load_adapter(spec["from_pretrained"], name, is_trainable=trainable, tokenizer=tokenizer)
            continue
        if peft_model is None:
            peft_model = get_peft_model(base, peft_config, adapter_name=name, tokenizer=tokenizer)
        else:
            peft_model.add_adapter(name, peft_config, tokenizer=tokenizer)
        if not trainable:
            peft_model.adapters[name].freeze()
    assert peft_model is not None
    if bank is not None and "from_pretrained" in config.adapters[bank]:  # grow a saved bank by the new experts
        adapter = peft_model.adapters[bank]
        held = set(getattr(adapter, "experts", ()))
        new = [i for i in ids if i not in held]
        if new:
            adapter.add_experts(new)
    peft_model.set_adapter(list(config.adapters))
    if config.model.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable()
    return peft_model, tokenizer


def expert_route(config: RunConfig) -> Any:
    """``record -> {adapter: expert}``: the bank by ``experts.field``, routed adapters by their
    field, every other adapter on every row (its single expert)."""
    assert config.experts is not None
    e = config.experts
    fields = {e.bank: e.field, **e.routes}
    fixed = {name: 0 for name in config.adapters if name not in fields}

    def route(record: Any) -> dict[str, Any]:
        return {**fixed, **{name: str(record[field]) for name, field in fields.items()}}

    return route


def build_data(
    config: RunConfig, tokenizer: Any, dist: Distributed
) -> tuple[TokenizedData | ExpertData, TokenizedData | None]:
    d, t = config.data, config.training
    formatter = get_formatter(d.formatter, tokenizer, **d.formatter_options)
    common = {
        "max_length": d.max_length,
        "truncation": d.truncation,
        "padding_side": d.padding_side,
        "bucket_window": d.bucket_window,
        "rank": dist.rank,
        "world_size": dist.world_size,
    }
    train: TokenizedData | ExpertData
    if config.experts is not None:
        per_expert = {k: v for k, v in common.items() if k not in ("rank", "world_size")}
        train = ExpertData(
            open_source(d.train), formatter, tokenizer, route=expert_route(config), expert_field=config.experts.field,
            batch_size=t.batch_size, micro_batch_size=config.experts.micro_batch_size, shuffle=d.shuffle,
            seed=t.seed, rank=dist.rank, world_size=dist.world_size, name="data.train", **per_expert,
        )  # fmt: skip
    else:
        train = TokenizedData(
            open_source(d.train), formatter, tokenizer, batch_size=t.batch_size, shuffle=d.shuffle, seed=t.seed,
            name="data.train", **common,
        )  # fmt: skip
    evaluation = None
    if d.eval is not None:
        evaluation = TokenizedData(
            open_source(d.eval), formatter, tokenizer, batch_size=d.eval_batch_size or t.batch_size, shuffle=False,
            name="data.eval", **common,
        )  # fmt: skip
    return train, evaluation


def load_teachers(loss: CompositeLoss, config: RunConfig, device: torch.device) -> dict[str, Any]:
    from peftkit.models.loading import load_base

    teachers = {}
    for name in sorted(loss.teachers):
        dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
        teacher, _ = load_base(name, dtype=dtype, device=device)
        teacher.requires_grad_(False)
        teachers[name] = teacher.eval()
    return teachers


def prepare_run(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    evaluate: Evaluator | None = None,
    progress: bool = True,
    console: Console | None = None,
    dist: Distributed | None = None,
) -> Run:
    """Build model, data, loss, callbacks and trainer for ``config`` (nothing is trained yet)."""
    dist = dist or Distributed.from_environment(config.model.device)
    output = Path(config.output_dir)
    checkpoints = output / "checkpoints"
    if not resume and list_checkpoints(checkpoints):  # every process decides alike (one shared disk)
        if not overwrite:
            raise ValueError(
                f"{output} already holds checkpoints of a run: pass --resume to continue it, "
                "--overwrite to start over, or choose another output_dir"
            )
        dist.barrier()
        if dist.is_main:
            shutil.rmtree(checkpoints)
    dist.barrier()
    if config.training.eval_every and config.data.eval is None and evaluate is None:
        raise ValueError(f"training.eval_every={config.training.eval_every} needs data.eval (or an evaluate function)")
    seed_everything(config.training.seed)
    device = dist.device()
    model, tokenizer = build_model(config, device)
    if config.evaluation is not None:  # task metrics at the eval cadence (peftkit.evaluation)
        from peftkit.evaluation.training import task_evaluator

        evaluate = task_evaluator(config, tokenizer, evaluate)
    train, evaluation = build_data(config, tokenizer, dist)
    loss = CompositeLoss.from_config(config.loss)
    callbacks = [build_callback(c.name, c.options) for c in config.callbacks]
    config_text = dump_run_config(config)
    if dist.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(config_text)
        remove_stale_temporaries(checkpoints)
    trainer = Trainer(
        model,
        train,
        config.training,
        loss=loss,
        callbacks=callbacks,
        eval_data=evaluation,
        evaluate=evaluate,
        gradient_hooks=config.gradient_hooks,
        output_dir=output,
        config_text=config_text,
        dist=dist,
        teachers=load_teachers(loss, config, device),
        progress=progress,
        description="training",
        tensorboard=config.tensorboard,
        console=console,
    )
    return Run(config, model, tokenizer, trainer, train, dist)


def run_training(
    config: RunConfig,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    evaluate: Evaluator | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> TrainResult:
    """Train as ``config`` says; ``resume=True`` continues from the newest checkpoint in
    ``output_dir`` (or from the checkpoint folder given)."""
    console = console or Console()
    run = prepare_run(
        config, resume=bool(resume), overwrite=overwrite, evaluate=evaluate, progress=progress, console=console
    )
    try:
        start = None
        if resume:
            root = Path(config.output_dir) / "checkpoints"
            start = Path(resume) if isinstance(resume, str | Path) and not isinstance(resume, bool) else None
            start = start or latest_checkpoint(root)
            if start is None:
                raise ValueError(f"--resume: no complete checkpoint under {root}")
        if run.dist.is_main:
            describe_run(run, start, console)
        result = run.trainer.train(resume_from=start)
        if run.dist.is_main:
            summarise(run, result, console)
        return result
    finally:
        run.dist.close()


def describe_run(run: Run, start: Path | None, console: Console) -> None:
    c, t, stats = run.config, run.trainer, run.train_data.stats
    trainable, total = run.model.get_nb_trainable_parameters()
    adapters = ", ".join(f"{n} ({run.model.peft_config[n].peft_type})" for n in c.adapters)
    console.print(f"[bold]model[/] {c.model.name}  [bold]adapters[/] {adapters}")
    console.print(f"trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)")
    data = f"{stats.examples:,d} examples" if not run.train_data.streaming else "streamed"
    dropped = stats.dropped_too_long + stats.dropped_unlabelled
    if dropped:
        data += f" ({dropped} dropped: {stats.dropped_too_long} too long, {stats.dropped_unlabelled} unlabelled)"
    console.print(f"[bold]data[/] {run.train_data.source.name}: {data}, formatter {c.data.formatter}")
    if c.experts is not None:
        count = len(run.train_data.experts) if isinstance(run.train_data, ExpertData) else 0
        console.print(
            f"[bold]experts[/] {count} in bank {c.experts.bank!r} by field {c.experts.field!r}, each trained as if "
            "alone (own loss normalisation, clipping, schedule and optimiser state)"
        )
    tc = c.training
    warmup = f"{t.schedule.warmup} warmup" if isinstance(t.update, ParameterUpdate) else "per expert"
    console.print(
        f"[bold]steps[/] {t.state.total_steps}  [bold]batch[/] {tc.batch_size} × {tc.gradient_accumulation_steps} "
        f"accumulation  [bold]processes[/] {run.dist.world_size}  [bold]lr[/] {tc.lr:g} "
        f"({tc.scheduler}, {warmup})  [bold]output[/] {c.output_dir}"
    )
    if start is not None:
        console.print(f"[bold]resuming[/] from {start}")


def summarise(run: Run, result: TrainResult, console: Console) -> None:
    state = result.state
    table = Table(title="Training summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    stopped = f" (stopped: {state.stop_reason})" if state.stop_reason else ""
    table.add_row("steps", f"{state.step} / {state.total_steps}{stopped}")
    table.add_row("epochs", f"{state.epoch} complete")
    table.add_row("tokens", f"{state.tokens:,d} ({state.label_tokens:,d} labelled)")
    table.add_row("train time", f"{state.train_seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s this session")
    if result.losses:
        tail = result.losses[-10:]
        table.add_row("loss", f"first {result.losses[0]:.4f}, last-10 mean {sum(tail) / len(tail):.4f}")
    for key, value in result.eval_metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    output = Path(run.config.output_dir)
    table.add_row("adapter", str(output / "adapter"))
    table.add_row("checkpoint", str(state.last_checkpoint))
    table.add_row("metrics", f"{output / 'metrics.jsonl'}, {output / 'loss_curve.png'}")
    console.print(table)
