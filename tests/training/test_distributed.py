"""``torchrun --nproc_per_node=2`` gives the adapter one process gives on the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.conftest import run_yaml

REPO = Path(__file__).resolve().parents[2]


def environment():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    # 47 rows in global batches of 10 (5 + 5 rows per process), 2 micro-batches per step: 5 steps run
    # two epochs, and each epoch's short last batch (7 rows) splits 4 + 3.
    settings = {"max_steps": 5, "batch_size": 10, "gradient_accumulation_steps": 2}
    config.write_text(run_yaml(tiny_folder, tmp_path / "unused", **settings))
    train = ["-m", "peftkit.cli.main", "train", str(config), "--no-progress", "data.train.limit=47"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, *train, f"output_dir={one}"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stdout + single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run(
        [*launcher, *train, f"output_dir={two}"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert double.returncode == 0, double.stdout + double.stderr
    assert "processes 2" in double.stdout and double.stdout.count("Training summary") == 1  # rank 0 reports

    a = load_file(one / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    b = load_file(two / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    difference = (a - b).abs().max().item()
    assert difference <= 1e-5, difference
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    print(f"max |w_1proc - w_2proc| = {difference:.2e} over {a.numel()} adapter weights")
