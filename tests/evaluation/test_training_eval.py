"""Evaluation during training: task metrics at the eval cadence, early stopping on them, the best
checkpoint kept (and the config checks that make that possible)."""

import json

import pytest

from peftkit import PeftModel, load_base
from peftkit.cli.main import main
from peftkit.data.formatters import get_formatter
from peftkit.evaluation import ChoicePredictor, Evaluation, examples_from_records
from peftkit.training.callbacks import BestCheckpoint, TrainerState
from peftkit.training.checkpoint import list_checkpoints
from peftkit.training.overrides import load_run_config
from tests.evaluation.conftest import CHOICES, records


def run_config(tiny_folder, output, extra=""):
    return (
        f"model: {{name: {tiny_folder}}}\n"
        "adapters: {default: {peft_type: PROMPT_TUNING, num_virtual_tokens: 4}}\n"
        f"data: {{train: {tiny_folder / 'train.jsonl'}, eval: {{path: {tiny_folder / 'train.jsonl'}, limit: 16}}}}\n"
        "training: {lr: 0.3, max_steps: 30, batch_size: 8, warmup_steps: 0, eval_every: 2, checkpoint_every: 2}\n"
        f"evaluation: {{prediction: {{choices: {json.dumps(CHOICES)}}}, metrics: [accuracy, f1]}}\n"
        "callbacks:\n"
        "  - {name: early_stopping, metric: eval/accuracy, mode: max, patience: 2}\n"
        "  - {name: best_checkpoint, metric: eval/accuracy, mode: max}\n"
        f"output_dir: {output}\n{extra}"
    )


def test_early_stopping_and_best_checkpoint_on_task_metrics(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    path = tmp_path / "run.yaml"
    path.write_text(run_config(tiny_folder, tmp_path / "out"))
    assert main(["train", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == list(range(2, 2 * len(evals) + 1, 2))
    assert {"eval/loss", "eval/accuracy", "eval/f1_macro", "eval/f1_micro"} <= set(evals[0])
    assert not any(key.startswith("eval/f1/") for key in evals[0])  # per-class values only with per_class
    # early stopping: the run ended before max_steps, `patience` evaluations after the last improvement
    accuracies = [r["eval/accuracy"] for r in evals]
    best_index = accuracies.index(max(accuracies))
    assert len(evals) == best_index + 1 + 2 and evals[-1]["step"] < 30
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"metric": "eval/accuracy", "value": max(accuracies), "step": evals[best_index]["step"],
                    "checkpoint": f"step-{evals[best_index]['step']:06d}"}  # fmt: skip
    assert (out / "best" / "training_state.safetensors").is_file()
    assert list_checkpoints(out / "checkpoints")[-1] == evals[-1]["step"]
    # the kept adapter really is the one that scored best: evaluate it again, independently
    base, tokenizer = load_base(tiny_folder)
    model = PeftModel.from_pretrained(base, out / "best" / "adapter")
    examples = examples_from_records(records(tiny_folder, 16), get_formatter("prompt_completion"))
    again = Evaluation(tokenizer, examples, ChoicePredictor(CHOICES), ["accuracy"]).run(model, progress=False)
    assert again.values["accuracy"] == pytest.approx(best["value"])


def test_best_checkpoint_keeps_the_best_of_several(tmp_path):
    root = tmp_path / "checkpoints"
    callback = BestCheckpoint(metric="eval/accuracy", mode="max")
    state = TrainerState()
    for step, value in [(2, 0.5), (4, 0.7), (6, 0.6), (8, 0.7)]:
        state.step = step
        callback.on_evaluate(state, {"eval/accuracy": value, "eval/loss": 1.0})
        checkpoint = root / f"step-{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "marker").write_text(str(step))
        callback.on_checkpoint(state, checkpoint)
    assert (tmp_path / "best" / "marker").read_text() == "4"  # 0.7 again at step 8 is no improvement
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
    assert callback.state_dict() == {"best": 0.7, "best_step": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints"]  # no temporary left
    with pytest.raises(ValueError, match=r"metric 'eval/acc' is not among the evaluation results \(eval/loss\)"):
        BestCheckpoint(metric="eval/acc").on_evaluate(state, {"eval/loss": 1.0})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"training": "{eval_every: 3, checkpoint_every: 2}"},
            "training.checkpoint_every (2) must divide training.eval_every (3)",
        ),
        ({"evaluation": "{prediction: {choices: [' w100', ' w101']}, metrics: [acuracy]}"}, "unknown metric 'acuracy'"),
        ({"evaluation": "{prediction: {parser: number}, metrics: [f1]}"}, "metric 'f1' needs a label set"),
        ({"data": "{train: x.jsonl}"}, "evaluation needs data.eval"),
    ],
)
def test_config_errors(tiny_folder, tmp_path, edit, message):
    text = run_config(tiny_folder, tmp_path / "out")
    for key, value in edit.items():
        lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("train: x.jsonl", f"train: {tmp_path / 'x.jsonl'}"))
    with pytest.raises(ValueError, match="invalid training config") as info:
        load_run_config(path)
    assert message in " ".join(str(info.value).split())
