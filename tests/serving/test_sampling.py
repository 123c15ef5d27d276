"""RowSampler: each row's penalties, grammar, sampling and seed, and its streamed text."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from peftkit import get_peft_model
from peftkit.decoding import DecodingSettings
from peftkit.models.loading import load_tokenizer
from peftkit.serving import sampling
from peftkit.serving.sampling import RowSampler, choose_tokens
from tests.conftest import VOCAB
from tests.models.test_peft_model import CONFIGS


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def row(settings: DecodingSettings, tokenizer, prompt=(5, 6, 7), vocab=VOCAB, eos=(2,)) -> RowSampler:
    return RowSampler(settings, prompt_ids=list(prompt), tokenizer=tokenizer, vocab_size=vocab, eos_ids=eos)


def feed(sampler: RowSampler, ids: list[int]) -> tuple[list[str], str | None]:
    pieces, reason = [], None
    for token in ids:
        piece, reason = sampler.accept(token)
        pieces.append(piece)
        if reason is not None:
            break
    return pieces, reason


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_penalties_follow_hf_repetition_and_openai_presence_frequency(tokenizer):
    """Greedy with penalties: the argmax of HF's repetition penalty (prompt + generated) followed by
    OpenAI's ``- frequency * count - presence * (count > 0)`` over the generated tokens only."""
    settings = DecodingSettings(repetition_penalty=1.3, presence_penalty=0.6, frequency_penalty=0.9)
    prompt = [5, 6, 7, 7]
    sampler = row(settings, tokenizer, prompt=prompt)
    assert not sampler.plain_greedy
    generator = torch.Generator().manual_seed(0)
    hf = RepetitionPenaltyLogitsProcessor(1.3)
    differs = 0
    for _ in range(30):
        logits = torch.randn(VOCAB, generator=generator) * 0.5
        logits[[5, 6, 7, *sampler.generated]] += 1.0  # make repeats tempting, so the penalties decide
        expected = hf(torch.tensor([prompt + sampler.generated]), logits[None].clone())[0]
        for token, count in Counter(sampler.generated).items():
            expected[token] -= 0.9 * count + 0.6
        token = sampler.choose(logits)
        assert token == int(expected.argmax())
        differs += token != int(logits.argmax())
        if sampler.accept(token if token != 2 else 3)[1]:
            break
    assert differs > 5  # the penalties changed the choice


def test_prompt_tokens_are_not_counted_by_presence_or_frequency(tokenizer):
    sampler = row(DecodingSettings(presence_penalty=2.0, frequency_penalty=2.0), tokenizer, prompt=[9, 9, 9])
    logits = torch.zeros(VOCAB)
    logits[9] = 1.0
    assert sampler.choose(logits) == 9  # in the prompt only: not penalised
    sampler.accept(9)
    assert sampler.choose(logits) != 9  # generated once: 1 - 2 - 2 < 0


def test_a_seeded_row_samples_the_same_whatever_its_neighbours(tokenizer):
    settings = DecodingSettings(temperature=0.9, top_k=40, top_p=0.95, seed=7, max_new_tokens=20)
    neighbours = [
        DecodingSettings(temperature=1.5, max_new_tokens=20),
        DecodingSettings(max_new_tokens=20),
        DecodingSettings(temperature=0.7, seed=7, repetition_penalty=1.2, max_new_tokens=20),
    ]
    logits = torch.randn(20, 4, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    logits[:, :, 2] = -1e9  # no end-of-sequence, so every row runs 20 steps

    def run(rows: list[RowSampler]) -> list[int]:
        for step in range(20):
            for sampler, token in zip(rows, choose_tokens(rows, logits[step, : len(rows)]), strict=True):
                sampler.accept(token)
        return rows[0].generated

    alone = run([row(settings, tokenizer)])
    assert run([row(settings, tokenizer)] + [row(s, tokenizer) for s in neighbours]) == alone
    assert run([row(settings.model_copy(update={"seed": 8}), tokenizer)]) != alone


def test_a_greedy_row_with_penalties_equals_generate_on_that_row_alone(llama, tokenizer):
    """The sampler applies generate's processors: the same tokens, step for step."""
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    settings = DecodingSettings(repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.6, max_new_tokens=10)
    prompt = torch.tensor([[5, 9, 17, 33, 4]])
    expected = peft_model.generate(input_ids=prompt, decoding=settings, eos_token_id=[])[0, 5:].tolist()
    plain = peft_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, eos_token_id=[])[0, 5:].tolist()
    assert expected != plain  # the penalties change this continuation
    sampler = row(settings, tokenizer, prompt=prompt[0].tolist(), eos=())
    sequence = prompt
    with torch.no_grad():
        while sampler.finish_reason is None:
            token = sampler.choose(peft_model(input_ids=sequence).logits[0, -1])
            sampler.accept(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert sampler.generated == expected and sampler.finish_reason == "length"


@pytest.mark.parametrize(
    "values",
    [
        {"temperature": 1.0},
        {"temperature": 0.6, "top_k": 40},
        {"temperature": 1.3, "top_p": 0.8},
        {"temperature": 0.9, "top_p": 0.995},
        {"temperature": 0.7, "top_k": 300, "top_p": 0.9, "min_p": 0.01},
        {"temperature": 1.0, "min_p": 0.05},
        {"temperature": 2.0, "top_p": 0.5, "min_p": 0.2},
    ],
)
def test_the_sampling_distribution_equals_hugging_faces_warpers(tokenizer, values):
    """Temperature, top-k, top-p and min-p keep the tokens HF's warpers keep, with their probabilities
    (V = 49,152, peaked logits like a language model's)."""
    settings = DecodingSettings(**values)
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        logits = torch.randn(vocab, generator=generator) * 2.5
        reference = torch.softmax(
            settings.processors()(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0], -1
        )
        indices, probs = row(settings, tokenizer, vocab=vocab).distribution(logits)
        assert set(indices.tolist()) == set(reference.nonzero().squeeze(1).tolist())
        torch.testing.assert_close(probs / probs.sum(), reference[indices], atol=1e-6, rtol=1e-4)


def test_samples_follow_the_distribution(tokenizer):
    logits = torch.full((VOCAB,), -1e9)
    logits[20:25] = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]).log()
    sampler = row(DecodingSettings(temperature=1.0, top_p=0.85, seed=3), tokenizer)
    counts = Counter(sampler.choose(logits) for _ in range(4000))
    kept = torch.tensor([0.5, 0.25, 0.15]) / 0.9  # 0.5 + 0.25 < 0.85: the third is the last kept
    assert set(counts) == {20, 21, 22}
    for i, p in enumerate(kept.tolist()):
        assert abs(counts[20 + i] / 4000 - p) < 0.03


def test_top_k_one_is_greedy(tokenizer):
    sampler = row(DecodingSettings(temperature=1.7, top_k=1, seed=0, max_new_tokens=50), tokenizer)
    logits = torch.randn(50, VOCAB, generator=torch.Generator().manual_seed(5))
    for step in range(50):
        token = sampler.choose(logits[step])
        assert token == int(logits[step].argmax())


def test_min_p_keeps_only_tokens_at_least_min_p_times_the_top(tokenizer):
    probs = torch.tensor([0.40, 0.25, 0.15, 0.11, 0.05, 0.04])
    logits = torch.full((VOCAB,), -1e9)
    logits[10:16] = probs.log()
    sampler = row(DecodingSettings(temperature=1.0, min_p=0.3, seed=1), tokenizer)
    counts = Counter(sampler.choose(logits) for _ in range(3000))
    kept = probs[:3] / probs[:3].sum()  # 0.15 >= 0.3 * 0.40 = 0.12 > 0.11
    assert set(counts) == {10, 11, 12}
    for i, p in enumerate(kept.tolist()):
        assert abs(counts[10 + i] / 3000 - p) < 0.03


def test_batched_greedy_rows_equal_their_argmax_and_others_are_chosen_per_row(tokenizer):
    rows = [row(DecodingSettings(), tokenizer), row(DecodingSettings(repetition_penalty=5.0), tokenizer, prompt=[9])]
    logits = torch.zeros(2, VOCAB)
    logits[:, 9], logits[:, 4] = 2.0, 1.0
    assert rows[0].plain_greedy and not rows[1].plain_greedy
    assert choose_tokens(rows, logits) == [9, 4]  # the penalty (2 / 5 < 1) moves row 1 off token 9


def test_a_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer):
    text = "Hello world, this is the end. More text"
    ids = ids_of(tokenizer, text)
    sampler = row(DecodingSettings(stop=("is the end",)), tokenizer, vocab=len(tokenizer))
    pieces, reason = feed(sampler, ids)
    assert reason == "stop" and sampler.finish_reason == "stop"
    assert "".join(pieces) == sampler.text == "Hello world, this "
    assert len(sampler.generated) < len(ids)  # it stopped at the token that completed the stop string
    assert all("is the" not in p for p in pieces)
    assert sampler.finish() == ""


def test_held_back_text_is_flushed_at_the_length_limit_and_at_an_abort(tokenizer):
    ids = ids_of(tokenizer, "one two thr")
    sampler = row(DecodingSettings(stop=("three",), max_new_tokens=len(ids)), tokenizer, vocab=len(tokenizer))
    pieces, reason = feed(sampler, ids)
    assert reason == "length" and "".join(pieces) == "one two thr"
    aborted = row(DecodingSettings(stop=("three",)), tokenizer, vocab=len(tokenizer))
    pieces, reason = feed(aborted, ids)
    assert reason is None and "".join(pieces) == "one two "
    assert aborted.finish() == "thr" and aborted.finish_reason == "abort" and aborted.text == "one two thr"


def test_end_of_sequence_stops_and_is_not_text(tokenizer):
    ids = [*ids_of(tokenizer, "Done."), tokenizer.eos_token_id]
    sampler = row(DecodingSettings(), tokenizer, vocab=len(tokenizer), eos=[tokenizer.eos_token_id])
    pieces, reason = feed(sampler, ids)
    assert reason == "stop" and "".join(pieces) == "Done." and sampler.generated == ids
    with pytest.raises(RuntimeError, match="finished"):
        sampler.accept(5)


def test_multi_byte_characters_stream_whole(tokenizer):
    text = "héllo 你好 🎉🎉 wörld, naïve café ✓"
    ids = ids_of(tokenizer, text)
    assert len(ids) > len(text.split())  # some characters take several tokens
    sampler = row(DecodingSettings(max_new_tokens=len(ids) + 1), tokenizer, vocab=len(tokenizer))
    pieces, reason = feed(sampler, ids)
    assert reason is None and "".join(pieces) + sampler.finish() == text
    assert all("\ufffd" not in p for p in pieces)
    assert "🎉" in pieces[ids.index(10813) + 2]  # released with its last byte, not before


def test_a_grammar_row_produces_valid_json_and_the_grammar_compiles_once(tokenizer):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    settings = DecodingSettings(temperature=1.0, grammar={"json_schema": schema}, max_new_tokens=40)
    sampling._compiled.cache_clear()
    vocab = len(tokenizer)
    rows = [row(settings.model_copy(update={"seed": i}), tokenizer, vocab=vocab, eos=[2]) for i in range(32)]
    assert sampling._compiled.cache_info().misses == 1
    generator = torch.Generator().manual_seed(0)
    for sampler in rows[:4]:
        while sampler.finish_reason is None:
            sampler.accept(sampler.choose(torch.randn(vocab, generator=generator) * 5))
        assert sampler.finish_reason == "stop"
        value = json.loads(sampler.text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9


def test_bad_input_is_refused(tokenizer):
    sampler = row(DecodingSettings(temperature=1.0), tokenizer)
    with pytest.raises(ValueError, match=r"logits must be \(V,\)"):
        sampler.choose(torch.zeros(VOCAB + 1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.accept(VOCAB)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        choose_tokens([sampler], torch.zeros(2, VOCAB))
