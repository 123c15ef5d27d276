"""Answer parsers on tricky strings: numbers (GSM8K-style), labels, JSON."""

import pytest

from peftkit.evaluation.parsers import ParseError, Parser, build_parser, find_numbers, known_parsers, register_parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 clips in April and half as many in May. 48 + 24 = 72\n#### 72", 72),
        ("#### 1,234", 1234),
        ("The answer is 42.", 42),
        ("I had 3 apples, then 5. #### -7", -7),
        ("It costs $1,234.50 in total", 1234.5),
        ("About 50% of 80 is 40", 40),
        ("\\boxed{17} and then 3 more", 17),
        ("the result is 1e3", 1000.0),
        ("\u22125 degrees", -5),
        ("roughly .5", 0.5),
        ("5 apples ####", 5),  # an empty final-answer marker falls back to the last number
        ("3.0", 3.0),
    ],
)
def test_numbers(text, expected):
    value = build_parser("number").parse(text)
    assert value == expected and type(value) is type(expected)


def test_number_pick_first_and_no_marker():
    assert build_parser("number", pick="first").parse("between 3 and 4") == 3
    assert build_parser("number", marker=None).parse("#### 9 then 10") == 10


@pytest.mark.parametrize("text", ["no numbers here", "x2 and y3", ""])
def test_text_without_a_number(text):
    with pytest.raises(ParseError, match="no number"):
        build_parser("number").parse(text)


def test_find_numbers():
    assert find_numbers("-$1,234.50 and 7, then 1,2") == [-1234.5, 7, 1, 2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Positive!\n", "positive"),
        ("The sentiment is Negative.", "negative"),
        ("negative, not positive", "negative"),  # the first label that occurs wins
        ("NEGATIVE", "negative"),
        ("“positive”", "positive"),
    ],
)
def test_labels(text, expected):
    assert build_parser("label", labels=["positive", "negative"]).parse(text) == expected


@pytest.mark.parametrize("text", ["neutral", "positively great", "", "pos"])
def test_text_without_a_label(text):
    with pytest.raises(ParseError, match="none of the labels"):
        build_parser("label", labels=["positive", "negative"]).parse(text)


def test_label_aliases_and_multi_word_labels():
    parser = build_parser(
        "label", labels={"SUPPORTS": ["supported", "true"], "REFUTES": ["false"], "NOT ENOUGH INFO": ["info"]}
    )
    assert parser.labels == ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
    assert parser.parse("True.") == "SUPPORTS"
    assert parser.parse("The claim is supported by the evidence") == "SUPPORTS"
    assert parser.parse("not   enough info") == "NOT ENOUGH INFO"  # the longer alias wins at one position
    assert parser.parse("more info needed") == "NOT ENOUGH INFO"


def test_exact_label_match():
    parser = build_parser("label", labels=["positive", "negative"], match="exact")
    assert parser.parse(" positive.") == "positive"
    with pytest.raises(ParseError):
        parser.parse("The answer is positive")


def test_label_parser_rejects_ambiguous_aliases():
    with pytest.raises(ValueError, match="names both 'a' and 'b'"):
        build_parser("label", labels={"a": ["x"], "b": ["X"]})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Here: {"a": "}"} trailing', {"a": "}"}),
        ("```json\n[1, 2]\n```", [1, 2]),
        ('{bad} then {"ok": true}', {"ok": True}),
        ('{"nested": {"x": [1, {"y": null}]}} {"second": 1}', {"nested": {"x": [1, {"y": None}]}}),
        ('prefix [ unclosed and {"a": 1}', {"a": 1}),
    ],
)
def test_json(text, expected):
    assert build_parser("json").parse(text) == expected


def test_json_kinds_and_strictness():
    assert build_parser("json", kind="object").parse('[1] {"a": 1}') == {"a": 1}
    assert build_parser("json", kind="array").parse('{"a": [1]} [2]') == [1]
    strict = build_parser("json", strict=True)
    assert strict.parse(' {"a": 1}\n') == {"a": 1}
    assert strict.parse('```json\n{"a": 1}\n```') == {"a": 1}
    for text in ['x {"a": 1}', '"just a string"', "{'a': 1}"]:
        with pytest.raises(ParseError):
            strict.parse(text)
    with pytest.raises(ParseError, match="no JSON value"):
        build_parser("json").parse("no json {here")


def test_text_parser_strips():
    assert build_parser("text").parse("  hi there \n") == "hi there"


def test_registry_errors_and_custom_parsers():
    with pytest.raises(ValueError, match="unknown parser 'nums'; known parsers: json, label, number, text"):
        build_parser("nums")
    with pytest.raises(ValueError, match=r"needs option\(s\) \['labels'\]"):
        build_parser("label")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['base'\]"):
        build_parser("number", base=10)

    @register_parser("test_upper")
    class Upper(Parser):
        def parse(self, text):
            return text.upper()

    assert build_parser("test_upper").parse("a") == "A" and "test_upper" in known_parsers()
