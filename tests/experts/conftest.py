"""A tiny expert, trained and packaged once per session: a char-level Llama that can spell JSON,
two soft prompts and a LoRA trained jointly from a manifest."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tests.evaluation.conftest import write_char_folder

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["n"],
    "additionalProperties": False,
}


def manifest_dict(folder: Path, output: Path) -> dict:
    return {
        "name": "tiny-json",
        "version": "0.1.0",
        "description": "numbers as JSON",
        "base_model": {"name": str(folder)},
        "soft_prompts": [
            {"name": "style", "tokens": 3, "init_method": "text", "init_text": "json", "purpose": "format"},
            {"name": "task", "tokens": 2, "init_method": "random"},
        ],
        "adapters": [
            {
                "name": "lora",
                "type": "LORA",
                "config": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            }
        ],
        "training": {
            "data": {"train": "train.jsonl", "max_length": 64},
            "formatter": "prompt_completion",
            "config": {"lr": 0.05, "max_steps": 3, "batch_size": 8},
            "output_dir": str(output),
        },
        "decoding": {"temperature": 0.7, "max_new_tokens": 12, "stop": ["}"], "grammar": {"json_schema": SCHEMA}},
        "runtime": {"attention_kernel": "sdpa", "requires_kv_cache_persistence": True},
        "quality_targets": ["schema_compliance >= 0.9"],
    }


@pytest.fixture(scope="session")
def char_folder(tmp_path_factory) -> Path:
    folder = write_char_folder(tmp_path_factory.mktemp("chars"))
    rng = random.Random(0)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(16):
            n = rng.randint(1, 99)
            f.write(
                json.dumps({"prompt": f"num {n}", "completion": json.dumps({"n": n}, separators=(",", ":"))}) + "\n"
            )
    return folder


@pytest.fixture(scope="session")
def trained_manifest(char_folder, tmp_path_factory) -> Path:
    """The manifest, trained (3 steps) with ``peftkit train MANIFEST``."""
    from peftkit.cli.main import main

    root = tmp_path_factory.mktemp("expert")
    path = char_folder / "expert.yaml"
    path.write_text(yaml.safe_dump(manifest_dict(char_folder, root / "run"), sort_keys=False))
    assert main(["train", str(path), "--no-progress"]) == 0
    return path


@pytest.fixture(scope="session")
def expert_file(trained_manifest, tmp_path_factory) -> Path:
    from peftkit.experts.package import build_package

    return build_package(trained_manifest, output_dir=tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="session")
def char_base(char_folder):
    from peftkit import load_base

    return load_base(char_folder)
