"""Conformance: the same user-level script, run with ``peft`` and with ``peftkit``, gives equal results.

Each script in :mod:`tests.interop.scripts` is written once against PEFT's API and takes the library
module as its argument; the test runs it with both and compares every returned value (tensors with
``assert_close``, the rest with ``==``). Deliberate differences are left out of the scripts and
listed in ``docs/peft-compatibility.md``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import peftkit
from tests.interop import scripts

LIBRARIES = {"peft": peft, "peftkit": peftkit}

SCRIPTS = [
    # PeftModel API
    scripts.base_model_layout,
    scripts.status,
    scripts.status_of_soft_prompt,
    scripts.requires_grad,
    scripts.targeted_modules,
    scripts.gradient_checkpointing,
    scripts.generate_scores,
    scripts.delete_active_adapter,
    scripts.delete_active_prompt,
    scripts.prefix_position_ids,
    scripts.from_pretrained_keeps_config,
    scripts.model_card,
    # task types and plain modules
    scripts.seq_cls,
    scripts.token_cls,
    scripts.question_answering,
    scripts.feature_extraction,
    scripts.adalora_seq_cls_loss,
    scripts.plain_mlp,
    scripts.inject_into_mlp,
    scripts.tuner_model_directly,
    scripts.task_from_pretrained,
    scripts.auto_model,
    # configs and helpers
    scripts.config_dataclass,
    scripts.state_dict_helpers,
    scripts.load_weights,
    scripts.get_peft_config,
    scripts.kbit_preparation,
    scripts.no_matching_module,
]
NEEDS_FOLDER = {
    scripts.from_pretrained_keeps_config,
    scripts.model_card,
    scripts.task_from_pretrained,
    scripts.auto_model,
    scripts.load_weights,
}


def run(script: Any, lib: Any, tmp_path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if script in NEEDS_FOLDER:
            folder = tmp_path / lib.__name__
            folder.mkdir()
            return script(lib, folder)
        return script(lib)


def assert_same(ours: Any, theirs: Any, where: str = "result") -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
    elif isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"{where}: keys differ: {set(ours) ^ set(theirs)}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, list | tuple) and any(isinstance(v, dict | torch.Tensor) for v in theirs):
        assert len(ours) == len(theirs), f"{where}: {len(ours)} items, PEFT has {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        ours = getattr(ours, "value", ours)
        theirs = getattr(theirs, "value", theirs)
        assert ours == theirs, f"{where}: peftkit {ours!r} != peft {theirs!r}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_same_script_same_result(script, tmp_path):
    theirs = run(script, peft, tmp_path)
    ours = run(script, peftkit, tmp_path)
    assert_same(ours, theirs)


# ---------------------------------------------------------------------------------- files across libraries
FILE_CASES = {
    "seq_cls": (scripts.llama_seq_cls, "SEQ_CLS", ["q_proj", "v_proj"]),
    "token_cls": (lambda: scripts.bert(scripts.BertForTokenClassification, num_labels=5), "TOKEN_CLS", ["query"]),
    "mlp": (scripts.mlp, None, ["lin0"]),
}


def _outputs(model: Any, case: str) -> torch.Tensor:
    if case == "mlp":
        return model(scripts.X)
    return model(input_ids=scripts.IDS, attention_mask=scripts.MASK).logits


@pytest.mark.parametrize("case", list(FILE_CASES))
@pytest.mark.parametrize(("writer", "reader"), [("peftkit", "peft"), ("peft", "peftkit")])
def test_task_adapter_files_cross_libraries(case, writer, reader, tmp_path):
    build, task_type, targets = FILE_CASES[case]
    write_lib, read_lib = LIBRARIES[writer], LIBRARIES[reader]
    extra = {"task_type": task_type} if task_type else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = write_lib.get_peft_model(build(), write_lib.LoraConfig(r=4, target_modules=targets, **extra))
        scripts.fill_adapter(write_lib, saved)
        saved.save_pretrained(tmp_path)
        loaded = read_lib.PeftModel.from_pretrained(build(), tmp_path)
    assert type(loaded).__name__ == type(saved).__name__
    torch.testing.assert_close(_outputs(loaded, case), _outputs(saved, case), atol=1e-5, rtol=1e-5)
