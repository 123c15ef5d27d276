"""Metrics per expert: each group routed to its own row of the bank, against single-prompt models."""

import pytest
import torch

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.evaluation.evaluator import Evaluation
from peftkit.evaluation.experts import evaluate_per_expert, expert_groups
from peftkit.evaluation.predictors import ChoicePredictor
from peftkit.evaluation.records import EvalExample
from tests.conftest import CharTokenizer, tiny_model

USERS = ["ann", "bob", "cy"]


def records():
    texts = ["abc", "bcd", "cde", "def", "efg", "fgh", "ghab", "habc", "aabb"]
    return [{"text": t, "label": "xy"[i % 2], "user": USERS[i % 3]} for i, t in enumerate(texts)]


def task(rows):
    examples = [EvalExample.from_text(r["text"], r["label"]) for r in rows]
    return Evaluation(CharTokenizer(), examples, ChoicePredictor(["x", "y"]), ["accuracy", "mean_log_likelihood"])


def test_each_group_is_scored_with_its_own_expert():
    torch.manual_seed(0)
    bank = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=3, expert_ids=USERS[:2]))
    with torch.no_grad():
        bank.adapters["default"].table.normal_(0, 2.0)
    rows = records()
    breakdown = evaluate_per_expert(task(rows), bank, expert_groups(rows, "user"), adapters="default")
    assert breakdown.levels == {"ann": "expert", "bob": "expert", "cy": "fallback"}
    assert breakdown.examples == {"ann": 3, "bob": 3, "cy": 3}
    for row, user in enumerate(USERS):
        mine = [r for r in rows if r["user"] == user]
        if user == "cy":  # not in the bank: evaluated without it (the base model here)
            base = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=3))
            expected = task(mine).run(base, adapters=None, progress=False).values
        else:
            torch.manual_seed(0)
            single = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=3))
            with torch.no_grad():
                single.adapters["default"].embedding.weight.copy_(bank.adapters["default"].table[row])
            expected = task(mine).run(single, progress=False).values
        assert breakdown.values[user]["accuracy"] == pytest.approx(expected["accuracy"])
        assert breakdown.values[user]["mean_log_likelihood"] == pytest.approx(expected["mean_log_likelihood"], rel=1e-5)
    summary = breakdown.summary()["accuracy"]
    values = [breakdown.values[u]["accuracy"] for u in USERS]
    assert summary["mean"] == pytest.approx(sum(values) / 3)
    assert summary["std"] == pytest.approx(float(torch.tensor(values).std(unbiased=False)))


def test_a_record_without_the_field_is_an_error():
    with pytest.raises(ValueError, match=r"record 1 has no 'user'"):
        expert_groups([{"user": "a"}, {"text": "b"}], "user")


def test_eval_command_reports_mean_and_std_per_expert(tmp_path, capsys):
    import json

    from peftkit.cli.main import main
    from peftkit.models.loading import load_base
    from tests.training.conftest import write_tiny_folder

    tiny = write_tiny_folder(tmp_path / "tiny")
    base, _ = load_base(str(tiny), device="cpu")
    torch.manual_seed(0)
    bank = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=2, expert_ids=["u0", "u1"]))
    bank.save_pretrained(tmp_path / "bank")
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()][:12]
    with open(tmp_path / "eval.jsonl", "w") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps({**row, "user": f"u{i % 3}"}) + "\n")  # u2 is not in the bank
    code = main([
        "eval", f"model.name={tiny}", "model.device=cpu", f"data.eval={tmp_path / 'eval.jsonl'}",
        "prediction.choices=[' w100', ' w101', ' w102', ' w103', ' w104']", "metrics=[accuracy]",
        f"variants={{base: base, bank: {tmp_path / 'bank'}}}", "experts.field=user", f"output_dir={tmp_path / 'out'}",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().out
    assert "Per user: mean ± std over 3" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "per_expert.json").read_text())
    assert report["bank"]["levels"] == {"u0": "expert", "u1": "expert", "u2": "fallback"}
    assert report["base"]["levels"] == {"u0": "base", "u1": "base", "u2": "base"}
    assert report["bank"]["summary"]["accuracy"]["experts"] == 3
    # u2 has no expert in the bank: it is scored exactly as the base model scores it
    assert report["bank"]["per_expert"]["u2"] == report["base"]["per_expert"]["u2"]
