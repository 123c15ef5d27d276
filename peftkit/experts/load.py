"""Loading an expert onto its base model, safely.

Order matters: the archive's names, sizes and checksums are checked first (:func:`open_expert`),
then the manifest, then the base model's fingerprint, and only then are tensors parsed (from memory:
loading writes nothing to disk) and placed on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.experts.archive import MANIFEST, ExpertPackageError, open_expert
from peftkit.experts.manifest import ExpertManifest, Fingerprint, parse_manifest


@dataclass
class LoadedExpert:
    """An expert on its base model: every soft prompt and adapter loaded, frozen and active."""

    manifest: ExpertManifest
    model: Any
    tokenizer: Any
    attention_kernel: str
    notes: list[str] = field(default_factory=list)


@dataclass
class ExpertContents:
    """A package's checked contents, in memory: the manifest and, per soft prompt / adapter, its
    config and tensors."""

    manifest: ExpertManifest
    configs: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, Any]]
    members: dict[str, bytes]


def read_expert(path: str | Path, limits: Any = None, *, shapes: bool = True) -> ExpertContents:
    """Open, check and read a package: archive safety and checksums (:func:`open_expert`), the
    manifest, every declared weights file present with its config, tensors parsed from memory and
    their shapes checked against the manifest (tokens, hidden size, layers, ranks)."""
    from peftkit.experts.package import check_shapes, parse_tensors

    path = Path(path)
    with open_expert(path, limits) as archive:
        manifest = parse_manifest(archive.read_json(MANIFEST), f"{path.name}:{MANIFEST}")
        members = {name: archive.read(name) for name in archive.members}
        configs: dict[str, dict[str, Any]] = {}
        for entry in [*manifest.soft_prompts, *manifest.adapters]:
            if entry.weights is None or entry.weights not in archive.members:
                raise ExpertPackageError(f"{path.name}: {entry.name}'s weights {entry.weights!r} are not in it")
            config_name = entry.weights.rsplit("/", 1)[0] + "/adapter_config.json"
            if config_name not in archive.members:
                raise ExpertPackageError(f"{path.name}: no {config_name}")
            configs[entry.name] = archive.read_json(config_name)
    if manifest.base_model.fingerprint is None:
        raise ExpertPackageError(f"{manifest.name}: the manifest has no base_model.fingerprint (package it first)")
    tensors = {n: parse_tensors(members[e.weights], e.weights) for n, e in _entries(manifest).items()}
    if shapes and (problems := check_shapes(manifest, tensors, manifest.base_model.fingerprint)):
        raise ExpertPackageError("; ".join(problems))
    return ExpertContents(manifest, configs, tensors, members)


def _entries(manifest: ExpertManifest) -> dict[str, Any]:
    return {e.name: e for e in [*manifest.soft_prompts, *manifest.adapters]}


def check_fingerprint(manifest: ExpertManifest, actual: Fingerprint, base_name: str) -> None:
    declared = manifest.base_model.fingerprint
    if declared is None:
        raise ExpertPackageError(f"{manifest.name}: the manifest has no base_model.fingerprint (package it first)")
    if diff := declared.differences(actual):
        raise ExpertPackageError(
            f"expert {manifest.name} {manifest.version} was built for {manifest.base_model.name}: "
            f"{declared.short()}, but the base model {base_name} is {actual.short()} ({'; '.join(diff)})"
        )


def load_expert(
    path: str | Path,
    *,
    base: tuple[Any, Any] | None = None,
    base_name: str | None = None,
    device: str = "cpu",
) -> LoadedExpert:
    """Load the expert file ``path``.

    Args:
        base: an already loaded ``(model, tokenizer)`` to put it on (default: load the manifest's base).
        base_name: load this base model instead of the manifest's (its fingerprint must still match).
    """
    from peftkit.config import PeftConfig
    from peftkit.experts.package import base_fingerprint, fingerprint_of_config
    from peftkit.experts.runtime import apply_attention_kernel
    from peftkit.models.loading import load_base
    from peftkit.models.peft_model import PeftModel

    path = Path(path)
    contents = read_expert(path, shapes=False)  # the base fingerprint is checked first: its error is clearer
    manifest = contents.manifest
    entries = list(_entries(manifest).values())
    name = base_name or manifest.base_model.name
    if base is None:
        declared = manifest.base_model.fingerprint
        actual = base_fingerprint(name, hash_weights=declared is not None and declared.weights_sha256 is not None)
        check_fingerprint(manifest, actual, name)
        model, tokenizer = load_base(name, device=device)
    else:
        model, tokenizer = base
        check_fingerprint(manifest, fingerprint_of_config(model.config), name)
    tensors = contents.tensors
    from peftkit.experts.package import check_shapes

    if problems := check_shapes(manifest, tensors, fingerprint_of_config(model.config)):
        raise ExpertPackageError("; ".join(problems))
    kernel, warning = apply_attention_kernel(model, manifest.runtime.attention_kernel)
    peft_model = None
    for entry in entries:
        try:
            config = PeftConfig.from_dict(contents.configs[entry.name]).model_copy(update={"inference_mode": True})
        except ValueError as exc:
            raise ExpertPackageError(f"{entry.name}: adapter_config.json is invalid ({exc})") from None
        if peft_model is None:
            peft_model = PeftModel(model, config, entry.name, initialize=False)
        else:
            peft_model.add_adapter(entry.name, config, initialize=False)
        adapter = peft_model.adapters[entry.name]
        try:
            adapter.load_adapter_state_dict({k: v.to(device) for k, v in tensors[entry.name].items()}, trainable=False)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ExpertPackageError(f"{entry.name}: its tensors do not fit the base model ({exc})") from None
        adapter.freeze()
    assert peft_model is not None
    peft_model.set_adapter([e.name for e in entries])
    peft_model.eval()
    return LoadedExpert(manifest, peft_model, tokenizer, kernel, [warning] if warning else [])
