"""Evaluation on tiny models: comparisons match a direct computation, one row at a time."""

import pytest
import torch

from peftkit import PeftModel, PromptTuningConfig, get_peft_model, load_base
from peftkit.data.formatters import get_formatter
from peftkit.evaluation import (
    ChoicePredictor,
    DecodingSettings,
    EvalExample,
    Evaluation,
    GenerationPredictor,
    compare_choices,
    examples_from_records,
    variant_scope,
)
from peftkit.evaluation.parsers import build_parser
from tests.conftest import CharTokenizer, tiny_model
from tests.evaluation.conftest import CHOICES, records, save_adapter

PROMPTS = ["hello there", "abc", "a much longer prompt than the others", "zz", "mid size", "q"]
GOLD = ["x", "y", "x", "y", "y", "x"]


def two_adapter_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=5))
    return model.eval()


def direct_predictions(model, tokenizer, adapters):
    """argmax over the choices' next-token logits, one prompt at a time, no batching or padding."""
    x, y = tokenizer("x")["input_ids"][0], tokenizer("y")["input_ids"][0]
    predicted = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            if adapters is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0, -1]
            else:
                model.set_adapter(adapters)
                logits = model(input_ids=ids).logits[0, -1]
            predicted.append("x" if logits[x] >= logits[y] else "y")
    model.set_adapter("default")
    return predicted


def hand_macro_f1(gold, predicted, labels=("x", "y")):
    scores = []
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def test_comparison_matches_direct_computation():
    model, tokenizer = two_adapter_model(), CharTokenizer()
    variants = {"zero-shot": None, "default": "default", "both": ["default", "other"], "other": "other"}
    report = compare_choices(model, tokenizer, PROMPTS, GOLD, ["x", "y"], variants, batch_size=4, progress=False)
    assert list(report.variants) == list(variants)
    for name, adapters in variants.items():
        predicted = direct_predictions(model, tokenizer, adapters)
        result = report.variants[name]
        assert [p.answer for p in result.predictions] == predicted
        accuracy = sum(g == p for g, p in zip(GOLD, predicted, strict=True)) / len(GOLD)
        assert result.values["accuracy"] == pytest.approx(accuracy)
        assert result.values["f1_macro"] == pytest.approx(hand_macro_f1(GOLD, predicted))
        assert result.adapters == (
            None if adapters is None else (adapters,) if isinstance(adapters, str) else tuple(adapters)
        )
    assert model.active_adapters == ["default"]  # the comparison restored what was active


def test_variant_scope_restores_adapters_and_mode():
    model = two_adapter_model()
    model.set_adapter(["default", "other"])
    model.train()
    with variant_scope(model, "other"):
        assert model.active_adapters == ["other"] and not model.training
    with variant_scope(model, None):
        assert model._adapters_disabled
    assert model.active_adapters == ["default", "other"] and model.training and not model._adapters_disabled


def test_problems_are_found_before_any_model_runs():
    class Untouchable:
        def __call__(self, *args, **kwargs):
            raise AssertionError("the model must not run")

    tokenizer = CharTokenizer()
    examples = [EvalExample.from_text("p", "x"), EvalExample.from_text("q", "maybe")]
    with pytest.raises(ValueError, match=r"example 1: reference 'maybe' is none of the choices \['x', 'y'\]"):
        Evaluation(tokenizer, examples, ChoicePredictor(["x", "y"]))
    good = [EvalExample.from_text("p", "x")]
    with pytest.raises(ValueError, match="no metric reports 'f1'"):
        Evaluation(tokenizer, good, ChoicePredictor(["x", "y"]), ["accuracy"], targets=["f1 > 0.5"])
    task = Evaluation(
        tokenizer,
        good,
        ChoicePredictor(["x", "y"]),
        targets=[{"metric": "accuracy", "op": ">", "value": 0.5, "variants": ["b"]}],
    )
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['b'\]"):
        task.compare(Untouchable(), {"a": None})
    task = Evaluation(tokenizer, good, ChoicePredictor(["x", "y"]))
    with pytest.raises(ValueError, match=r"variant 'a': the model has no adapter\(s\) \['nope'\]"):
        task.compare(two_adapter_model(), {"a": "nope"})


def test_mean_choice_scoring_divides_by_token_count():
    model, tokenizer = two_adapter_model(), CharTokenizer()
    examples = [EvalExample.from_text(p, g) for p, g in zip(PROMPTS, ["xx", "y", "xx", "y", "y", "xx"], strict=True)]
    for scoring in ("sum", "mean"):
        task = Evaluation(tokenizer, examples, ChoicePredictor(["xx", "y"], scoring=scoring), ["mean_log_likelihood"])
        predictions = task.predict(model, progress=False)
        for p in predictions:
            ranked = [p.scores[0] / (2 if scoring == "mean" else 1), p.scores[1]]
            assert p.answer == ["xx", "y"][ranked.index(max(ranked))]
            gold = ["xx", "y"].index(p.expected)
            assert p.reference_logprob == pytest.approx(p.scores[gold]) and p.reference_tokens == [2, 1][gold]


def test_generation_matches_generating_one_row_at_a_time(tiny_folder, tmp_path):
    base, tokenizer = load_base(tiny_folder)
    model = PeftModel.from_pretrained(base, save_adapter(tiny_folder, tmp_path / "a"), tokenizer=tokenizer)
    examples = examples_from_records(records(tiny_folder, 7), get_formatter("prompt_completion"))
    predictor = GenerationPredictor(build_parser("text"), DecodingSettings(max_new_tokens=3))
    task = Evaluation(tokenizer, examples, predictor, ["exact_match", "perplexity"], batch_size=3)
    predictions = task.predict(model, progress=False)
    for example, p in zip(examples, predictions, strict=True):
        ids = torch.tensor([tokenizer(example.prompt_text)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert p.output == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        # the reference's log-likelihood, directly: log-softmax of a full forward over prompt + reference
        ref = tokenizer(example.reference, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[0].tolist() + ref])).logits[0]
        logprobs = torch.log_softmax(logits, -1)
        expected = sum(logprobs[ids.shape[1] - 1 + k, t].item() for k, t in enumerate(ref))
        assert p.reference_logprob == pytest.approx(expected, abs=1e-4) and p.reference_tokens == len(ref)


def test_generation_with_a_label_parser_fills_the_unparsed_column(tiny_folder):
    base, tokenizer = load_base(tiny_folder)
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=2))
    examples = examples_from_records(records(tiny_folder, 8), get_formatter("prompt_completion"))
    parser = build_parser("label", labels=[c.strip() for c in CHOICES])
    task = Evaluation(tokenizer, examples, GenerationPredictor(parser, DecodingSettings(max_new_tokens=2)),
                      ["accuracy", "recall", "confusion_matrix"])  # fmt: skip
    result = task.run(model, name="tuned", progress=False)
    matrix = result.metrics["confusion_matrix"].details["confusion_matrix"]
    assert sum(map(sum, matrix["matrix"])) == 8
    assert sum(row[-1] for row in matrix["matrix"]) == result.unparsed == sum(not p.parsed for p in result.predictions)
    correct = sum(p.parsed and p.answer == p.expected for p in result.predictions)
    assert result.values["accuracy"] == pytest.approx(correct / 8) == pytest.approx(result.values["recall_micro"])
