"""``peftkit package``: one ``NAME-VERSION.expert`` file per expert.

Layout (a zip archive; every member but ``checksums.json`` has its SHA-256 there)::

    manifest.json                               the manifest, resolved: fingerprint and weights filled in
    checksums.json                              {"algorithm": "sha256", "files": {member: digest}}
    soft_prompts/<name>/adapter_config.json     PEFT prompt-tuning config
    soft_prompts/<name>/adapter_model.safetensors
    adapters/<name>/adapter_config.json         PEFT config of each weight adapter
    adapters/<name>/adapter_model.safetensors
    config/decoding.json                        the resolved decoding settings
    config/training.json                        the resolved training run config (when the manifest trains)
    eval/report.json, eval/report.md            the evaluation report, when one exists

Weights are safetensors only: a folder holding ``.bin`` / ``.pt`` files instead is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from peftkit.experts.archive import CHECKSUMS, MANIFEST, ExpertPackageError, open_expert
from peftkit.experts.manifest import ExpertManifest, Fingerprint, load_manifest

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def base_fingerprint(name: str, hash_weights: bool = True) -> Fingerprint:
    """The fingerprint of a base model (alias or folder), from its config and weights file."""
    from transformers import AutoConfig

    from peftkit.models.loading import MANIFEST_NAME, resolve_model_folder, sha256

    folder = resolve_model_folder(name)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    return fingerprint_of_config(config, weights_sha256(folder, MANIFEST_NAME, sha256) if hash_weights else None)


def weights_sha256(folder: Path, cache_manifest: str, sha256: Any) -> str | None:
    """SHA-256 of ``model.safetensors``: from peftkit's verified cache record, else hashed now."""
    record = folder / cache_manifest
    if record.is_file():
        entry = json.loads(record.read_text()).get("files", {}).get("model.safetensors")
        if entry:
            return entry["sha256"]
    weights = folder / "model.safetensors"
    return sha256(weights) if weights.is_file() else None  # sharded weights: no single hash


def fingerprint_of_config(config: Any, weights: str | None = None) -> Fingerprint:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Fingerprint(
        architecture=(config.architectures or [type(config).__name__])[0],
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        weights_sha256=weights,
    )


def adapter_folder(weights_dir: Path, name: str) -> Path:
    """Where a training run put adapter ``name`` (PEFT layout: ``default`` at the top)."""
    return weights_dir if name == "default" else weights_dir / name


def read_adapter(folder: Path, name: str) -> tuple[dict[str, Any], bytes]:
    """An adapter folder's config and safetensors bytes (pickle formats are refused)."""
    weights, config = folder / WEIGHTS, folder / CONFIG
    if not weights.is_file():
        found = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f"; found {found}: pickle-based files are never packaged" if found else ""
        raise ExpertPackageError(f"{name}: no {WEIGHTS} in {folder}{hint}")
    if not config.is_file():
        raise ExpertPackageError(f"{name}: no {CONFIG} in {folder}")
    return json.loads(config.read_text()), weights.read_bytes()


def parse_tensors(data: bytes, where: str) -> dict[str, Any]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise ExpertPackageError(f"{where} is not a valid safetensors file ({exc})") from None


def check_shapes(manifest: ExpertManifest, tensors: dict[str, dict[str, Any]], fingerprint: Fingerprint) -> list[str]:
    """Tensor shapes against the manifest and the base fingerprint; one message per problem.

    Soft prompts: ``prompt_embeddings`` is ``[tokens, hidden_size]``. Weight adapters: every layer
    index in a key is below ``num_layers``, every tensor is finite and non-empty, and LoRA-family
    ranks equal ``r`` (module widths are checked when the adapter is loaded onto the model).
    """
    problems = []
    for prompt in manifest.soft_prompts:
        embeds = tensors.get(prompt.name, {}).get("prompt_embeddings")
        if embeds is None:
            problems.append(f"soft_prompts.{prompt.name}: no prompt_embeddings tensor")
            continue
        expected = (prompt.tokens, fingerprint.hidden_size)
        if tuple(embeds.shape) != expected:
            problems.append(
                f"soft_prompts.{prompt.name}: tensor shape {list(embeds.shape)} does not match tokens={prompt.tokens} "
                f"× hidden_size={fingerprint.hidden_size}"
            )
    for adapter in manifest.adapters:
        rank = adapter.config.get("r")
        for key, tensor in tensors.get(adapter.name, {}).items():
            layer = _layer_index(key)
            if layer is not None and layer >= fingerprint.num_layers:
                problems.append(
                    f"adapters.{adapter.name}: {key} is for layer {layer}; the base has {fingerprint.num_layers}"
                )
            if tensor.numel() == 0:
                problems.append(f"adapters.{adapter.name}: {key} is empty")
            if isinstance(rank, int) and adapter.type.upper() == "LORA":
                if key.endswith("lora_A.weight") and tensor.shape[0] != rank:
                    problems.append(f"adapters.{adapter.name}: {key} has rank {tensor.shape[0]}, config r={rank}")
                if key.endswith("lora_B.weight") and tensor.shape[1] != rank:
                    problems.append(f"adapters.{adapter.name}: {key} has rank {tensor.shape[1]}, config r={rank}")
    return problems


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    for before, value in itertools.pairwise(parts):
        if before in ("layers", "h", "layer", "blocks") and value.isdigit():
            return int(value)
    return None


def build_package(
    manifest_path: str | Path,
    *,
    weights_dir: str | Path | None = None,
    eval_report: str | Path | None = None,
    output_dir: str | Path = ".",
) -> Path:
    """Write ``NAME-VERSION.expert`` into ``output_dir``; returns its path.

    Args:
        weights_dir: the trained adapters (PEFT layout, one subfolder per name); default: the
            manifest's ``training.output_dir`` + ``/adapter``.
        eval_report: an evaluation ``report.json`` (its ``report.md`` beside it is packaged too);
            default: ``<training.output_dir>/eval/report.json`` when it exists.
    """
    from peftkit.experts.train import default_output_dir, run_config_data

    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    run_dir = Path(manifest.training.output_dir or default_output_dir(manifest)) if manifest.training else None
    if weights_dir is None:
        if run_dir is None:
            raise ExpertPackageError("give --weights DIR (the manifest has no training section to find them in)")
        weights_dir = run_dir / "adapter"
    weights_dir = Path(weights_dir)
    fingerprint = base_fingerprint(manifest.base_model.name)
    declared = manifest.base_model.fingerprint
    if declared is not None and (diff := declared.differences(fingerprint)):
        raise ExpertPackageError(
            f"the manifest's base fingerprint {declared.short()} does not match {manifest.base_model.name} "
            f"{fingerprint.short()} ({'; '.join(diff)})"
        )
    members: dict[str, bytes] = {}
    tensors: dict[str, dict[str, Any]] = {}
    prompts, adapters = [], []

    def add_member(where: str, config: dict[str, Any], data: bytes) -> str:
        """One adapter folder (config + safetensors) into the archive under ``where``; returns its weights path."""
        tensors[where.rsplit("/", 1)[1]] = parse_tensors(data, f"{where}/{WEIGHTS}")
        members[f"{where}/{CONFIG}"], members[f"{where}/{WEIGHTS}"] = _json(config), data
        return f"{where}/{WEIGHTS}"

    for prompt in manifest.soft_prompts:
        config, data = read_adapter(adapter_folder(weights_dir, prompt.name), f"soft prompt {prompt.name!r}")
        if config.get("peft_type") != "PROMPT_TUNING" or config.get("num_virtual_tokens") != prompt.tokens:
            raise ExpertPackageError(
                f"soft prompt {prompt.name!r}: the trained adapter is {config.get('peft_type')} with "
                f"{config.get('num_virtual_tokens')} tokens; the manifest declares PROMPT_TUNING with {prompt.tokens}"
            )
        weights = add_member(f"soft_prompts/{prompt.name}", config, data)
        prompts.append(prompt.model_copy(update={"weights": weights}))
    for adapter in manifest.adapters:
        config, data = read_adapter(adapter_folder(weights_dir, adapter.name), f"adapter {adapter.name!r}")
        if str(config.get("peft_type")).upper() != adapter.type.upper():
            raise ExpertPackageError(
                f"adapter {adapter.name!r}: the trained adapter is {config.get('peft_type')}, "
                f"the manifest says {adapter.type}"
            )
        weights = add_member(f"adapters/{adapter.name}", config, data)
        adapters.append(adapter.model_copy(update={"weights": weights}))
    resolved = manifest.model_copy(
        update={
            "base_model": manifest.base_model.model_copy(update={"fingerprint": fingerprint}),
            "soft_prompts": prompts,
            "adapters": adapters,
        }
    )
    if problems := check_shapes(resolved, tensors, fingerprint):
        raise ExpertPackageError("; ".join(problems))
    members["config/decoding.json"] = _json(resolved.decoding.model_dump(mode="json"))
    if manifest.training is not None:
        members["config/training.json"] = _json(run_config_data(resolved, manifest_path.parent, resolve=True))
    if eval_report is None and run_dir is not None and (run_dir / "eval" / "report.json").is_file():
        eval_report = run_dir / "eval" / "report.json"
    if eval_report is not None:
        report = Path(eval_report)
        members["eval/report.json"] = _json(json.loads(report.read_text()))
        if (report.parent / "report.md").is_file():
            members["eval/report.md"] = (report.parent / "report.md").read_bytes()
    # only what the author set (and what packaging filled in): chat reports the rest as defaults
    members = {MANIFEST: _json(resolved.model_dump(mode="json", exclude_none=True, exclude_unset=True)), **members}
    return write_archive(members, Path(output_dir) / resolved.package_name)


def _json(value: Any) -> bytes:
    # key order is kept: a JSON Schema's property order is the order grammar-constrained output follows
    return (json.dumps(value, indent=2) + "\n").encode()


def write_archive(members: dict[str, bytes], path: Path) -> Path:
    """Write the zip (members + ``checksums.json``) atomically: a temporary file renamed into place."""
    checksums = {"algorithm": "sha256", "files": {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in [*members.items(), (CHECKSUMS, _json(checksums))]:
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible bytes
                info.external_attr = 0o100644 << 16
                info.create_system = 3
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def inspect_expert(path: str | Path) -> dict[str, Any]:
    """What an expert holds: the manifest summary, each member with size and SHA-256, tensor shapes."""
    from peftkit.experts.manifest import parse_manifest

    with open_expert(path) as archive:
        manifest = parse_manifest(archive.read_json(MANIFEST), f"{Path(path).name}:{MANIFEST}")
        files = [
            {"name": n, "bytes": i.file_size, "sha256": archive.checksums.get(n)} for n, i in archive.members.items()
        ]
        shapes = {}
        for name in archive.members:
            if name.endswith(WEIGHTS):
                shapes[name] = {k: list(v.shape) for k, v in parse_tensors(archive.read(name), name).items()}
        report = archive.read_json("eval/report.json") if "eval/report.json" in archive.members else None
    return {
        "name": manifest.name,
        "version": manifest.version,
        "description": manifest.description,
        "base_model": manifest.base_model.model_dump(mode="json", exclude_none=True),
        "soft_prompts": [p.model_dump(mode="json", exclude_none=True) for p in manifest.soft_prompts],
        "adapters": [a.model_dump(mode="json", exclude_none=True) for a in manifest.adapters],
        "decoding": manifest.decoding.model_dump(mode="json", exclude_none=True),
        "runtime": manifest.runtime.model_dump(mode="json"),
        "quality_targets": manifest.quality_targets,
        "evaluation": None if report is None else {v: r.get("values") for v, r in report.get("variants", {}).items()},
        "files": files,
        "tensors": shapes,
    }
