"""``target_modules=None``: every weight method adapts exactly the modules PEFT adapts (PEFT as the oracle)."""

from __future__ import annotations

import warnings

import peft
import peft.utils.constants as peft_constants
import pytest
import torch

import peftkit
from peftkit.methods.tuners.defaults import DEFAULT_TARGETS
from peftkit.methods.tuners.layer import AdaptedLayer
from tests.conftest import ARCHS, tiny_model

PEFT_TABLES = {
    "lora": ["LORA", "LOHA", "LOKR", "OFT", "BOFT"],
    "vera": ["VERA"],
    "adalora": ["ADALORA"],
    "ia3": ["IA3"],
}

CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(),
    "loha": lambda lib: lib.LoHaConfig(),
    "lokr": lambda lib: lib.LoKrConfig(),
    "oft": lambda lib: lib.OFTConfig(oft_block_size=8, r=0),
    "boft": lambda lib: lib.BOFTConfig(boft_block_size=8),
    "vera": lambda lib: lib.VeraConfig(r=4),
    "adalora": lambda lib: lib.AdaLoraConfig(total_step=10),
    "ia3": lambda lib: lib.IA3Config(),
}
#: PEFT 0.21 cannot wrap GPT-2's Conv1D with these (see weight_cases.py); peftkit can.
PEFT_CANNOT_WRAP_CONV1D = {"loha", "lokr", "oft", "boft"}


@pytest.mark.parametrize("table", sorted(PEFT_TABLES))
def test_tables_equal_peft(table):
    for method in PEFT_TABLES[table]:
        theirs = getattr(peft_constants, f"TRANSFORMERS_MODELS_TO_{method}_TARGET_MODULES_MAPPING")
        assert DEFAULT_TARGETS[table] == theirs, method
    if table == "ia3":
        feedforward = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
        assert DEFAULT_TARGETS["ia3_feedforward"] == feedforward


def adapted(model: torch.nn.Module, cls: type) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_wrap_what_peft_wraps(method, arch):
    ours = peftkit.get_peft_model(tiny_model(arch), CONFIGS[method](peftkit))
    mine = {n.removeprefix("base_model.model.") for n, m in ours.named_modules() if isinstance(m, AdaptedLayer)}
    assert mine
    if arch == "gpt2" and method in PEFT_CANNOT_WRAP_CONV1D:
        assert mine == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model(arch), CONFIGS[method](peft))
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
    }
    assert mine == wrapped
    config = ours.peft_config["default"]
    assert sorted(config.target_modules) == sorted(theirs.peft_config["default"].target_modules)
    if method == "ia3":
        assert sorted(config.feedforward_modules) == sorted(theirs.peft_config["default"].feedforward_modules)


def test_unknown_model_type_asks_for_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is not set.*model type None"):
        peftkit.get_peft_model(model, peftkit.LoraConfig())
