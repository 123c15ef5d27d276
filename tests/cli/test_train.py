"""``peftkit train`` end to end on a tiny local model folder."""

import json

import pytest
from safetensors.torch import load_file

from peftkit.cli.main import main
from peftkit.methods.registry import known_methods
from peftkit.training.checkpoint import list_checkpoints
from tests.training.conftest import run_yaml, write_tiny_folder
from tests.training.test_resume_after_kill import REPO


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def config(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    path = tmp_path / "run.yaml"
    text = run_yaml(tiny_folder, tmp_path / "out", max_steps=8, checkpoint_every=4, eval_every=4)
    train = f"  train: {tiny_folder / 'train.jsonl'}\n"
    path.write_text(text.replace(train, train + f"  eval: {{path: {tiny_folder / 'train.jsonl'}, limit: 8}}\n"))
    return path


def test_train_end_to_end(config, tmp_path, capsys):
    assert main(["train", str(config), "--no-progress", "training.lr=0.1", "gradient_hooks.hooks=[norm,health]"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "trainable params: 128 of 26,912" in out and "steps 8 batch 8 × 1 accumulation processes 1 lr 0.1" in out
    assert "Training summary" in out and "eval/loss" in out
    output = tmp_path / "out"
    files = ["adapter", "checkpoints", "config.yaml", "loss_curve.png", "metrics.jsonl"]
    assert sorted(p.name for p in output.iterdir()) == files
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list_checkpoints(output / "checkpoints") == [4, 8]
    resolved = (output / "checkpoints" / "step-000008" / "config.yaml").read_text()
    assert "lr: 0.1" in resolved and resolved == (output / "config.yaml").read_text()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    expected_keys = {"train/lr", "train/grad_norm", "train/tokens_per_second", "grad/norm/total", "grad/health/none"}
    assert expected_keys <= set(steps[0])
    assert [r["step"] for r in records if "eval/loss" in r] == [4, 8]
    config_json = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "PROMPT_TUNING" and config_json["num_virtual_tokens"] == 4


def test_existing_run_needs_resume_or_overwrite(config, capsys):
    assert main(["train", str(config), "--no-progress", "training.max_steps=4"]) == 0
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "already holds checkpoints of a run: pass --resume" in " ".join(capsys.readouterr().out.split())
    with pytest.warns(UserWarning, match="different learning-rate schedule"):
        assert main(["train", str(config), "--no-progress", "--resume", "training.max_steps=6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main(["train", str(config), "--no-progress", "--overwrite", "training.max_steps=2"]) == 0


def test_bad_values_are_reported_with_their_field(config, capsys):
    assert main(["train", str(config), "training.lr=-1", "training.scheduler=steps"]) == 2
    out = capsys.readouterr().out
    assert "training.lr = -1: Input should be greater than 0" in out
    assert "training.scheduler = 'steps': Input should be 'constant', 'linear' or 'cosine'" in out
    assert main(["train", str(config), "nonsense"]) == 2
    assert "must look like key=value" in capsys.readouterr().out


def test_print_config(config, capsys):
    assert main(["train", str(config), "--print-config", "adapters.default.num_virtual_tokens=7"]) == 0
    out = capsys.readouterr().out
    assert "num_virtual_tokens: 7" in out and "scheduler: linear" in out


def test_divergence_exits_with_a_clear_message(config, capsys):
    plugin = REPO / "tests" / "training" / "plugins.py"
    assert main(["train", str(config), "--no-progress", f"imports=[{plugin}]", "loss=test_nan"]) == 3
    out = " ".join(capsys.readouterr().out.split())
    assert "diverged: training stopped at step 1: the loss became nan" in out
    assert "no checkpoint had been written yet" in out


def test_a_frozen_adapter_under_a_new_one(config, tmp_path, capsys):
    """Seed 001's pattern: a saved adapter stays frozen while a second one trains on top of it."""
    assert main(["train", str(config), "--no-progress"]) == 0
    unified = tmp_path / "out" / "adapter"
    second = tmp_path / "second.yaml"
    second.write_text(
        config.read_text().replace(
            "  default: {peft_type: PROMPT_TUNING, num_virtual_tokens: 4}",
            f"  unified: {{from_pretrained: {unified}, trainable: false}}\n"
            "  persona: {peft_type: PREFIX_TUNING, num_virtual_tokens: 3}",
        )
    )
    assert main(["train", str(second), "--no-progress", f"output_dir={tmp_path / 'persona'}"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "adapters unified (PROMPT_TUNING), persona (PREFIX_TUNING)" in out
    before = load_file(unified / "adapter_model.safetensors")["prompt_embeddings"]
    after = load_file(tmp_path / "persona" / "adapter" / "unified" / "adapter_model.safetensors")["prompt_embeddings"]
    assert (before == after).all()
    assert (tmp_path / "persona" / "adapter" / "persona" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif("LORA" not in known_methods(), reason="LoRA is not registered yet (issue 3)")
def test_lora_and_a_soft_prompt_jointly(config, tmp_path):
    joint = config.read_text().replace(
        "  default: {peft_type: PROMPT_TUNING, num_virtual_tokens: 4}",
        "  default: {peft_type: LORA, r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}\n"
        "  prompt: {peft_type: PROMPT_TUNING, num_virtual_tokens: 4}",
    )
    (tmp_path / "joint.yaml").write_text(joint)
    assert main(["train", str(tmp_path / "joint.yaml"), "--no-progress", f"output_dir={tmp_path / 'joint'}"]) == 0
    assert (tmp_path / "joint" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "joint" / "adapter" / "prompt" / "adapter_model.safetensors").is_file()
