"""``bench serve`` on a tiny model: every side runs on the same requests and the numbers add up."""

import json

import numpy as np
import pytest

from peftkit.bench.serve import percentile
from peftkit.cli.main import main
from tests.training.conftest import write_tiny_folder


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 37))])
@pytest.mark.parametrize("q", [0, 50, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert percentile(list(values), q) == pytest.approx(float(np.percentile(values, q)))


def test_every_side_runs_on_a_tiny_model(tmp_path):
    pytest.importorskip("peft")
    tiny = write_tiny_folder(tmp_path / "tiny")
    out = tmp_path / "bench"
    args = ["bench", "serve", "--model", str(tiny), "--output", str(out), "--requests", "3", "--tokens", "4",
            "--max-new-tokens", "5", "--prompt-words", "6", "--registered", "50", "--matmul-size", "128"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    for side in ("engine", "engine_cold", "base", "peft", "lora_distinct", "lora_shared"):
        assert result[side]["generated_tokens"] == 3 * 5  # end-of-sequence ignored: the same work everywhere
        assert result[side]["p50_latency_s"] <= result[side]["p99_latency_s"] <= result[side]["seconds"] + 1e-6
    assert result["speedup_vs_peft"] == pytest.approx(
        result["engine"]["tokens_per_second"] / result["peft"]["tokens_per_second"]
    )
    assert (out / "table.md").read_text().count("\n") == 2 + 6  # header, rule, six runs
    registry = result["registry"]
    assert registry["experts"] == 50
    # the bank's table: 50 experts × 4 virtual tokens × the hidden size × 4 bytes
    assert registry["tensor_mb"] * 2**20 == pytest.approx(50 * 4 * 32 * 4)
