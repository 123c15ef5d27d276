"""The ``device`` setting: how it resolves, and the errors for a GPU that is not there (CPU-only plumbing;
``scripts/gpu_check.sh`` runs the same paths on a real GPU)."""

import pytest
import torch

from peftkit.device import check_device_setting, resolve_device
from peftkit.training.distributed import Distributed


def test_auto_and_cpu_on_a_machine_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cuda', but no CUDA GPU is visible"):
        resolve_device("cuda")


def test_auto_takes_the_process_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"only 2 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_unknown_settings_name_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"auto \| cpu \| cuda \| cuda:N"):
        check_device_setting(bad)


def test_a_single_process_follows_the_setting(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Distributed.from_environment("cpu").device() == torch.device("cpu")
    assert Distributed.from_environment("cpu").comm_device == torch.device("cpu")


def test_run_config_validates_the_device():
    from peftkit.training.config import ConfigError
    from peftkit.training.overrides import validate_config

    tree = {
        "adapters": {"default": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}},
        "data": {"train": "rotten_tomatoes"},
        "model": {"device": "tpu"},
    }
    with pytest.raises(ConfigError, match=r"model.device = 'tpu': device must be one of auto"):
        validate_config(tree)
    tree["model"]["device"] = "cuda:1"
    assert validate_config(tree).model.device == "cuda:1"


def test_demo_refuses_a_missing_gpu(monkeypatch, capsys):
    from peftkit.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda", "--steps", "1"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().out
