"""Decoding with the KV cache equals decoding without it, for every soft-prompt method."""

import pytest
import torch

from peftkit import get_peft_model
from peftkit.decoding import DecodingSettings
from tests.models.test_peft_model import CONFIGS


def argmax_without_cache(peft_model, input_ids, attention_mask, steps, adapter_names=None):
    """The reference: re-run the full sequence for every new token and take the argmax."""
    sequence, mask = input_ids, attention_mask
    for _ in range(steps):
        logits = peft_model(input_ids=sequence, attention_mask=mask, adapter_names=adapter_names).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return sequence


@pytest.fixture(params=list(CONFIGS))
def method(request):
    return request.param


def test_greedy_generate_equals_argmax_of_full_forwards(model, method, batch):
    torch.manual_seed(0)
    peft_model = get_peft_model(model, CONFIGS[method]())
    generated = peft_model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=[])
    assert generated.shape == (2, 13)
    expected = argmax_without_cache(peft_model, batch["input_ids"], batch["attention_mask"], 6)
    assert torch.equal(generated, expected)


def test_right_padding_continues_after_the_last_real_token(llama):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    left = peft_model.generate(
        input_ids=torch.tensor([[0, 0, 5, 6, 7]]),
        attention_mask=torch.tensor([[0, 0, 1, 1, 1]]),
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=[],
    )
    right = peft_model.generate(
        input_ids=torch.tensor([[5, 6, 7, 0, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 0, 0]]),
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=[],
    )
    assert torch.equal(left[:, 5:], right[:, 5:])


def test_without_adapters_matches_hugging_face_generate(model, batch):
    """An independent implementation: transformers' own generate on the bare model."""
    peft_model = get_peft_model(model, CONFIGS["prompt_tuning"]())
    with peft_model.disable_adapter():
        ours = peft_model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=[])
    theirs = model.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_mixed_batch_generation_equals_separate_generation(llama, batch):
    from peftkit import PrefixTuningConfig

    torch.manual_seed(0)
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"](), adapter_name="a")
    peft_model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=3))
    mixed = peft_model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=[], adapter_names=["b", "a"])
    for row, name in enumerate(["b", "a"]):
        peft_model.set_adapter(name)
        alone = peft_model.generate(
            input_ids=batch["input_ids"][row : row + 1, 2 * row :],  # row 1 without its left padding
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=[],
        )
        assert torch.equal(mixed[row, -5:], alone[0, -5:])


def test_sampling_matches_sampling_from_full_forwards(model, method, batch):
    """Same seed, same processors, distributions from no-cache forwards: the same tokens."""
    torch.manual_seed(0)
    peft_model = get_peft_model(model, CONFIGS[method]())
    settings = DecodingSettings(max_new_tokens=5, temperature=0.7, top_k=20, top_p=0.9)
    generated = peft_model.generate(
        **batch, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=123, eos_token_id=[]
    )
    generator = torch.Generator().manual_seed(123)
    processors = settings.processors()
    sequence, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(5):
        logits = peft_model(input_ids=sequence, attention_mask=mask).logits[:, -1].float()
        probs = torch.softmax(processors(sequence, logits), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        sequence = torch.cat([sequence, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    assert torch.equal(generated, sequence)


def test_sampling_is_reproducible_and_seed_dependent(llama, batch):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "eos_token_id": []}
    a = peft_model.generate(**batch, seed=1, **kwargs)
    assert torch.equal(a, peft_model.generate(**batch, seed=1, **kwargs))
    assert not torch.equal(a, peft_model.generate(**batch, seed=2, **kwargs))


def test_rows_stop_at_eos_and_are_padded(llama):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    ids = torch.tensor([[5, 6, 7]])
    free = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=[])
    eos = int(free[0, 4])  # make the second generated token the end of sequence
    stopped = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    first_eos = (free[0, 3:] == eos).nonzero()[0].item() + 3
    assert torch.equal(stopped[0, : first_eos + 1], free[0, : first_eos + 1])
    assert stopped.shape[1] == first_eos + 1  # every row finished: decoding stopped


def test_logits_processor_hook(llama, batch):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())

    def only_token_9(input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, 9] = 0
        return forced

    out = peft_model.generate(**batch, max_new_tokens=3, do_sample=False, logits_processor=[only_token_9])
    assert (out[:, -3:] == 9).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature=-1.0: Input should be greater than or equal to 0"),
        ({"temperature": 2.5}, "temperature=2.5: Input should be less than or equal to 2"),
        ({"top_p": 0.0}, "top_p=0.0: Input should be greater than 0"),
        ({"top_k": -1}, "top_k=-1: Input should be greater than or equal to 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_settings_are_rejected(llama, kwargs, message):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    with pytest.raises(ValueError, match=message):
        peft_model.generate(input_ids=torch.tensor([[1, 2]]), **kwargs)


def test_unsupported_arguments_are_rejected(llama):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    with pytest.raises(NotImplementedError, match="num_beams=4"):
        peft_model.generate(input_ids=torch.tensor([[1, 2]]), num_beams=4)
    with pytest.raises(TypeError, match="unexpected argument 'bogus'"):
        peft_model.generate(input_ids=torch.tensor([[1, 2]]), bogus=1)
    with pytest.raises(ValueError, match="all zeros"):
        peft_model.generate(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]]))


def test_temperature_zero_is_greedy(llama, batch):
    peft_model = get_peft_model(llama, CONFIGS["prompt_tuning"]())
    greedy = peft_model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=[])
    assert torch.equal(
        greedy, peft_model.generate(**batch, max_new_tokens=4, do_sample=True, temperature=0.0, eos_token_id=[])
    )
