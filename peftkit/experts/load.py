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
    from peftkit.experts.package import base_fingerprint, check_shapes, fingerprint_of_config, parse_tensors
    from peftkit.experts.runtime import apply_attention_kernel
    from peftkit.models.loading import load_base
    from peftkit.models.peft_model import PeftModel

    path = Path(path)
    with open_expert(path) as archive:
        manifest = parse_manifest(archive.read_json(MANIFEST), f"{path.name}:{MANIFEST}")
        entries = [*manifest.soft_prompts, *manifest.adapters]
        raw: dict[str, tuple[Any, bytes]] = {}
        for entry in entries:
            if entry.weights is None or entry.weights not in archive.members:
                raise ExpertPackageError(
                    f"{path.name}: {entry.name}'s weights {entry.weights!r} are not in the package"
                )
            config_name = entry.weights.rsplit("/", 1)[0] + "/adapter_config.json"
            if config_name not in archive.members:
                raise ExpertPackageError(f"{path.name}: no {config_name}")
            raw[entry.name] = (archive.read_json(config_name), archive.read(entry.weights))
    name = base_name or manifest.base_model.name
    if base is None:
        declared = manifest.base_model.fingerprint
        actual = base_fingerprint(name, hash_weights=declared is not None and declared.weights_sha256 is not None)
        check_fingerprint(manifest, actual, name)
        model, tokenizer = load_base(name, device=device)
    else:
        model, tokenizer = base
        check_fingerprint(manifest, fingerprint_of_config(model.config), name)
    tensors = {n: parse_tensors(data, f"{n} weights") for n, (_, data) in raw.items()}
    fingerprint = manifest.base_model.fingerprint
    assert fingerprint is not None
    if problems := check_shapes(manifest, tensors, fingerprint):
        raise ExpertPackageError("; ".join(problems))
    kernel, warning = apply_attention_kernel(model, manifest.runtime.attention_kernel)
    peft_model = None
    for entry in entries:
        try:
            config = PeftConfig.from_dict(raw[entry.name][0]).model_copy(update={"inference_mode": True})
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
