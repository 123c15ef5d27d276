"""Training speed on a quiet machine and beside a busy neighbour, under old and new OpenMP settings.

Each cell is a fresh subprocess that trains the demo's soft prompt (SmolLM2-135M-Instruct, 20 virtual
tokens, AdamW, rows of ``--seq-len`` review tokens) for ``--warmup`` untimed and ``--steps`` timed
optimiser steps through ``Trainer.train_step``, and prints its tokens/s. The settings:

* ``old``: torch's defaults, as before peftkit set any: libgomp's idle threads spin (torch is
  imported before peftkit, so peftkit's default cannot reach libgomp), one thread per core;
* ``new``: peftkit's defaults (``OMP_WAIT_POLICY=PASSIVE``, set when peftkit is imported first),
  one thread per core;
* ``1-thread``: PASSIVE and ``torch.set_num_threads(1)`` (the alternative considered).

The neighbour is a plain Python busy loop pinned to core 0 with ``os.sched_setaffinity`` (the
trainer is not pinned); it stops by itself after ``--neighbour-limit`` seconds in any case.

    python scripts/busy_machine.py                      # prints the table, writes runs/busy_machine.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("old", "new", "1-thread")
NEIGHBOUR = """
import os, sys, time
os.sched_setaffinity(0, {0})
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    pass
"""


def worker(args: argparse.Namespace) -> None:
    """One measurement, in this (fresh) process."""
    if args.setting == "old":
        import torch  # (first: libgomp loads with its own defaults, before peftkit's)
    import peftkit  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE unless torch came first)

    # isort: split
    import torch

    if args.setting == "1-thread":
        torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train import make_batches

    from peftkit import PromptTuningConfig, get_peft_model
    from peftkit.data.pipeline import Batch
    from peftkit.models.loading import load_base
    from peftkit.training.config import TrainingConfig
    from peftkit.training.trainer import Trainer

    torch.manual_seed(0)
    base, tokenizer = load_base(args.model)
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=20))
    batches = make_batches(tokenizer, "fixed", args.batch_size, args.seq_len, args.warmup + args.steps, 0)
    config = TrainingConfig(lr=1e-2, max_steps=10**6, warmup_steps=0, scheduler="constant", max_grad_norm=1.0)
    trainer = Trainer(model, batches, config, progress=False)
    model.train()
    seconds = 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        trainer.train_step([Batch.from_tensors(batch)])
        if i >= args.warmup:
            seconds += time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[args.warmup :])
    print(json.dumps({"tokens_per_second": tokens / seconds, "threads": torch.get_num_threads()}))


def measure(args: argparse.Namespace, setting: str, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    command = [sys.executable, __file__, "--worker", "--setting", setting, "--model", args.model]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    command += ["--seq-len", str(args.seq_len)]
    neighbour = None
    if busy:
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(args.neighbour_limit)])
    load = os.getloadavg()[0]
    try:
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.neighbour_limit)
    except subprocess.TimeoutExpired:
        return {"setting": setting, "busy": busy, "tokens_per_second": None, "load_1min": load, "error": "timeout"}
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if out.returncode:
        raise SystemExit(f"{setting} worker failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"setting": setting, "busy": busy, **result, "load_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per cell")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over every cell (the best is kept)")
    parser.add_argument("--neighbour-limit", type=float, default=900.0, help="seconds; also each cell's timeout")
    parser.add_argument("--output", type=Path, default=Path("runs/busy_machine.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"{os.cpu_count()} CPUs; {args.batch_size} rows x {args.seq_len} tokens (+20 virtual), "
          f"{args.warmup} warm-up + {args.steps} timed steps per cell")  # fmt: skip
    runs = []
    for _ in range(args.repeats):  # interleaved, so slow drifts of the machine's load hit every cell
        for busy in (False, True):
            for setting in args.settings:
                runs.append(measure(args, setting, busy))
                r = runs[-1]
                print(f"  {setting:9s} {'busy' if busy else 'quiet':5s} {r['tokens_per_second'] or 0:7.1f} tok/s  "
                      f"(load {r['load_1min']:.2f})", flush=True)  # fmt: skip

    def best(setting: str, busy: bool) -> dict:
        cells = [r for r in runs if r["setting"] == setting and r["busy"] == busy and r["tokens_per_second"]]
        return max(cells, key=lambda r: r["tokens_per_second"], default={"tokens_per_second": None, "load_1min": 0})

    print()
    print("| setting | quiet tok/s | one core busy tok/s | busy / quiet |")
    print("|---|---|---|---|")
    table = []
    for setting in args.settings:
        quiet, busy = best(setting, False), best(setting, True)
        q, b = quiet["tokens_per_second"], busy["tokens_per_second"]
        ratio = f"{b / q:.2f}" if q and b else "-"
        q_load, b_load = quiet["load_1min"], busy["load_1min"]
        print(f"| {setting} | {q or 0:.1f} (load {q_load:.1f}) | {b or 0:.1f} (load {b_load:.1f}) | {ratio} |")
        table.append({"setting": setting, "quiet": q, "busy": b})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                       "table": table}, indent=2) + "\n")  # fmt: skip
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
