"""Every example config in examples/ is valid; the soft-prompt ones train (shrunk to a tiny model)."""

from pathlib import Path

import pytest

from peftkit.cli.main import main
from peftkit.methods.registry import known_methods
from peftkit.training.overrides import load_run_config, read_config_tree

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def needs(path: Path) -> set[str]:
    return {spec.get("peft_type") for spec in read_config_tree(path)["adapters"].values()} - {None}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path):
    assert needs(path) <= set(known_methods())  # every method an example uses is shipped
    config = load_run_config(path)
    assert config.output_dir.startswith("runs/")
    assert {spec.peft_type for spec in config.peft_configs().values()} == needs(path)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "p_tuning", "distillation"])
def test_example_trains_on_a_tiny_model(name, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    overrides = [
        f"model.name={tiny_folder}",
        "data.train.limit=24",
        "data.eval.limit=8",
        "training.max_steps=3",
        "training.eval_every=3",
        "training.checkpoint_every=3",
        f"output_dir={tmp_path}",
    ]
    if name == "prompt_tuning":
        overrides.append(f"adapters.default.tokenizer_name_or_path={tiny_folder}")
    assert main(["train", f"examples/{name}.yaml", "--no-progress", *overrides]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
