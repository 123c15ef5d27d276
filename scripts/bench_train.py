"""Training throughput, peftkit against Hugging Face PEFT, side by side in one process.

Both libraries train a 20-token prompt-tuning soft prompt on SmolLM2-135M-Instruct (the embedded
model) with AdamW, gradient clipping and the same learning rate, on the *same* batches:
rotten_tomatoes reviews in the demo's template, the loss on the answer token only. Both soft prompts
start from the same values, so their losses must agree step for step (checked and reported: proof
that both do the same work). Steps alternate between the two libraries (peftkit first on even steps,
PEFT first on odd ones) so that a noisy shared machine slows both alike; the first ``--warmup``
steps of each are not timed.

peftkit's step is :meth:`peftkit.training.trainer.Trainer.train_step`, the loop ``peftkit train``
runs; PEFT's is the plain loop its documentation shows (forward with labels, backward, clip, step).

    python scripts/bench_train.py --batch-size 8 --steps 20            # writes runs/bench_train.json

``--precision bf16`` compares bf16 training: peftkit keeps fp32 weights under bf16 autocast
(``training.precision: bf16``; its CPU matmuls use a cached bf16 copy of each frozen weight, see
``peftkit/models/fast_linear.py``) while the soft prompt and AdamW stay fp32; PEFT runs each way a
PEFT user would pick for bf16, both measured: ``peft-autocast``
(fp32 model, forward under ``torch.autocast("cpu", torch.bfloat16)``) and ``peft-bf16`` (the model
loaded with ``dtype=torch.bfloat16``; PEFT's prompt stays fp32 and is cast to bf16 in its forward),
plus PEFT's default fp32 as a reference. bf16 rounding makes the libraries' losses drift apart,
so the loss agreement is only checked in fp32.

The run also measures this machine's matmul peak (a 2048x2048x2048 product, fp32 through both of
PyTorch's CPU backends, MKL and oneDNN, and bf16) and counts the FLOPs a train step needs: forward
plus the backward input gradients through the frozen weights (no weight gradients), attention's
causal half, the vocabulary projection at the labelled positions only. Each library's useful
GFLOP/s is printed as a fraction of the peak of its precision; PEFT's executed FLOPs (it projects
every position onto the vocabulary) are printed beside it.

``--rows fixed`` (default) cuts every row to exactly ``--seq-len`` tokens (no padding, as in the
reference numbers of shared/REFERENCE.md); ``--rows natural`` uses the demo's length-bucketed
batches of whole reviews (padding, as in real training).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.data.batching import batches_forever, collate, encode
from peftkit.data.pipeline import Batch
from peftkit.data.rotten_tomatoes import PROMPT_TEMPLATE, load_reviews, train_test_split
from peftkit.models.loading import load_base, resolve_model_folder
from peftkit.training.config import TrainingConfig
from peftkit.training.trainer import Trainer


def make_batches(tokenizer, rows: str, batch_size: int, seq_len: int, count: int, seed: int) -> list[dict]:
    train, _ = train_test_split(load_reviews(), seed=seed)
    examples = [encode(tokenizer, PROMPT_TEMPLATE.format(text=r.text), " " + r.label) for r in train]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if rows == "natural":
        stream = batches_forever(examples, batch_size, pad, seed=seed)
        return [next(stream) for _ in range(count)]
    long_enough = [e for e in examples if len(e) >= seq_len]
    needed = batch_size * count
    if len(long_enough) < needed:
        raise SystemExit(f"only {len(long_enough)} reviews have {seq_len} tokens; lower --seq-len or --steps")
    cut = [encode(tokenizer, PROMPT_TEMPLATE.format(text=train[i].text), " " + train[i].label, max_length=seq_len)
           for i, e in enumerate(examples) if len(e) >= seq_len][:needed]  # fmt: skip
    return [collate(cut[i : i + batch_size], pad) for i in range(0, needed, batch_size)]


def step_flops(config, batch: dict, virtual: int, all_positions: bool = False) -> float:
    """FLOPs of one soft-prompt train step: forward + input-gradient backward (2x the forward's matmuls;
    attention's backward 2x its forward), no weight gradients. ``all_positions``: the vocabulary
    projection at every position (what PEFT executes) instead of at the labelled ones only."""
    d, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    lengths = batch["attention_mask"].sum(-1) + virtual  # attended positions per row
    positions = float(lengths.sum())
    linear = 2 * (d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * inter)
    causal_pairs = float((lengths * (lengths + 1) / 2).sum())  # (query, key) pairs a causal mask keeps
    attention = 2 * 2 * heads * head_dim * causal_pairs  # QK^T and PV
    labelled = positions if all_positions else float((batch["labels"][:, 1:] != -100).sum())
    forward = layers * (linear * positions + attention) + 2 * d * vocab * labelled
    backward = layers * (linear * positions + 2 * attention) + 2 * d * vocab * labelled
    return forward + backward


def matmul_peak(n: int = 2048, repeats: int = 8) -> dict[str, float]:
    """GFLOP/s of an ``n``-cubed matmul: fp32 through MKL (torch.mm) and oneDNN, bf16 (torch.mm, oneDNN)."""

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 2 * n**3 / min(times) / 1e9  # the least disturbed run on a shared machine

    a, b = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a.bfloat16(), b.bfloat16()
    onednn = torch.ops.mkldnn._linear_pointwise
    return {
        "fp32_mkl": best(lambda: a @ b),
        "fp32_onednn": best(lambda: onednn(a, b, None, "none", [], "")),
        "bf16": best(lambda: a16 @ b16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row with --rows fixed")
    parser.add_argument("--rows", choices=["fixed", "natural"], default="fixed")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per library")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per library before measuring")
    parser.add_argument("--tokens", type=int, default=20, help="virtual tokens")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/bench_train.json"))
    args = parser.parse_args()

    import peft
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning)
    load_before = os.getloadavg()
    peak = matmul_peak()
    torch.manual_seed(args.seed)
    bf16 = args.precision == "bf16"
    ours_base, tokenizer = load_base(args.model)
    ours = get_peft_model(ours_base, PromptTuningConfig(num_virtual_tokens=args.tokens))
    folder = resolve_model_folder(args.model)
    peft_dtypes = {"peft": torch.float32} | (
        {"peft-autocast": torch.float32, "peft-bf16": torch.bfloat16} if bf16 else {}
    )
    theirs = {}
    for name, dtype in peft_dtypes.items():
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.tokens)
        theirs[name] = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), config)
        with torch.no_grad():  # the same starting soft prompt
            theirs[name].prompt_encoder["default"].embedding.weight.copy_(ours.adapters["default"].embedding.weight)
        theirs[name].train()

    total = args.warmup + args.steps
    batches = make_batches(tokenizer, args.rows, args.batch_size, args.seq_len, total, args.seed)
    config = TrainingConfig(lr=args.lr, max_steps=10**6, warmup_steps=0, scheduler="constant", max_grad_norm=1.0,
                            precision=args.precision)  # fmt: skip
    trainer = Trainer(ours, batches, config, progress=False)
    ours.train()

    def peft_runner(name: str):
        model = theirs[name]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        autocast = name == "peft-autocast"

        def step(batch: dict) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.item()

        return step

    def peftkit_step(batch: dict) -> float:
        return trainer.train_step([Batch.from_tensors(batch)])["train/loss"]

    runners = {"peftkit": peftkit_step} | {name: peft_runner(name) for name in theirs}
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}  # process CPU seconds (threads summed)
    losses: dict[str, list[float]] = {name: [] for name in runners}
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    print(f"{args.model}, {args.precision}: {args.rows} rows, batch {args.batch_size}, {tokens[0]} tokens in the first "
          f"batch; {args.warmup} warm-up + {args.steps} measured steps each, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load_before[0]:.2f}")  # fmt: skip
    for step, batch in enumerate(batches):
        order = names[step % len(names) :] + names[: step % len(names)]  # each library leads in turn
        line = []
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name].append(runners[name](batch))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            line.append(f"{name} {times[name][-1]:.2f} s (loss {losses[name][-1]:.4f})")
        tag = "warm-up" if step < args.warmup else "measured"
        print(f"step {step + 1:3d}/{total} [{tag}]  " + "   ".join(line), flush=True)

    peak_after = matmul_peak()
    peak = {k: max(v, peak_after[k]) for k, v in peak.items()}
    peak_fp32 = max(peak["fp32_mkl"], peak["fp32_onednn"])
    measured = batches[args.warmup :]
    measured_tokens = sum(tokens[args.warmup :])
    model_config = ours_base.config
    useful = sum(step_flops(model_config, b, args.tokens) for b in measured)
    executed_peft = sum(step_flops(model_config, b, args.tokens, all_positions=True) for b in measured)
    result = {
        "settings": vars(args) | {"output": str(args.output)},
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "peak_gflops": peak,
        "useful_gflop_per_step": useful / len(measured) / 1e9,
        "peft_executed_gflop_per_step": executed_peft / len(measured) / 1e9,
    }
    for name in runners:
        seconds = sum(times[name][args.warmup :])
        # Busy-machine view: CPU seconds per thread. Time spent waiting for a core does not count,
        # so this compares the work each library needs even when other processes share the cores.
        cpu_seconds = sum(cpu[name][args.warmup :]) / torch.get_num_threads()
        peak_here = peak["bf16"] if bf16 and name != "peft" else peak_fp32
        result[name] = {
            "what": RUNNER_DESCRIPTIONS[name if name != "peftkit" else f"peftkit-{args.precision}"],
            "tokens_per_second": measured_tokens / seconds,
            "seconds_per_step_mean": statistics.mean(times[name][args.warmup :]),
            "seconds_per_step_median": statistics.median(times[name][args.warmup :]),
            "measured_steps": args.steps,
            "measured_tokens": measured_tokens,
            "tokens_per_cpu_second": measured_tokens / cpu_seconds,
            "useful_gflops": useful / seconds / 1e9,
            "fraction_of_peak": useful / seconds / 1e9 / peak_here,
            "peak_used": "bf16" if peak_here == peak["bf16"] else "fp32",
        }
        if name.startswith("peft"):
            result[name]["executed_gflops"] = executed_peft / seconds / 1e9
            result[name]["executed_fraction_of_peak"] = executed_peft / seconds / 1e9 / peak_here
    for name in theirs:
        result[f"speedup_vs_{name}"] = result["peftkit"]["tokens_per_second"] / result[name]["tokens_per_second"]
        result[f"cpu_time_speedup_vs_{name}"] = (
            result["peftkit"]["tokens_per_cpu_second"] / result[name]["tokens_per_cpu_second"]
        )
    result["speedup"] = result["speedup_vs_peft"]
    compare = "peft" if not bf16 else "peft-bf16"
    result["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["peftkit"], losses[compare], strict=True))
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"matmul peak (2048^3): fp32 MKL {peak['fp32_mkl']:.0f}, fp32 oneDNN {peak['fp32_onednn']:.0f}, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s; a train step needs {result['useful_gflop_per_step']:.0f} GFLOP "
          f"(PEFT executes {result['peft_executed_gflop_per_step']:.0f})")  # fmt: skip
    print(f"{'':15s}{'tokens/s':>10s}{'tok/CPU-s':>10s}{'s/step (median)':>16s}{'useful GFLOP/s':>16s}"
          f"{'of peak':>9s}  what")  # fmt: skip
    for name in runners:
        r = result[name]
        print(f"{name:15s}{r['tokens_per_second']:10.1f}{r['tokens_per_cpu_second']:10.1f}"
              f"{r['seconds_per_step_median']:16.2f}{r['useful_gflops']:16.1f}"
              f"{r['fraction_of_peak']:8.0%} ({r['peak_used']})  {r['what']}")  # fmt: skip
    for name in theirs:
        print(f"peftkit / {name}: {result[f'speedup_vs_{name}']:.2f}x wall clock, "
              f"{result[f'cpu_time_speedup_vs_{name}']:.2f}x per CPU second")  # fmt: skip
    print(f"largest per-step loss difference peftkit vs {compare}: {result['max_loss_difference']:.2e} "
          f"(same batches, same start); load average {result['load_average']['end'][0]:.2f} at the end")  # fmt: skip
    print(f"written to {args.output}")


RUNNER_DESCRIPTIONS = {
    "peftkit-fp32": "fp32 model; Trainer.train_step",
    "peftkit-bf16": "fp32 model under bf16 autocast (cached bf16 weights), fp32 prompt + AdamW; Trainer.train_step",
    "peft": "PEFT default: fp32 model, forward(labels) / backward / clip / AdamW",
    "peft-autocast": "PEFT, fp32 model under torch.autocast(cpu, bf16)",
    "peft-bf16": "PEFT, model loaded in bf16 (prompt fp32, cast by PEFT)",
}


if __name__ == "__main__":
    main()
