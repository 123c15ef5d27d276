"""CUDA checks for a machine with a GPU (``bash scripts/gpu_check.sh``): a few minutes end to end.

1. train on CUDA (the Python API with ``device="cuda"``), 8 steps, checkpoint at step 4;
2. resume: the CUDA checkpoint on the CPU, and a CPU checkpoint on CUDA, each to step 8; the
   weights must agree with the uninterrupted run (tolerance: CPU and GPU kernels round differently);
3. eval on CUDA: choice scoring of the trained adapter; predictions equal the CPU's;
4. bf16 against fp32 on CUDA: logits, and the loss curve of the same 8 steps;
5. ``peftkit demo --device cuda`` (shortened), on SmolLM2 when it is cached, else the tiny model.

It prints one line per check and exits non-zero if any fails. Needs a CUDA GPU; never run in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from peftkit import PromptTuningConfig, get_peft_model  # noqa: E402
from peftkit.data.formatters import get_formatter  # noqa: E402
from peftkit.data.pipeline import TokenizedData  # noqa: E402
from peftkit.data.sources import MemorySource  # noqa: E402
from peftkit.models.loading import load_base  # noqa: E402
from peftkit.training.config import TrainingConfig  # noqa: E402
from peftkit.training.trainer import Trainer  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random Llama and a word-level tokenizer, saved as a local HF folder (no download)."""
    from tests.training.conftest import write_tiny_folder

    return write_tiny_folder(folder)


def records(n: int) -> list[dict[str, str]]:
    words = ["w5", "w9", "w13", "w21", "w30", "w42", "w55"]
    return [
        {"prompt": " ".join(words[(i + k) % 7] for k in range(2 + i % 5)), "completion": f" w{100 + i % 3}"}
        for i in range(n)
    ]


def make_trainer(model_name: str, device: str, output: Path, steps: int, precision: str = "fp32") -> Trainer:
    torch.manual_seed(0)
    base, tokenizer = load_base(model_name, device=device)
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4))
    data = TokenizedData(MemorySource(records(64)), get_formatter("prompt_completion"), tokenizer, batch_size=8, seed=0)
    config = TrainingConfig(
        lr=1e-2, max_steps=steps, batch_size=8, checkpoint_every=4, warmup_steps=2, precision=precision
    )
    return Trainer(model, data, config, output_dir=output, progress=False)


def prompt(trainer: Trainer) -> torch.Tensor:
    return trainer.model.adapters["default"].embedding.weight.detach().float().cpu()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="gpu_check_")))
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to try this script itself")
    parser.add_argument("--demo-steps", type=int, default=60)
    args = parser.parse_args()
    gpu = args.device
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU is visible: nothing to check here (this script is for a GPU machine)")
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if gpu.startswith("cuda") else "CPU (script check only)"
    print(f"torch {torch.__version__}, {name}; output in {out}", flush=True)
    tiny = str(tiny_model_folder(out / "tiny"))

    # 1-2. train on CUDA; resume across devices
    start = time.perf_counter()
    straight = make_trainer(tiny, gpu, out / "cuda_straight", 8)
    straight.train()
    check(
        "train on cuda",
        straight.model.base_model.device.type == torch.device(gpu).type,
        f"8 steps in {time.perf_counter() - start:.1f} s, last loss {straight.result.losses[-1]:.4f}",
    )
    cpu_straight = make_trainer(tiny, "cpu", out / "cpu_straight", 8)
    cpu_straight.train()
    diff = float((prompt(straight) - prompt(cpu_straight)).abs().max())
    check("cuda run equals cpu run", diff < 1e-3, f"max |Δ prompt| {diff:.2e}")
    for written, resumed_on in (("cuda", "cpu"), ("cpu", "cuda")):
        source = out / f"{written}_straight" / "checkpoints" / "step-000004"
        resumed = make_trainer(tiny, gpu if resumed_on == "cuda" else "cpu", out / f"{written}_to_{resumed_on}", 8)
        resumed.train(resume_from=source)
        reference = straight if resumed_on == "cuda" else cpu_straight
        diff = float((prompt(resumed) - prompt(reference)).abs().max())
        check(
            f"checkpoint written on {written} resumes on {resumed_on}",
            resumed.state.step == 8 and diff < 1e-3,
            f"step {resumed.state.step}, max |Δ prompt| vs straight {diff:.2e}",
        )

    # 3. eval on CUDA equals eval on CPU
    from peftkit.evaluation import compare_choices
    from peftkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(Path(tiny))
    prompts = [r["prompt"] for r in records(40)]
    references = [r["completion"].strip() for r in records(40)]
    choices = [" w100", " w101", " w102"]
    reports = {}
    for key, trainer in (("cuda", straight), ("cpu", cpu_straight)):
        trainer.model.eval()
        reports[key] = compare_choices(
            trainer.model,
            tokenizer,
            prompts=prompts,
            references=references,
            choices=choices,
            variants={"tuned": "default"},
            metrics=("accuracy",),
            progress=False,
        )
    cuda_acc = reports["cuda"].variants["tuned"].values["accuracy"]
    cpu_acc = reports["cpu"].variants["tuned"].values["accuracy"]
    check("eval on cuda", abs(cuda_acc - cpu_acc) < 1e-9, f"accuracy cuda {cuda_acc:.4f}, cpu {cpu_acc:.4f}")

    # 4. bf16 against fp32 on CUDA
    fp32 = make_trainer(tiny, gpu, out / "fp32", 8)
    fp32.train()
    bf16 = make_trainer(tiny, gpu, out / "bf16", 8, precision="bf16")
    bf16.train()
    gap = max(abs(a - b) / abs(a) for a, b in zip(fp32.result.losses, bf16.result.losses, strict=True))
    check("bf16 loss curve agrees with fp32", gap < 0.02, f"largest relative loss gap over 8 steps {gap:.2%}")

    # 5. the demo on CUDA
    from peftkit.models.loading import EMBEDDED_MODELS, cache_folder, cache_problem

    model = "smollm2-135m-instruct"
    cached = cache_problem(cache_folder(EMBEDDED_MODELS[model])) is None
    demo_model = model if cached else tiny
    command = [
        sys.executable,
        "-m",
        "peftkit.cli.main",
        "demo",
        "--device",
        gpu,
        "--model",
        demo_model,
        "--steps",
        str(args.demo_steps),
        "--test-size",
        "100",
        "--output",
        str(out / "demo"),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = out / "demo" / "demo.json"
    detail = f"{demo_model}, exit {done.returncode}, {time.perf_counter() - start:.0f} s"
    if summary.is_file():
        result = json.loads(summary.read_text())
        zero, tuned = result["zero_shot_accuracy"], result["tuned_accuracy"]
        detail += f", zero-shot {zero:.2%} -> tuned {tuned:.2%}, {result['train_tokens_per_second']:.0f} tok/s"
    else:
        detail += f": {done.stderr[-500:] or done.stdout[-500:]}"
    check("demo on cuda", done.returncode == 0, detail)

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
