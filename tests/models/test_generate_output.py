"""``generate(return_dict_in_generate=True, output_scores=True)`` with soft prompts (PEFT 0.21 cannot be the
oracle here: on transformers 5 it re-injects the prompt at every step), checked against the plain ids."""

import pytest
import torch

import peftkit
from tests.conftest import tiny_model

IDS = torch.tensor([[0, 0, 5, 9, 33], [7, 8, 9, 10, 11]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize(
    "config",
    [peftkit.PromptTuningConfig(num_virtual_tokens=3), peftkit.PrefixTuningConfig(num_virtual_tokens=3)],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_output_object_matches_plain_generate(config):
    torch.manual_seed(0)
    model = peftkit.get_peft_model(tiny_model("llama"), config)
    plain = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    out = model.generate(
        input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
        output_scores=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == 4 and out.scores[0].shape == (2, 128)
    assert torch.equal(torch.stack(out.scores).argmax(-1).T, plain[:, IDS.shape[1] :])
    ids_only = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(ids_only.sequences, plain) and ids_only.scores is None
