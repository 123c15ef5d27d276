"""``bench many-experts`` on a tiny model: both sides run, the numbers are computed, PEFT is optional."""

import json
import sys

import pytest

from peftkit.bench.many_experts import flop_counts, require_peft
from peftkit.cli.main import main
from tests.conftest import tiny_model
from tests.training.conftest import write_tiny_folder


def test_flop_count_excludes_the_tied_embedding():
    model = tiny_model("llama")
    n, head = flop_counts(model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert n == total - embedding - (0 if tied else head)
    assert head == 128 * 32


def test_missing_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(RuntimeError, match="pip install peft"):
        require_peft()


def test_both_sides_run_on_a_tiny_model(tmp_path):
    pytest.importorskip("peft")
    tiny = write_tiny_folder(tmp_path / "tiny")
    out = tmp_path / "bench"
    args = ["bench", "many-experts", "--model", str(tiny), "--output", str(out), "--device", "cpu",
            "--personas", "3", "--clusters", "3", "--train-per-persona", "4", "--matmul-size", "128"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["work"]["rows"] == 12  # 3 personas × 4 rows × 1 epoch
    for side in ("peftkit", "peft"):
        assert result[side]["seconds"] > 0 and result[side]["fraction_of_peak"] > 0
    assert result["speedup"] == pytest.approx(result["peft"]["seconds"] / result["peftkit"]["seconds"])
