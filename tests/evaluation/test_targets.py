"""Quality targets: parsing, pass/fail, and which variants they apply to."""

import pytest

from peftkit.evaluation.targets import Target, check_targets, evaluate_targets, parse_target


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("f1_macro >= 0.8", Target("f1_macro", ">=", 0.8)),
        ("accuracy>=80%", Target("accuracy", ">=", 0.8)),
        ("f1/positive > .5", Target("f1/positive", ">", 0.5)),
        ("  perplexity < 12.5 ", Target("perplexity", "<", 12.5)),
        ("mean_log_likelihood <= -1e-1", Target("mean_log_likelihood", "<=", -0.1)),
    ],
)
def test_parse_strings(text, target):
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["accuracy = 0.8", "accuracy >= high", "accuracy", ">= 0.8", "acc >= 0.8 0.9"])
def test_bad_strings(text):
    with pytest.raises(ValueError, match="must look like 'metric op value'"):
        parse_target(text)


def test_parse_mappings():
    assert parse_target({"metric": "accuracy", "op": ">", "value": 0.5, "variants": "tuned"}) == Target(
        "accuracy", ">", 0.5, ("tuned",)
    )
    with pytest.raises(ValueError, match="needs metric, op, value"):
        parse_target({"metric": "accuracy", "value": 0.5})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['min'\]"):
        parse_target({"metric": "accuracy", "op": ">", "value": 0.5, "min": 1})
    with pytest.raises(ValueError, match="operator '=>' is not one of"):
        parse_target({"metric": "accuracy", "op": "=>", "value": 0.5})
    with pytest.raises(ValueError, match="value must be a number"):
        parse_target({"metric": "accuracy", "op": ">", "value": "high"})


def test_holds():
    target = parse_target("accuracy >= 0.8")
    assert target.holds(0.8) and target.holds(0.95) and not target.holds(0.79)
    assert not target.holds(None) and not target.holds(float("nan"))
    assert parse_target("perplexity < 10").holds(9.99) and not parse_target("perplexity < 10").holds(10)


def test_unknown_metric_or_variant_is_an_error():
    targets = [parse_target("f1_macr >= 0.8"), Target("accuracy", ">=", 0.5, ("tuned", "other"))]
    with pytest.raises(ValueError, match="no metric reports") as info:
        check_targets(targets, ["accuracy", "f1_macro"], ["base", "tuned"])
    message = str(info.value)
    assert (
        "target 'f1_macr >= 0.8': no metric reports 'f1_macr'; the configured metrics report: accuracy, f1_macro"
        in message
    )
    assert "unknown variant(s) ['other']" in message


def test_targets_apply_to_adapters_not_the_baseline():
    values = {"zero-shot": {"accuracy": 0.5}, "tuned": {"accuracy": 0.85}, "other": {"accuracy": 0.7}}
    results = evaluate_targets([parse_target("accuracy >= 0.8")], values, base_variants=["zero-shot"])
    assert [(r.variant, r.value, r.passed) for r in results] == [("tuned", 0.85, True), ("other", 0.7, False)]
    only_base = evaluate_targets([parse_target("accuracy >= 0.4")], {"zero-shot": {"accuracy": 0.5}}, ["zero-shot"])
    assert [(r.variant, r.passed) for r in only_base] == [("zero-shot", True)]
    explicit = evaluate_targets([Target("accuracy", "<", 0.6, ("zero-shot",))], values, ["zero-shot"])
    assert [(r.variant, r.passed) for r in explicit] == [("zero-shot", True)]
    undefined = evaluate_targets([parse_target("accuracy >= 0")], {"tuned": {"accuracy": None}})
    assert undefined[0].passed is False
