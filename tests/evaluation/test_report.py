"""Reports: JSON, Markdown and predictions written with the expected contents; PNGs are valid images."""

import json

import matplotlib.image
import pytest

from peftkit.evaluation import ChoicePredictor, EvalExample, Evaluation, Prediction
from peftkit.evaluation.plots import plot_training_curve
from peftkit.evaluation.report import EvaluationReport, VariantResult
from peftkit.evaluation.targets import evaluate_targets
from tests.conftest import CharTokenizer

GOLD = ["pos", "pos", "neg", "neg"]
PREDICTED = {"zero-shot": ["pos", "pos", "pos", "pos"], "tuned": ["pos", "neg", "neg", "neg"]}


def report(targets=("accuracy >= 0.7",)) -> EvaluationReport:
    examples = [EvalExample.from_text(f"review {i}", f" {g}") for i, g in enumerate(GOLD)]
    task = Evaluation(CharTokenizer(), examples, ChoicePredictor([" pos", " neg"]),
                      ["accuracy", "precision", "recall", "f1", "confusion_matrix"], targets=targets)  # fmt: skip
    variants = {}
    for name, predicted in PREDICTED.items():
        predictions = [
            Prediction(i, f" {g}", p, p, expected=g) for i, (g, p) in enumerate(zip(GOLD, predicted, strict=True))
        ]
        adapters = None if name == "zero-shot" else ("tuned",)
        variants[name] = VariantResult(name, adapters, predictions, task.score(predictions), seconds=2.0)
    values = {name: v.values for name, v in variants.items()}
    return EvaluationReport(
        variants, evaluate_targets(task.parsed_targets, values, ["zero-shot"]), ("pos", "neg"),
        [n for n, _ in task.specs], [e.prompt_text for e in examples], {"model": "tiny"},
    )  # fmt: skip


def test_values_and_targets():
    r = report(["accuracy >= 0.7", "f1/neg > 0.9"])
    assert r.variants["zero-shot"].values["accuracy"] == 0.5
    assert r.variants["tuned"].values["accuracy"] == 0.75
    # tuned: pos P=1/1 R=1/2, neg P=2/3 R=2/2 -> F1 pos 2/3, neg 4/5
    assert r.variants["tuned"].values["f1_macro"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert [(t.target.text, t.variant, t.passed) for t in r.targets] == [
        ("accuracy >= 0.7", "tuned", True),
        ("f1/neg > 0.9", "tuned", False),
    ]
    assert not r.passed and report([]).passed
    assert r.headline_keys() == ["accuracy", "precision_macro", "recall_macro", "f1_macro"]


def test_written_files(tmp_path):
    r = report()
    paths = r.write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_matrix.png", "metrics.png", "per_class.png", "predictions.jsonl", "report.json", "report.md",
    ]  # fmt: skip
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["model"] == "tiny" and data["examples"] == 4 and data["labels"] == ["pos", "neg"] and data["passed"]
    zero = data["variants"]["zero-shot"]
    assert zero["adapters"] is None and zero["values"]["precision/neg"] == 0.0
    assert zero["notes"] == ["precision/neg is undefined ('neg' never predicted): reported as 0"]
    assert zero["details"]["confusion_matrix"]["confusion_matrix"]["matrix"] == [[2, 0, 0], [2, 0, 0]]
    assert zero["examples_per_second"] == 2.0
    assert data["targets"] == [{"target": "accuracy >= 0.7", "variant": "tuned", "value": 0.75, "passed": True}]

    markdown = (tmp_path / "report.md").read_text()
    assert "| variant | accuracy | precision_macro | recall_macro | f1_macro | examples/s |" in markdown
    assert "| zero-shot | 0.5000 | 0.2500 | 0.5000 | 0.3333 | 2.0 |" in markdown
    assert "| `accuracy >= 0.7` | tuned | 0.7500 | PASS |" in markdown
    assert "| tuned | neg | 0.6667 | 1.0000 | 0.8000 | 2 |" in markdown
    assert "| tuned | *micro average* | 0.7500 | 0.7500 | 0.7500 | 4 |" in markdown
    assert "| gold \\ predicted | pos | neg |\n| --- | --- | --- |\n| pos | 1 | 1 |\n| neg | 0 | 2 |" in markdown
    assert "- zero-shot: precision/neg is undefined" in markdown and "![metrics](metrics.png)" in markdown

    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and lines[5] == {
        "variant": "tuned", "prompt": "review 1", "index": 1, "reference": " pos", "output": "neg", "answer": "neg",
        "parsed": True, "expected": "pos", "correct": False,
    }  # fmt: skip
    for name in ("metrics", "per class", "confusion matrices"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(paths[name]).shape
        assert height > 100 and width > 100


def test_failing_target_is_marked(tmp_path):
    r = report(["accuracy >= 0.9"])
    r.write(tmp_path, plots=False)
    assert "| `accuracy >= 0.9` | tuned | 0.7500 | **FAIL** |" in (tmp_path / "report.md").read_text()
    assert "**1 of 1 target checks fail.**" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "metrics.png").exists()


def test_training_curve(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "train/loss": 3 - s / 10} for s in range(1, 11)]
    records += [
        {"step": s, "eval/loss": 2.5 - s / 20, "eval/accuracy": 0.5 + s / 40, "eval/f1/pos": 0.1} for s in (5, 10)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = report().write(tmp_path / "out", training_run=run)
    curve = paths["training curve"]
    assert curve.name == "training_curve.png" and matplotlib.image.imread(curve).shape[1] > 1000  # two panels
    assert "![training curve](training_curve.png)" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_training_curve(tmp_path, tmp_path / "x.png")
