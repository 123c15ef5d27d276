"""Formatters: each built-in against hand-written segments; chat via a real chat template."""

import pytest

from peftkit.data.batching import encode_segments
from peftkit.data.formatters import (
    FormatError,
    Formatted,
    Segment,
    check_formatter,
    get_formatter,
    known_formatters,
    register_formatter,
)


def segments(formatted: Formatted) -> list[tuple[str, bool]]:
    return [(s.text, s.train) for s in formatted.segments]


def test_prompt_completion():
    fmt = get_formatter("prompt_completion")
    assert segments(fmt({"prompt": "2+2=", "completion": " 4"})) == [("2+2=", False), (" 4", True)]
    renamed = get_formatter("prompt_completion", prompt_field="q", completion_field="a")
    assert segments(renamed({"q": "Hi", "a": "!"})) == [("Hi", False), ("!", True)]


def test_scifact_joins_evidence_sentences():
    evidence = ["It inhibits platelets.", "Bleeding rises."]
    record = {"claim": "Aspirin thins blood.", "evidence": evidence, "label": "SUPPORT"}
    expected = [
        ("Claim: Aspirin thins blood.\nEvidence: It inhibits platelets. Bleeding rises.\n\nVerdict:", False),
        (" SUPPORT", True),
    ]
    assert segments(get_formatter("scifact")(record)) == expected
    as_string = get_formatter("scifact")({**record, "evidence": "One sentence."})
    assert as_string.segments[0].text == "Claim: Aspirin thins blood.\nEvidence: One sentence.\n\nVerdict:"


def test_fever_spells_boolean_labels():
    fmt = get_formatter("fever")
    assert segments(fmt({"claim": "Paris is in France.", "label": "SUPPORTS"})) == [
        ("Claim: Paris is in France.\n\nVerify:", False),
        (" SUPPORTS", True),
    ]
    assert fmt({"claim": "x", "label": False}).segments[1] == Segment(" false", train=True)


def test_gsm8k():
    record = {"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3 - 1 = 2\n#### 2"}
    assert segments(get_formatter("gsm8k")(record)) == [
        ("Problem: Tom has 3 apples and eats 1. How many are left?\n\nSolution:", False),
        (" 3 - 1 = 2\n#### 2", True),
    ]


def test_rotten_tomatoes_matches_the_demo_prompt():
    out = get_formatter("rotten_tomatoes")({"text": "A triumph.", "label": "positive"})
    assert segments(out) == [
        ("Review: A triumph.\nIs this movie review positive or negative? Answer:", False),
        (" positive", True),
    ]


def test_template_and_text():
    fmt = get_formatter("template", prompt="Q: {q}\nA:", completion=" {a}")
    assert segments(fmt({"q": "sky?", "a": "blue"})) == [("Q: sky?\nA:", False), (" blue", True)]
    with pytest.raises(FormatError, match="names field 'a'"):
        fmt({"q": "no answer"})
    assert segments(get_formatter("text")({"text": "all of it"})) == [("all of it", True)]


def test_missing_field_names_it():
    with pytest.raises(FormatError, match=r"no field 'claim' \(fields: \['label', 'text'\]\)"):
        get_formatter("fever")({"text": "x", "label": "y"})
    with pytest.raises(FormatError, match="field 'evidence' must be str or list or tuple"):
        get_formatter("scifact")({"claim": "c", "evidence": 3, "label": "y"})


def test_unknown_names_and_options_are_listed():
    with pytest.raises(ValueError, match="unknown formatter 'nope'; known formatters: .*chat.*fever.*gsm8k"):
        get_formatter("nope")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['colour'\]; it takes: \['question_field'"):
        check_formatter("gsm8k", {"colour": "red"})
    with pytest.raises(ValueError, match=r"needs option\(s\) \['prompt', 'completion'\]"):
        check_formatter("template", {})


def test_custom_formatter(char_tokenizer):
    @register_formatter("test_upper")
    def upper(record, *, field="x"):
        return record[field].upper(), "!"

    assert "test_upper" in known_formatters()
    assert segments(get_formatter("test_upper", field="y")({"y": "ab"})) == [("AB", False), ("!", True)]


def test_segments_become_exact_label_masks(char_tokenizer):
    """Each segment is tokenised on its own: labels are the trained segments' ids, nothing else."""
    encoded = encode_segments(char_tokenizer, [("ab", False), ("c", True), ("d", False), ("ef", True)])
    ids = char_tokenizer("abcdef")["input_ids"]
    assert encoded.input_ids == ids
    assert encoded.labels == [-100, -100, ids[2], -100, ids[4], ids[5]]
    text_only = encode_segments(char_tokenizer, [("xyz", True)])
    assert text_only.labels[0] == -100 and text_only.labels[1:] == char_tokenizer("yz")["input_ids"]


def test_truncation_modes(char_tokenizer):
    left = encode_segments(char_tokenizer, [("abcdef", False), ("xy", True)], max_length=4)
    assert left.input_ids == char_tokenizer("efxy")["input_ids"]
    right = encode_segments(char_tokenizer, [("abcdef", False), ("xy", True)], max_length=4, truncation="right")
    assert right.input_ids == char_tokenizer("abcd")["input_ids"] and set(right.labels) == {-100}


# ---------------------------------------------------------------------- chat
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tokenizer.backend_tokenizer.pre_tokenizer = Whitespace()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chat_segments_follow_the_template(chat_tokenizer):
    out = get_formatter("chat", chat_tokenizer)({"messages": CONVERSATION})
    assert not out.add_special_tokens  # the template writes its own special tokens
    assert segments(out) == [
        ("<|system|>Be brief.<|end|>\n", False),
        ("<|user|>Hi<|end|>\n", False),
        ("<|assistant|>", False),
        ("Hello!<|end|>\n", True),
        ("<|user|>2+2?<|end|>\n", False),
        ("<|assistant|>", False),
        ("4<|end|>\n", True),
    ]
    assert "".join(s.text for s in out.segments) == chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    last = get_formatter("chat", chat_tokenizer, train_on="last_assistant")({"messages": CONVERSATION})
    assert [s.text for s in last.segments if s.train] == ["4<|end|>\n"]


def test_chat_rejects_a_template_that_rewrites_history(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ messages | length }}:{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(FormatError, match="re-renders earlier turns"):
        get_formatter("chat", chat_tokenizer)({"messages": CONVERSATION})


def test_chat_needs_an_assistant_turn(chat_tokenizer):
    with pytest.raises(FormatError, match="no assistant turn"):
        get_formatter("chat", chat_tokenizer)({"messages": CONVERSATION[:2]})


@pytest.mark.smollm2
def test_chat_with_the_smollm2_template():
    """The real ChatML template: labels cover exactly the assistant answers and their <|im_end|>."""
    import json
    from pathlib import Path

    from peftkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    record = json.loads((Path(__file__).resolve().parents[2] / "examples/data/chat.jsonl").read_text().splitlines()[0])
    out = get_formatter("chat", tokenizer)(record)
    assert "".join(s.text for s in out.segments) == tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert [s.text for s in out.segments if s.train] == ["Paris.<|im_end|>\n"]
    assert out.segments[-2].text == "<|im_start|>assistant\n"
    encoded = encode_segments(tokenizer, [(s.text, s.train) for s in out.segments], add_special_tokens=False)
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    assert tokenizer.decode(trained) == "Paris.<|im_end|>\n"
