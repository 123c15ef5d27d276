"""peftkit train MANIFEST, package, inspect, validate and load, on a tiny expert."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.cli.main import main
from peftkit.experts.archive import ExpertPackageError, extract_expert
from peftkit.experts.load import load_expert
from peftkit.experts.package import build_package, inspect_expert
from peftkit.experts.validate import validate_target


def test_train_manifest_trains_soft_prompts_and_lora_jointly(trained_manifest, char_base):
    run = yaml.safe_load(trained_manifest.read_text())["training"]["output_dir"]
    adapters = {n: load_file(f"{run}/adapter/{n}/adapter_model.safetensors") for n in ("style", "task", "lora")}
    assert adapters["style"]["prompt_embeddings"].shape == (3, 32)
    assert adapters["task"]["prompt_embeddings"].shape == (2, 32)
    model, tokenizer = char_base
    text_init = model.get_input_embeddings()(torch.tensor(tokenizer("json")["input_ids"][:3]))
    assert not torch.allclose(adapters["style"]["prompt_embeddings"], text_init)  # trained away from its init
    b = [v for k, v in adapters["lora"].items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # LoRA B starts at zero: non-zero means it was trained


def test_package_holds_manifest_safetensors_configs_and_checksums(expert_file):
    assert expert_file.name == "tiny-json-0.1.0.expert"
    names = set(zipfile.ZipFile(expert_file).namelist())
    files = ("adapter_config.json", "adapter_model.safetensors")
    folders = ("soft_prompts/style", "soft_prompts/task", "adapters/lora")
    configs = {"manifest.json", "checksums.json", "config/decoding.json", "config/training.json"}
    assert names == configs | {f"{d}/{f}" for d in folders for f in files}
    info = inspect_expert(expert_file)
    fingerprint = dict(info["base_model"]["fingerprint"])
    digest = fingerprint.pop("weights_sha256")
    assert fingerprint == {"architecture": "LlamaForCausalLM", "hidden_size": 32, "num_layers": 2, "vocab_size": 128}
    assert len(digest) == 64
    assert info["tensors"]["soft_prompts/style/adapter_model.safetensors"] == {"prompt_embeddings": [3, 32]}
    assert all(len(f["sha256"]) == 64 for f in info["files"] if f["name"] != "checksums.json")


def test_loaded_expert_equals_the_trained_adapters(expert_file, trained_manifest, char_base):
    from peftkit import PeftModel

    expert = load_expert(expert_file, base=char_base)
    assert expert.model.active_adapters == ["style", "task", "lora"]
    run = yaml.safe_load(trained_manifest.read_text())["training"]["output_dir"]
    from peftkit import load_base

    base, _ = load_base(trained_manifest.parent)
    reference = PeftModel.from_pretrained(base, f"{run}/adapter/style", adapter_name="style")
    reference.load_adapter(f"{run}/adapter/task", "task")
    reference.load_adapter(f"{run}/adapter/lora", "lora")
    reference.set_adapter(["style", "task", "lora"])
    ids = torch.tensor([[5, 9, 20, 7]])
    torch.testing.assert_close(expert.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_validate_reports_every_field(expert_file, capsys):
    report = validate_target(expert_file)
    assert report.ok, report.errors
    paths = {f.path for f in report.fields}
    for expected in ("name", "version", "base_model.fingerprint.hidden_size", "soft_prompts[style].tokens",
                     "soft_prompts[task].init_method", "adapters[lora].config", "decoding.temperature",
                     "decoding.grammar", "decoding.stop", "runtime.attention_kernel",
                     "runtime.requires_kv_cache_persistence", "training.config", "quality_targets"):  # fmt: skip
        assert expected in paths
    warned = {f.path for f in report.warnings}
    assert warned == {"quality_targets"}  # no evaluation report was packaged
    assert main(["validate", str(expert_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True and data["kind"] == "package"
    assert {"path": "decoding.temperature", "value": 0.7, "status": "applied",
            "note": "used by chat and generate (command-line flags override it)"} in data["fields"]  # fmt: skip


def test_validate_errors_exit_non_zero(tmp_path, char_folder, capsys):
    from tests.experts.conftest import manifest_dict

    bad = manifest_dict(char_folder, tmp_path / "run")
    bad["decoding"]["grammar"] = {"gbnf": 'root ::= "a" undefined_rule'}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "error: decoding.grammar" in out and "undefined_rule" in out
    bad["decoding"] = {"temperature": 2.5, "top_p": 0}
    path.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(path), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert "decoding.temperature=2.5: Input should be less than or equal to 2" in errors[0]
    assert "decoding.top_p=0: Input should be greater than 0" in errors[0]


def test_mismatched_base_model_names_both_fingerprints(expert_file, tmp_path):
    from tests.conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("qwen2").save_pretrained(other)
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ExpertPackageError, match=r"LlamaForCausalLM \(hidden 32.*Qwen2ForCausalLM \(hidden 32"):
        load_expert(expert_file, base_name=str(other))


def test_package_refuses_pickle_weights(trained_manifest, tmp_path):
    weights = tmp_path / "weights"
    for name in ("style", "task", "lora"):
        (weights / name).mkdir(parents=True)
        (weights / name / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ExpertPackageError, match=r"style.*adapter_model.bin.*pickle-based files are never packaged"):
        build_package(trained_manifest, weights_dir=weights, output_dir=tmp_path)
    assert not list(tmp_path.glob("*.expert"))


def test_extract_writes_only_inside_the_target(expert_file, tmp_path):
    written = extract_expert(expert_file, tmp_path / "unpacked")
    assert all((tmp_path / "unpacked").resolve() in p.parents for p in written)
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == [
        "adapters", "checksums.json", "config", "manifest.json", "soft_prompts"]  # fmt: skip
    with pytest.raises(ExpertPackageError, match="must be an empty folder"):
        extract_expert(expert_file, tmp_path / "unpacked")
