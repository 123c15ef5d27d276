"""Every metric against hand-computed values, including a class never predicted and empty input."""

import math

import pytest

from peftkit.evaluation.metrics import MetricContext, build_metric, known_metrics, register_metric
from peftkit.evaluation.metrics.base import Metric, MetricResult
from peftkit.evaluation.records import Prediction

LABELS = ("pos", "neg", "neu")


def label_predictions(pairs):
    """(gold, predicted) pairs; predicted None = the parser found no label."""
    return [
        Prediction(i, f" {gold}", pred or "???", answer=pred, parsed=pred is not None, expected=gold)
        for i, (gold, pred) in enumerate(pairs)
    ]


# gold:  pos pos pos neg neg neu      matrix (rows gold, columns pos neg neu unparsed):
# pred:  pos neg pos neg pos  -        pos [2 1 0 0]  neg [1 1 0 0]  neu [0 0 0 1]
PAIRS = [("pos", "pos"), ("pos", "neg"), ("pos", "pos"), ("neg", "neg"), ("neg", "pos"), ("neu", None)]


def compute(name, predictions, labels=LABELS, chunks=(None,), **options):
    metric = build_metric(name, MetricContext(labels=labels), options)
    if chunks == (None,):
        metric.update(predictions)
    else:
        start = 0
        for size in chunks:
            metric.update(predictions[start : start + size])
            start += size
    return metric.compute()


def test_confusion_matrix_counts():
    result = compute("confusion_matrix", label_predictions(PAIRS))
    assert result.values == {}
    assert result.details["confusion_matrix"] == {
        "labels": ["pos", "neg", "neu"],
        "columns": ["pos", "neg", "neu", "(unparsed)"],
        "matrix": [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]],
    }


def test_accuracy():
    assert compute("accuracy", label_predictions(PAIRS)).values == {"accuracy": pytest.approx(3 / 6)}


def test_precision_with_a_class_never_predicted():
    result = compute("precision", label_predictions(PAIRS))
    # pos: TP 2 of 3 predicted; neg: 1 of 2; neu: never predicted -> undefined, reported as 0
    assert result.values == pytest.approx(
        {
            "precision/pos": 2 / 3,
            "precision/neg": 1 / 2,
            "precision/neu": 0.0,
            "precision_macro": (2 / 3 + 1 / 2 + 0) / 3,
            "precision_micro": 3 / 5,  # the unparsed prediction named no class
        }
    )
    assert result.notes == ["precision/neu is undefined ('neu' never predicted): reported as 0"]
    assert result.details["support"] == {"pos": 3, "neg": 2, "neu": 1}


def test_recall():
    result = compute("recall", label_predictions(PAIRS))
    assert result.values == pytest.approx(
        {
            "recall/pos": 2 / 3,
            "recall/neg": 1 / 2,
            "recall/neu": 0 / 1,
            "recall_macro": (2 / 3 + 1 / 2) / 3,
            "recall_micro": 3 / 6,  # = accuracy
        }
    )
    assert result.notes == []


def test_f1():
    result = compute("f1", label_predictions(PAIRS))
    f1_pos = 2 * (2 / 3) * (2 / 3) / (2 / 3 + 2 / 3)
    f1_neg = 2 * 0.5 * 0.5 / (0.5 + 0.5)
    assert result.values == pytest.approx(
        {
            "f1/pos": f1_pos,
            "f1/neg": f1_neg,
            "f1/neu": 0.0,
            "f1_macro": (f1_pos + f1_neg + 0) / 3,
            "f1_micro": 2 * 3 / (2 * 3 + 2 + 3),  # 2ΣTP / (2ΣTP + ΣFP + ΣFN)
        }
    )


def test_a_class_absent_from_the_gold_labels_has_no_recall():
    result = compute("recall", label_predictions([("a", "a"), ("a", "b"), ("a", "a")]), labels=("a", "b"))
    assert result.values == pytest.approx(
        {"recall/a": 2 / 3, "recall/b": 0.0, "recall_macro": 1 / 3, "recall_micro": 2 / 3}
    )
    assert result.notes == ["recall/b is undefined ('b' absent from the gold labels): reported as 0"]
    assert compute("precision", label_predictions([("a", "a"), ("a", "b")]), labels=("a", "b")).notes == []


def test_f1_of_a_class_neither_predicted_nor_gold():
    result = compute("f1", label_predictions([("a", "a"), ("a", "b")]), labels=("a", "b", "c"))
    assert result.values["f1/c"] == 0.0 and result.values["f1/a"] == pytest.approx(2 / 3)
    assert result.notes == ["f1/c is undefined ('c' never predicted and absent from the gold labels): reported as 0"]


def test_micro_precision_recall_f1_equal_accuracy_when_everything_parses():
    pairs = [("pos", "pos"), ("neg", "pos"), ("neu", "neu"), ("neg", "neg"), ("pos", "neu")]
    values = {}
    for name in ("precision", "recall", "f1"):
        values[name] = compute(name, label_predictions(pairs)).values[f"{name}_micro"]
    accuracy = compute("accuracy", label_predictions(pairs)).values["accuracy"]
    assert values == pytest.approx({"precision": 3 / 5, "recall": 3 / 5, "f1": 3 / 5}) and accuracy == 3 / 5


@pytest.mark.parametrize("name", ["accuracy", "precision", "recall", "f1", "exact_match", "json_validity"])
def test_empty_input_is_undefined(name):
    result = compute(name, [])
    assert result.values and all(v is None for v in result.values.values())
    assert any("no examples" in note for note in result.notes)


def test_empty_likelihood_is_undefined():
    for name in ("mean_log_likelihood", "perplexity"):
        assert compute(name, []).values == {name: None}


def test_counts_do_not_depend_on_batching():
    predictions = label_predictions(PAIRS)
    whole = compute("f1", predictions).values
    assert compute("f1", predictions, chunks=(1, 5)).values == whole
    assert compute("f1", predictions, chunks=(4, 1, 1)).values == whole
    # a mean of per-batch accuracies would say (1/1 + 2/5) / 2 = 0.7, not 0.5
    assert compute("accuracy", predictions, chunks=(1, 5)).values["accuracy"] == 0.5


def test_gold_label_outside_the_set_is_an_error():
    with pytest.raises(ValueError, match="example 0: gold label 'meh' is not one of the labels"):
        compute("f1", label_predictions([("meh", "pos")]))


def test_classification_metrics_need_labels():
    with pytest.raises(ValueError, match="metric 'f1' needs a label set"):
        build_metric("f1", MetricContext())


def test_reference_is_required():
    with pytest.raises(ValueError, match="example 0 has none"):
        compute("accuracy", [Prediction(0, None, "x")])


def text_predictions(pairs):
    return [Prediction(i, ref, out, answer=out.strip(), expected=ref.strip()) for i, (out, ref) in enumerate(pairs)]


def test_exact_match():
    pairs = [("The Cat!", " cat"), ("a dog", "dog"), ("cats", "cat"), (" cat ", "cat")]
    assert compute("exact_match", text_predictions(pairs)).values == {"exact_match": 3 / 4}
    assert compute("exact_match", text_predictions(pairs), normalise="strip").values == {"exact_match": 1 / 4}


def test_numeric_match():
    pairs = [
        ("The answer is 1,234.", "She pays 1200 + 34. #### 1234"),
        ("#### 99", "#### 100"),
        ("no idea", "#### 5"),
        ("-3.0", "#### -3"),
    ]
    result = compute("numeric_match", text_predictions(pairs))
    assert result.values == {"numeric_match": 2 / 4} and result.details["without_number"] == 1
    assert compute("numeric_match", text_predictions(pairs), rel_tol=0.01).values == {"numeric_match": 3 / 4}


def test_numeric_match_reads_parsed_numbers_and_refuses_a_reference_without_one():
    p = Prediction(0, "#### 7", "seven", answer=7, parsed=True, expected=7)
    assert compute("numeric_match", [p]).values == {"numeric_match": 1.0}
    with pytest.raises(ValueError, match="reference of example 0 holds no number"):
        compute("numeric_match", text_predictions([("4", "four")]))


def test_json_validity():
    outputs = ['{"a": 1}', 'Sure: {"a": [1, 2]} done', '{"a": }', "", "```json\n[1, 2]\n```"]
    predictions = [Prediction(i, None, o) for i, o in enumerate(outputs)]
    assert compute("json_validity", predictions).values == {"json_validity": 3 / 5}
    assert compute("json_validity", predictions, strict=True).values == {"json_validity": 2 / 5}


SCHEMA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


def test_schema_compliance():
    outputs = ['{"name": "x"}', '{"name": 3}', "nope", 'Here you go: {"name": "y", "age": 3}']
    metric = build_metric("schema_compliance", MetricContext(schema=SCHEMA))
    metric.update([Prediction(i, None, o) for i, o in enumerate(outputs)])
    result = metric.compute()
    assert result.values == {"schema_compliance": 2 / 4}
    assert result.details["invalid_json"] == 1 and result.details["violations"] == 1
    assert result.details["messages"] == ["example 1: name: 3 is not of type 'string'"]


def test_schema_compliance_needs_a_valid_schema():
    with pytest.raises(ValueError, match="needs a JSON Schema"):
        build_metric("schema_compliance", MetricContext())
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        build_metric("schema_compliance", MetricContext(schema={"type": "thing"}))


def test_mean_log_likelihood_and_perplexity_are_token_weighted():
    predictions = [
        Prediction(0, "ab", "", reference_logprob=-2.0, reference_tokens=2),
        Prediction(1, "c", "", reference_logprob=-3.0, reference_tokens=1),
    ]
    assert compute("mean_log_likelihood", predictions).values == {"mean_log_likelihood": pytest.approx(-5 / 3)}
    assert compute("perplexity", predictions).values == {"perplexity": pytest.approx(math.exp(5 / 3))}
    # per-example means would give exp(2) instead
    assert compute("perplexity", predictions).values["perplexity"] != pytest.approx(math.exp(2))


def test_user_function_metric():
    @register_metric("test_long_output")
    def long_output(prediction):
        return len(prediction.output) > 3

    predictions = [Prediction(i, None, o) for i, o in enumerate(["a", "abcd", "abcdef"])]
    assert compute("test_long_output", predictions).values == {"test_long_output": pytest.approx(2 / 3)}
    assert compute("test_long_output", []).values == {"test_long_output": None}
    assert "test_long_output" in known_metrics()


def test_user_class_metric_with_options():
    @register_metric("test_first_char")
    class FirstChar(Metric):
        def __init__(self, context, *, char="x"):
            super().__init__(context)
            self.char, self.hits = char, 0

        def update(self, predictions):
            self.hits += sum(p.output.startswith(self.char) for p in predictions)

        def compute(self):
            return MetricResult({self.name: float(self.hits)})

    predictions = [Prediction(i, None, o) for i, o in enumerate(["xa", "yb", "xc"])]
    assert compute("test_first_char", predictions).values == {"test_first_char": 2.0}
    assert compute("test_first_char", predictions, char="y").values == {"test_first_char": 1.0}
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['colour'\]; it takes: \['char'\]"):
        compute("test_first_char", predictions, colour=1)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown metric 'acuracy'; known metrics: accuracy, confusion_matrix"):
        build_metric("acuracy", MetricContext())


def test_register_metric_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown needs"):
        register_metric("x", lambda p: 1.0, needs=["gold"])
    with pytest.raises(ValueError, match="without '/'"):
        register_metric("a/b", lambda p: 1.0)
