"""Shared cases for the expert tests: a unified LoRA with cluster and persona banks on a tiny model."""

import torch

import peftkit
from tests.conftest import tiny_model

CLUSTERS = ["c0", "c1", "c2"]
PERSONAS = [f"p{i:03d}" for i in range(10)]
ROWS = [
    {"unified": 0, "cluster": "c0", "persona": "p003"},
    {"unified": 0, "cluster": "c2", "persona": "p007"},
    {"unified": 0, "cluster": "c1"},
    {"unified": 0},
    {},  # the bare base model
    {"unified": 0, "cluster": 0, "persona": 9},  # indices work as well as ids
]
LENGTHS = [6, 3, 5, 4, 2, 6]


def soft_config(kind, n, ids=None):
    if kind == "prompt_tuning":
        return peftkit.PromptTuningConfig(num_virtual_tokens=n, expert_ids=ids)
    return peftkit.PrefixTuningConfig(num_virtual_tokens=n, expert_ids=ids)


def composed_model(arch, kind):
    torch.manual_seed(0)
    lora = peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peftkit.get_peft_model(tiny_model(arch), lora, "unified")
    model.adapters["unified"].freeze()
    model.add_adapter("cluster", soft_config(kind, 2, CLUSTERS))
    model.add_adapter("persona", soft_config(kind, 3, PERSONAS))
    return model


def right_padded(lengths, seed=1):
    ids, mask = left_padded(lengths, seed)
    order = torch.argsort(mask, dim=1, descending=True, stable=True)  # real tokens first, in order
    return ids.gather(1, order), mask.gather(1, order)


def left_padded(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), width), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, : width - length] = 0
        ids[row, : width - length] = 0
    return ids, mask
