"""The example configs in examples/evaluation/ are valid; the training one trains on a tiny model;
the sentiment one agrees with the demo's own accuracy on the real model."""

from pathlib import Path

import pytest
import torch

from peftkit.cli.main import main
from peftkit.evaluation.run import load_eval_config
from peftkit.training.overrides import load_run_config, read_config_tree

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "evaluation").glob("*.yaml"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"sentiment", "prompt_tuning_with_eval", "arithmetic", "json_extraction"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path):
    if "adapters" in read_config_tree(path):  # a training run config with an evaluation section
        config = load_run_config(path)
        assert config.evaluation is not None and config.output_dir.startswith("runs/")
        return
    # adapters trained by other examples may not exist here: evaluate the base model only
    config = load_eval_config(path, ["variants={zero-shot: base}", "training_run=null"])
    assert config.output_dir.startswith("runs/eval/")


def test_training_with_evaluation_runs_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = [
        f"model.name={tiny_folder}",
        f"adapters.default.tokenizer_name_or_path={tiny_folder}",
        "data.train.limit=24",
        "data.eval.limit=6",
        "training.max_steps=4",
        "training.eval_every=2",
        "training.checkpoint_every=2",
        f"output_dir={tmp_path}",
    ]
    assert main(["train", "examples/evaluation/prompt_tuning_with_eval.yaml", "--no-progress", *overrides]) == 0
    assert (tmp_path / "best" / "best.json").is_file()
    assert '"eval/accuracy"' in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.smollm2
def test_sentiment_zero_shot_matches_a_direct_computation(tmp_path, monkeypatch):
    """``peftkit eval`` on the real model: zero-shot accuracy equals comparing the two label tokens'
    next-token logits row by row (no batching, no padding, no evaluation code)."""
    from peftkit import load_base
    from peftkit.data.rotten_tomatoes import PROMPT_TEMPLATE, load_reviews, train_test_split
    from peftkit.evaluation.run import run_evaluation

    monkeypatch.chdir(ROOT)
    overrides = ["variants={zero-shot: base}", "training_run=null", "data.eval.limit=24", f"output_dir={tmp_path}"]
    report = run_evaluation(load_eval_config("examples/evaluation/sentiment.yaml", overrides), progress=False)
    _, test = train_test_split(load_reviews(), test_size=400, seed=0)
    model, tokenizer = load_base("smollm2-135m-instruct")
    positive, negative = tokenizer(" positive")["input_ids"][0], tokenizer(" negative")["input_ids"][0]
    correct = 0
    with torch.no_grad():
        for review in test[:24]:
            ids = tokenizer(PROMPT_TEMPLATE.format(text=review.text), return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, -1]
            predicted = "positive" if logits[positive] > logits[negative] else "negative"
            correct += predicted == review.label
    assert report.variants["zero-shot"].values["accuracy"] == pytest.approx(correct / 24)
