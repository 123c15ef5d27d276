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

``--rows fixed`` (default) cuts every row to exactly ``--seq-len`` tokens (no padding, as in the
reference numbers of shared/REFERENCE.md); ``--rows natural`` uses the demo's length-bucketed
batches of whole reviews (padding, as in real training).
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
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

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(args.seed)
    ours_base, tokenizer = load_base(args.model)
    from transformers import AutoModelForCausalLM

    theirs_base = AutoModelForCausalLM.from_pretrained(resolve_model_folder(args.model), dtype=torch.float32)
    ours = get_peft_model(ours_base, PromptTuningConfig(num_virtual_tokens=args.tokens))
    peft_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.tokens)
    theirs = peft.get_peft_model(theirs_base, peft_config)
    with torch.no_grad():  # the same starting soft prompt
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.adapters["default"].embedding.weight)

    total = args.warmup + args.steps
    batches = make_batches(tokenizer, args.rows, args.batch_size, args.seq_len, total, args.seed)
    config = TrainingConfig(lr=args.lr, max_steps=10**6, warmup_steps=0, scheduler="constant", max_grad_norm=1.0)
    trainer = Trainer(ours, batches, config, progress=False)
    ours.train()
    theirs.train()
    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def peftkit_step(batch: dict) -> float:
        return trainer.train_step([Batch.from_tensors(batch)])["train/loss"]

    def peft_step(batch: dict) -> float:
        out = theirs(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    runners = {"peftkit": peftkit_step, "peft": peft_step}
    times: dict[str, list[float]] = {name: [] for name in runners}
    losses: dict[str, list[float]] = {name: [] for name in runners}
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    print(f"{args.model}: {args.rows} rows, batch {args.batch_size}, {tokens[0]} tokens in the first batch; "
          f"{args.warmup} warm-up + {args.steps} measured steps each, {torch.get_num_threads()} threads")  # fmt: skip
    for step, batch in enumerate(batches):
        order = ["peftkit", "peft"] if step % 2 == 0 else ["peft", "peftkit"]
        line = []
        for name in order:
            start = time.perf_counter()
            losses[name].append(runners[name](batch))
            times[name].append(time.perf_counter() - start)
            line.append(f"{name} {times[name][-1]:.2f} s (loss {losses[name][-1]:.4f})")
        tag = "warm-up" if step < args.warmup else "measured"
        print(f"step {step + 1:3d}/{total} [{tag}]  " + "   ".join(line), flush=True)

    measured_tokens = sum(tokens[args.warmup :])
    result = {"settings": vars(args) | {"output": str(args.output)}, "threads": torch.get_num_threads()}
    for name in runners:
        seconds = times[name][args.warmup :]
        result[name] = {
            "tokens_per_second": measured_tokens / sum(seconds),
            "seconds_per_step_mean": statistics.mean(seconds),
            "seconds_per_step_median": statistics.median(seconds),
            "measured_steps": len(seconds),
            "measured_tokens": measured_tokens,
        }
    result["speedup"] = result["peftkit"]["tokens_per_second"] / result["peft"]["tokens_per_second"]
    result["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["peftkit"], losses["peft"], strict=True))
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{'':10s}{'tokens/s':>10s}{'s/step (median)':>18s}")
    for name in runners:
        print(f"{name:10s}{result[name]['tokens_per_second']:10.1f}{result[name]['seconds_per_step_median']:18.2f}")
    print(f"peftkit / PEFT throughput: {result['speedup']:.2f}x;  largest per-step loss difference: "
          f"{result['max_loss_difference']:.2e} (same batches, same start)")  # fmt: skip
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
