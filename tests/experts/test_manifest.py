"""The manifest: schema file in sync, field checks, example manifests, generated bad manifests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.experts.manifest import ManifestError, load_manifest, parse_manifest
from peftkit.experts.schema import SCHEMA_PATH, manifest_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "experts").glob("*/expert.yaml"))
GOOD = {
    "name": "demo",
    "version": "1.0.0",
    "base_model": {"name": "smollm2-135m-instruct"},
    "soft_prompts": [{"name": "p", "tokens": 4}],
    "decoding": {"temperature": 0.5},
    "runtime": {"attention_kernel": "sdpa"},
}


def test_schema_file_is_in_sync_with_the_model():
    """Regenerate with ``python -m peftkit.experts.schema`` when this fails."""
    assert json.loads(SCHEMA_PATH.read_text()) == manifest_schema()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_manifests_are_valid_for_both_the_model_and_the_schema_file(path):
    manifest = load_manifest(path)
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA_PATH.read_text()))
    assert manifest.training is not None and (manifest.soft_prompts or manifest.adapters)


def test_there_are_three_example_experts():
    assert {p.parent.name for p in EXAMPLES} == {"json", "sql", "sentiment"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decoding": {"temperature": 2.5}}, "decoding.temperature=2.5: Input should be less than or equal to 2"),
        ({"decoding": {"top_p": 0}}, "decoding.top_p=0: Input should be greater than 0"),
        ({"decoding": {"top_k": -3}}, "decoding.top_k=-3: Input should be greater than or equal to 0"),
        ({"decoding": {"max_new_tokens": 0}}, "decoding.max_new_tokens=0"),
        ({"decoding": {"grammar": {"gbnf": "x", "json_schema": {}}}}, "exactly one of json_schema or gbnf"),
        ({"soft_prompts": [{"name": "p", "tokens": 0}]}, "soft_prompts.0.tokens=0"),
        ({"soft_prompts": [{"name": "p", "tokens": 4, "init_method": "text"}]}, "init_method text needs init_text"),
        ({"soft_prompts": [{"name": "p", "tokens": 4, "init_method": "magic"}]}, "init_method='magic'"),
        ({"soft_prompts": [{"name": "../p", "tokens": 4}]}, "soft_prompts.0.name='../p'"),
        ({"soft_prompts": [{"name": "p", "tokens": 4}, {"name": "p", "tokens": 2}]}, "repeated: \\['p'\\]"),
        ({"soft_prompts": [], "adapters": []}, "at least one soft prompt or adapter"),
        ({"adapters": [{"name": "l", "type": "LORA", "config": {"r": 0}}]}, "adapters.l"),
        ({"adapters": [{"name": "l", "type": "NOPE"}]}, "peft_type = 'NOPE'"),
        ({"runtime": {"attention_kernel": "warp_drive"}}, "runtime.attention_kernel='warp_drive'"),
        ({"runtime": {"hints": 1}}, "runtime.hints=1: Extra inputs are not permitted"),
        ({"quality_targets": ["accuracy >> 3"]}, "quality_targets"),
        ({"version": "one"}, "version='one'"),
        ({"name": "Bad Name"}, "name='Bad Name'"),
        ({"telemetry": True}, "telemetry=True: Extra inputs are not permitted"),
        (
            {
                "base_model": {
                    "name": "x",
                    "fingerprint": {"architecture": "A", "hidden_size": 0, "num_layers": 1, "vocab_size": 1},
                }
            },
            "hidden_size=0",
        ),
        ({"training": {"data": {"train": "x.jsonl"}, "config": {"lr": -1}}}, "training.config: lr=-1"),
        ({"training": {"data": {}}}, "training.data"),
    ],
)
def test_invalid_fields_are_errors_that_name_the_field(change, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest({**GOOD, **change})


def test_missing_required_fields_are_named():
    with pytest.raises(ManifestError, match="version: Field required; base_model: Field required"):
        parse_manifest({"name": "x"})
    with pytest.raises(ManifestError, match="a manifest is a mapping"):
        parse_manifest(["name"])


# ---------------------------------------------------------------- generated bad manifests
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PATHS = [("name",), ("version",), ("base_model",), ("base_model", "name"), ("soft_prompts",), ("soft_prompts", 0),
         ("soft_prompts", 0, "tokens"), ("soft_prompts", 0, "init_method"), ("decoding",), ("decoding", "temperature"),
         ("decoding", "top_p"), ("decoding", "top_k"), ("decoding", "stop"), ("decoding", "grammar"), ("runtime",),
         ("runtime", "attention_kernel"), ("quality_targets",), ("adapters",), ("training",)]  # fmt: skip


def mutate(value: dict, path: tuple, new: object) -> dict:
    out = copy.deepcopy(value)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), new=JSONISH)
def test_generated_manifests_are_accepted_or_refused_with_a_manifest_error(path, new):
    data = mutate(GOOD, path, new)
    try:
        manifest = parse_manifest(data)
    except ManifestError as exc:
        message = str(exc)
    else:
        message = None
    if message is not None:
        assert message.startswith("manifest: ") and len(message) > len("manifest: ")
        return
    # accepted: every value is in range
    d = manifest.decoding
    assert 0 <= d.temperature <= 2 and 0 < d.top_p <= 1 and d.top_k >= 0 and d.max_new_tokens >= 1
    assert all(p.tokens >= 1 for p in manifest.soft_prompts)


@settings(max_examples=200, deadline=None)
@given(temperature=st.floats(allow_nan=True, allow_infinity=True), top_p=st.floats(allow_nan=True, width=32),
       top_k=st.integers(-100, 100))  # fmt: skip
def test_decoding_ranges_hold_for_every_generated_value(temperature, top_p, top_k):
    data = {**GOOD, "decoding": {"temperature": temperature, "top_p": top_p, "top_k": top_k}}
    valid = 0 <= temperature <= 2 and 0 < top_p <= 1 and top_k >= 0
    if valid:
        parse_manifest(data)
    else:
        with pytest.raises(ManifestError, match="decoding.(temperature|top_p|top_k)"):
            parse_manifest(data)


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(max_size=64) | st.text(max_size=64))
def test_garbage_files_are_manifest_errors(garbage, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "expert.yaml"
    path.write_bytes(garbage if isinstance(garbage, bytes) else garbage.encode())
    with pytest.raises(ManifestError):
        load_manifest(path)
