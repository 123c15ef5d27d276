"""``peftkit bench many-experts``: one bank of persona prompts vs HF PEFT one persona at a time.

Both sides train a ``tokens``-token soft prompt per persona on the persona benchmark's rows, with
the same epochs, the same batches (each persona's batches of ``batch_size`` rows, as its own run
reads them), AdamW at a constant learning rate and gradient clipping, from the same initial
prompts, in one process:

    peftkit   one PromptTuningConfig(expert_ids=personas) bank + ExpertData: every persona's k-th
              batch goes into step k, packed into micro-batches of ``micro_batch_size`` rows;
    HF PEFT   the seed's loop: for each persona, reset the prompt and the optimiser, then its
              batches one optimiser step at a time (batch 2: many tiny forward passes).

Reported: wall time, examples/s, the ratio, and the fraction of the machine's measured fp32
matmul peak each reaches; also each side's CPU time (``time.process_time``), which a shared,
noisy machine inflates far less than wall time (the two sides run one after the other).

FLOPs per processed token (a real or virtual token of a row, padding excluded) are ``4 × N`` with
``N`` the non-embedding parameters: forward ``2N``, backward ``2N`` for the input gradients through
the frozen weights (no weight gradients are computed for them); plus the output projection where a
label is, ``4 × V × D`` per labelled token. The attention scores (``O(L²)``) are left out: rows are
short. (The ``6N`` rule for full fine-tuning would add the weight gradients that frozen weights
never get; multiply the fractions by 1.5 to compare with it.)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.bench.common import load_average, train
from peftkit.bench.personas import persona_data
from peftkit.data.experts import ExpertData
from peftkit.data.formatters import get_formatter
from peftkit.data.sources import MemorySource
from peftkit.methods.base import IGNORE_INDEX
from peftkit.models.loading import DEFAULT_MODEL, load_base
from peftkit.training.config import TrainingConfig


@dataclass
class ManyExpertsSettings:
    """What ``peftkit bench many-experts`` runs (CLI flags of the same names)."""

    model: str = DEFAULT_MODEL
    personas: int = 16
    clusters: int = 5
    train_per_persona: int = 30
    epochs: int = 1
    tokens: int = 10
    lr: float = 3e-2
    batch_size: int = 2
    """Rows per optimiser step of each persona (the seed's setting, both sides)."""
    micro_batch_size: int = 8
    """peftkit: rows per forward pass when the personas' batches are packed together (a step's rows
    are sorted by length first; on a CPU 8 rows already run matmuls near the peak and pad less)."""
    matmul_size: int = 2048
    """Side of the square fp32 matmul that measures the machine's peak."""
    precision: str = "fp32"
    """peftkit's side: ``fp32`` or ``bf16`` (bfloat16 autocast, weights and optimiser fp32); HF PEFT
    runs fp32, its default."""
    seed: int = 0
    device: str = "auto"
    output: Path = Path("runs/bench-many-experts")
    progress: bool = False


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise RuntimeError(
            "bench many-experts compares against Hugging Face PEFT, which is not installed: "
            "pip install peft (it comes with peftkit's test extra: pip install -e '.[test]')"
        ) from None
    return peft


def matmul_peak(size: int, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """Best fp32 GFLOP/s of a ``size``³ matmul (``2·size³`` FLOPs) over ``repeats`` runs, per wall
    second and per CPU second of the process (on the CPU; on a GPU both are wall time).

    On the CPU the better of PyTorch's default (MKL) and oneDNN counts: peftkit runs its frozen
    matmuls through oneDNN (:mod:`peftkit.models.fast_linear`), which is faster on AMD processors.
    """
    from peftkit.models.fast_linear import _onednn, onednn_linear_available

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    kernels = [lambda: torch.mm(a, b)]
    if device.type == "cpu" and onednn_linear_available():
        kernels.append(lambda: _onednn(a, b.t(), None))
    wall = cpu = float("inf")
    for kernel in kernels:
        kernel()
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            kernel()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu if device.type == "cpu" else wall)
    return 2 * size**3 / wall / 1e9, 2 * size**3 / max(cpu, 1e-9) / 1e9


def flop_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(N, V·D)``: non-embedding parameters and the size of the output projection."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    n = total - embedding.numel() - (0 if head is embedding else head.numel())
    return n, head.numel()


def run_many_experts(settings: ManyExpertsSettings, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    peft = require_peft()
    s = settings
    data = persona_data(s.personas, s.clusters, s.train_per_persona, 1, seed=s.seed)
    ids = [p.id for p in data.personas]
    ours_base, tokenizer = load_base(s.model, device=s.device)
    theirs_base, _ = load_base(s.model, device=s.device)
    device = next(ours_base.parameters()).device
    peak, cpu_peak = matmul_peak(s.matmul_size, device)
    console.print(
        f"matmul peak: {peak:.1f} GFLOP/s fp32, {cpu_peak:.1f} per CPU second ({s.matmul_size}³; load {load_average()})"
    )

    torch.manual_seed(s.seed)
    ours = get_peft_model(ours_base, PromptTuningConfig(num_virtual_tokens=s.tokens, expert_ids=ids))
    start_table = ours.adapters["default"].table.detach().clone()  # (N, n, D)
    experts = ExpertData(
        MemorySource(data.train), get_formatter("prompt_completion"), tokenizer,
        route=lambda r: {"default": r["persona"]}, expert_field="persona", batch_size=s.batch_size,
        micro_batch_size=s.micro_batch_size, seed=s.seed,
    )  # fmt: skip
    steps = experts.steps(s.epochs, None)
    work = count_work(experts, steps, s.tokens)
    config = TrainingConfig(
        lr=s.lr, epochs=s.epochs, batch_size=s.batch_size, warmup_steps=0, scheduler="constant",
        max_grad_norm=1.0, seed=s.seed, eval_at_end=False, precision=s.precision,
    )  # fmt: skip
    load_before, cpu = load_average(), time.process_time()
    ours_seconds = train(ours, experts, config, s.progress)
    ours_cpu = time.process_time() - cpu
    console.print(
        f"peftkit ({s.precision}), one bank of {len(ids)}: {ours_seconds:.1f} s, {ours_cpu:.1f} CPU s "
        f"(load {load_before} -> {load_average()})"
    )

    load_before, cpu = load_average(), time.process_time()
    theirs_seconds, first_prompt = peft_one_at_a_time(peft, theirs_base, experts, steps, start_table, s)
    theirs_cpu = time.process_time() - cpu
    console.print(
        f"HF PEFT, one persona at a time: {theirs_seconds:.1f} s, {theirs_cpu:.1f} CPU s "
        f"(load {load_before} -> {load_average()})"
    )
    peak, cpu_peak = (max(x, y) for x, y in zip((peak, cpu_peak), matmul_peak(s.matmul_size, device), strict=True))

    n, head = flop_counts(ours_base)
    flops = 4 * n * work["tokens"] + 4 * head * work["labels"]
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "work": work,
        "flops_per_token": 4 * n,
        "non_embedding_params": n,
        "useful_gflop": flops / 1e9,
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_per_cpu_second": cpu_peak,
        "load_average": load_average(),
        "peftkit": side(ours_seconds, ours_cpu, work, flops, peak, cpu_peak),
        "peft": side(theirs_seconds, theirs_cpu, work, flops, peak, cpu_peak),
        "first_persona_prompt_max_abs_difference": float(
            (ours.adapters["default"].table[0].detach() - first_prompt).abs().max()
        ),
    }
    result["speedup"] = theirs_seconds / ours_seconds
    result["cpu_time_ratio"] = theirs_cpu / ours_cpu if ours_cpu else float("nan")
    s.output.mkdir(parents=True, exist_ok=True)
    (s.output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print_result(result, console)
    return result


def count_work(experts: ExpertData, steps: dict[str, int], tokens: int) -> dict[str, int]:
    """Rows, processed tokens (real + virtual, no padding) and labelled tokens over the whole run."""
    rows = real = labels = 0
    for expert, data in experts.experts.items():
        stream = data.batches()
        for _ in range(steps[expert]):
            batch = next(stream).tensors
            rows += batch["input_ids"].shape[0]
            real += int(batch["attention_mask"].sum())
            labels += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {"rows": rows, "tokens": real + rows * tokens, "labels": labels}


def peft_one_at_a_time(peft: Any, base, experts: ExpertData, steps: dict[str, int], start, s: ManyExpertsSettings):
    """The seed's loop; returns the wall time and the first persona's trained prompt."""
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.tokens)
    model = peft.get_peft_model(base, config)
    model.train()
    weight = model.prompt_encoder["default"].embedding.weight
    first = None
    begin = time.perf_counter()
    for row, (expert, data) in enumerate(experts.experts.items()):
        with torch.no_grad():
            weight.copy_(start[row])
        optimizer = torch.optim.AdamW([weight], lr=s.lr, weight_decay=0.0)
        stream = data.batches()
        for _ in range(steps[expert]):
            batch = {k: v.to(weight.device) for k, v in next(stream).tensors.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([weight], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if first is None:
            first = weight.detach().clone()
    return time.perf_counter() - begin, first


def side(seconds: float, cpu_seconds: float, work: dict, flops: float, peak: float, cpu_peak: float) -> dict:
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "examples_per_second": work["rows"] / seconds,
        "tokens_per_second": work["tokens"] / seconds,
        "gflops": flops / seconds / 1e9,
        "fraction_of_peak": flops / seconds / 1e9 / peak,
        "fraction_of_peak_per_cpu_second": flops / max(cpu_seconds, 1e-9) / 1e9 / cpu_peak,
    }


def print_result(result: dict[str, Any], console: Console) -> None:
    work = result["work"]
    console.print(
        f"{result['settings']['personas']} personas × {result['settings']['epochs']} epoch(s): {work['rows']} rows, "
        f"{work['tokens']:,} processed tokens, {result['useful_gflop']:.0f} GFLOP "
        f"({result['flops_per_token'] / 1e9:.2f} GFLOP/token + head at labels)"
    )
    for name in ("peftkit", "peft"):
        r = result[name]
        console.print(
            f"  {name:8s} {r['seconds']:8.1f} s  {r['examples_per_second']:6.2f} examples/s  "
            f"{r['tokens_per_second']:7.1f} tok/s  {r['gflops']:6.1f} GFLOP/s = {r['fraction_of_peak']:.1%} of "
            f"{result['matmul_peak_gflops']:.0f} GFLOP/s peak; {r['cpu_seconds']:.1f} CPU s = "
            f"{r['fraction_of_peak_per_cpu_second']:.1%} of the peak per CPU second "
            f"({result['matmul_peak_gflops_per_cpu_second']:.0f})"
        )
    console.print(
        f"peftkit / PEFT: [bold]{result['speedup']:.2f}×[/] wall time, {result['cpu_time_ratio']:.2f}× CPU time "
        f"(load {result['load_average']}); first persona's prompt "
        f"differs by at most {result['first_persona_prompt_max_abs_difference']:.1e} between the two"
    )
