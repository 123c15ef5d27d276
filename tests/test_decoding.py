"""The one decoding type: ranges, layered sources, and stop sequences that span tokens."""

from __future__ import annotations

import pytest
import torch

from peftkit.decoding import DecodingSettings, Grammar, PresenceFrequencyPenalty, StopScanner, resolve_decoding


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": 2.01}, "temperature=2.01: Input should be less than or equal to 2"),
        ({"temperature": -0.1}, "temperature=-0.1: Input should be greater than or equal to 0"),
        ({"top_p": 0}, "top_p=0: Input should be greater than 0"),
        ({"top_p": 1.5}, "top_p=1.5: Input should be less than or equal to 1"),
        ({"top_k": -1}, "top_k=-1: Input should be greater than or equal to 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: Input should be greater than or equal to 1"),
        ({"stop": ["ok", ""]}, "stop: stop cannot contain an empty string"),
        ({"grammar": {}}, "grammar: give exactly one of json_schema or gbnf"),
        ({"grammar": {"json_schema": {"type": "nope"}}}, "grammar"),
        ({"presence_penalty": 2.5}, "presence_penalty=2.5: Input should be less than or equal to 2"),
        ({"frequency_penalty": -2.1}, "frequency_penalty=-2.1: Input should be greater than or equal to -2"),
        ({"beam_width": 4}, "beam_width=4: Extra inputs are not permitted"),
    ],
)
def test_out_of_range_values_are_errors_naming_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        DecodingSettings.checked(**values)


def test_the_boundaries_are_allowed():
    DecodingSettings.checked(temperature=0, top_p=1, top_k=0, max_new_tokens=1)
    DecodingSettings.checked(temperature=2, top_p=1e-6)


def test_later_layers_win_and_sources_are_recorded():
    settings, sources = resolve_decoding(
        ("manifest", {"temperature": 0.1, "top_p": 0.5, "stop": ["\n\n"]}),
        ("--top-p", {"top_p": 0.9}),
    )
    assert (settings.temperature, settings.top_p, settings.stop) == (0.1, 0.9, ("\n\n",))
    assert sources["temperature"] == "manifest" and sources["top_p"] == "--top-p" and sources["top_k"] == "default"
    lines = settings.describe(sources)
    assert "temperature=0.1 (manifest)" in lines and "top_p=0.9 (--top-p)" in lines and "top_k=0 (default)" in lines
    with pytest.raises(ValueError, match=r"--temperature: temperature=9.0"):
        resolve_decoding(("--temperature", {"temperature": 9.0}))


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI's formula, by hand: logit -= frequency * count + presence * (count > 0)."""
    settings = DecodingSettings(presence_penalty=0.5, frequency_penalty=-0.25)
    processors = settings.processors()
    assert settings.has_penalties and len(processors) == 1
    scores = torch.arange(6, dtype=torch.float).repeat(2, 1)
    assert torch.equal(processors(torch.tensor([[1, 1], [2, 3]]), scores.clone()), scores)  # the prompt
    ids = torch.tensor([[1, 1, 4, 4, 4, 1], [2, 3, 2, 5, 5, 0]])  # generated: [4, 4, 4, 1] and [2, 5, 5, 0]
    expected = scores.clone()
    for row, counts in enumerate([{4: 3, 1: 1}, {2: 1, 5: 2, 0: 1}]):
        for token, count in counts.items():
            expected[row, token] -= -0.25 * count + 0.5
    torch.testing.assert_close(processors(ids, scores.clone()), expected)
    explicit = PresenceFrequencyPenalty(0.5, -0.25, prompt_length=2)
    torch.testing.assert_close(explicit(ids, scores.clone()), expected)


def test_grammar_kind():
    assert Grammar(gbnf='root ::= "a"').kind == "gbnf"
    assert Grammar(json_schema={"type": "object"}).kind == "json_schema"


def feed(scanner: StopScanner, pieces: list[str]) -> list[str]:
    out, text = [], ""
    for piece in pieces:
        text += piece
        released = scanner.update(text)
        out.append(released)
        if scanner.stopped:
            break
    else:
        out.append(scanner.update(text, final=True))
    return out


def test_a_stop_sequence_spanning_pieces_never_reaches_the_output():
    scanner = StopScanner(("END",))
    out = feed(scanner, ["Hello E", "N", "D and more"])
    assert "".join(out) == "Hello " and scanner.stopped
    assert out == ["Hello ", "", ""]  # "E" and "EN" were held back until they became "END"


def test_held_back_text_is_released_when_it_stops_matching():
    scanner = StopScanner(("</answer>",))
    out = feed(scanner, ["a <", "/ans", "wer", "x", " b"])
    assert "".join(out) == "a </answerx b" and not scanner.stopped


def test_the_earliest_of_several_stop_sequences_cuts():
    scanner = StopScanner(("\n\n", "###"))
    assert "".join(feed(scanner, ["one\n", "#", "##\n\ntwo"])) == "one\n"


def test_incomplete_utf8_is_held_back():
    scanner = StopScanner(())
    assert scanner.update("caf\ufffd") == "caf"
    assert scanner.update("café") == "é"
