"""A run killed with SIGKILL and resumed with ``--resume`` ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftkit.training.checkpoint import list_checkpoints
from tests.training.conftest import run_yaml

REPO = Path(__file__).resolve().parents[2]


def environment():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def train_command(config, *extra):
    return [sys.executable, "-m", "peftkit.cli.main", "train", str(config), "--no-progress", *extra]


def last_logged_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


def comparable(metrics: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_second"} for r in records]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        run_yaml(tiny_folder, tmp_path / "unused", max_steps=40, checkpoint_every=5, gradient_accumulation_steps=2)
        + f"imports: [{REPO / 'tests' / 'training' / 'plugins.py'}]\n"
        + "callbacks: [{name: test_sleep, seconds: 0.05}]\n"
        + "gradient_hooks: {hooks: [norm, health]}\n"
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(
        train_command(config, f"output_dir={straight}"), env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr

    command = train_command(config, f"output_dir={killed}")
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while last_logged_step(killed / "metrics.jsonl") < 12 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = last_logged_step(killed / "metrics.jsonl")
    saved = list_checkpoints(killed / "checkpoints")
    assert 12 <= killed_at < 40 and saved and saved[-1] <= killed_at
    assert not (killed / "adapter").exists()

    resumed = subprocess.run(
        train_command(config, f"output_dir={killed}", "--resume"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {killed / 'checkpoints'}" in " ".join(resumed.stdout.split())

    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    actual = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all((expected[k] == actual[k]).all() for k in expected), "weights differ after resume"
    assert comparable(killed / "metrics.jsonl") == comparable(straight / "metrics.jsonl")
    print(f"killed at step {killed_at}, resumed from checkpoint step {saved[-1]}: bit-identical final weights")
