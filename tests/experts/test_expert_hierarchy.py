"""Fallback at inference: persona (+ cluster + unified), else cluster, else unified, else base."""

import pytest
import torch

import peftkit
from peftkit.experts.hierarchy import BASE_LEVEL, ExpertHierarchy
from tests.conftest import tiny_model
from tests.experts.expert_cases import composed_model, left_padded

REQUESTS = [
    {"persona": "p003", "cluster": "c1"},  # known persona and cluster
    {"persona": "p999", "cluster": "c2"},  # unknown persona: the cluster prompt
    {"persona": "p999", "cluster": "c9"},  # unknown both: the unified model only
    {"persona": "p004", "cluster": "c9"},  # known persona, unknown cluster
    {"cluster": "c0"},  # no persona given
    {},
]


def test_each_row_falls_back_to_the_most_specific_known_expert():
    model = composed_model("llama", "prompt_tuning")
    resolved = ExpertHierarchy(model, levels=["unified", "cluster", "persona"]).resolve(REQUESTS)
    assert resolved.levels == ["persona", "cluster", "unified", "persona", "cluster", "unified"]
    assert resolved.experts == [
        {"unified": 0, "cluster": "c1", "persona": "p003"},
        {"unified": 0, "cluster": "c2"},
        {"unified": 0},
        {"unified": 0, "persona": "p004"},
        {"unified": 0, "cluster": "c0"},
        {"unified": 0},
    ]


def test_a_resolution_drives_forward_and_generate():
    model = composed_model("qwen2", "prefix_tuning")
    resolved = ExpertHierarchy(model, levels=["unified", "cluster", "persona"]).resolve(REQUESTS)
    ids, mask = left_padded([5, 3, 4, 6, 2, 5])
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, experts=resolved).logits,
        model(input_ids=ids, attention_mask=mask, experts=resolved.experts).logits,
    )
    generated = model.generate(input_ids=ids, attention_mask=mask, experts=resolved, max_new_tokens=3)
    assert generated.shape == (6, 6 + 3)
    # a row that fell back to the cluster generates what the cluster prompt alone generates
    alone = model.generate(input_ids=ids[1:2, -3:], experts=[{"unified": 0, "cluster": "c2"}], max_new_tokens=3)
    assert generated[1, -3:].tolist() == alone[0, -3:].tolist()


def test_no_known_level_means_the_base_model():
    model = composed_model("llama", "prompt_tuning")
    resolved = ExpertHierarchy(model, levels=["cluster", "persona"]).resolve([{"cluster": "zz"}, {"persona": "p001"}])
    assert resolved.levels == [BASE_LEVEL, "persona"]
    assert resolved.experts == [{}, {"persona": "p001"}]


def test_hierarchy_errors():
    model = composed_model("llama", "prompt_tuning")
    with pytest.raises(ValueError, match="unknown adapter"):
        ExpertHierarchy(model, levels=["unified", "region"])
    with pytest.raises(ValueError, match="distinct"):
        ExpertHierarchy(model, levels=["unified", "unified"])
    with pytest.raises(ValueError, match="not levels"):
        ExpertHierarchy(model, levels=["unified", "persona"]).resolve([{"cluster": "c0"}])


def test_a_single_prompt_level_needs_no_id():
    model = peftkit.get_peft_model(tiny_model("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=2), "style")
    resolved = ExpertHierarchy(model, levels=["style"]).resolve([{}, {"style": None}])
    assert resolved.experts == [{"style": 0}, {}] and resolved.levels == ["style", BASE_LEVEL]
