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
