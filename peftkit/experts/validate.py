"""``peftkit validate``: schema and semantic checks, and the status of every manifest field.

Each field gets one line: ``applied`` (with how it is applied), ``unsupported`` (a warning: it
cannot take effect here, and the line says why) or ``error``. Errors make the command exit non-zero.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftkit.experts.archive import MANIFEST, ExpertPackageError, open_expert
from peftkit.experts.manifest import ExpertManifest, ManifestError, parse_manifest, read_manifest_data

HOW = {
    "schema_version": "manifest format checked",
    "name": "names the package (NAME-VERSION.expert) and the expert in chat/serve",
    "version": "names the package (NAME-VERSION.expert)",
    "description": "shown by inspect",
    "base_model.name": "loaded as the frozen base model",
    "base_model.fingerprint": "checked against the base model when the expert is loaded",
    "soft_prompts.name": "names its prompt-tuning adapter",
    "soft_prompts.tokens": "checked against the tensor shape; virtual tokens put before the input",
    "soft_prompts.init_method": "initialises the prompt in peftkit train",
    "soft_prompts.init_text": "initialises the prompt in peftkit train",
    "soft_prompts.purpose": "shown by inspect",
    "soft_prompts.weights": "checksum verified, loaded as safetensors",
    "adapters.name": "names the adapter",
    "adapters.type": "selects the method",
    "adapters.config": "builds the adapter (validated by the method's config)",
    "adapters.weights": "checksum verified, loaded as safetensors",
    "training": "used by peftkit train MANIFEST",
    "decoding": "used by chat and generate (command-line flags override it)",
    "decoding.grammar": "compiled (llguidance) and enforced at every decoding step",
    "runtime.attention_kernel": "sets transformers' attention implementation",
    "runtime.requires_kv_cache_persistence": "chat keeps the attention cache across turns",
    "quality_targets": "checked against the packaged evaluation report",
}


@dataclass
class FieldStatus:
    path: str
    value: Any
    status: str  # applied | unsupported | error
    note: str


@dataclass
class ValidationReport:
    target: str
    kind: str  # manifest | package
    fields: list[FieldStatus] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def warnings(self) -> list[FieldStatus]:
        return [f for f in self.fields if f.status == "unsupported"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "valid": self.ok,
            "errors": self.errors,
            "warnings": [f"{f.path}: {f.note}" for f in self.warnings],
            "fields": [asdict(f) for f in self.fields],
        }

    def lines(self) -> list[str]:
        out = [f"{f.path} = {_short(f.value)}: {f.status} ({f.note})" for f in self.fields]
        out += [f"error: {e}" for e in self.errors]
        verdict = "valid" if self.ok else f"INVALID ({len(self.errors)} error(s))"
        out.append(f"{self.target}: {verdict}, {len(self.warnings)} warning(s)")
        return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _how(path: str) -> str:
    generic = ".".join(p for p in path.split(".") if not p.startswith("["))
    while generic:
        if generic in HOW:
            return HOW[generic]
        generic = generic.rpartition(".")[0]
    return "applied"


def _leaves(value: Any, path: str) -> list[tuple[str, Any]]:
    """Leaf fields of a manifest dump; soft prompts / adapters are addressed by name."""
    if path in ("decoding.grammar", "adapters.config", "training.data", "training.config") or path.endswith(".config"):
        return [(path, value)]
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return [leaf for v in value for leaf in _leaves(v, f"{path}.[{v['name']}]")]
    return [(path, value)]


def field_statuses(manifest: ExpertManifest, report_values: dict[str, Any] | None) -> list[FieldStatus]:
    """One status per leaf field (defaults included)."""
    from peftkit.experts.runtime import kernel_problem

    dump = manifest.model_dump(mode="json")
    statuses = []
    for path, value in _leaves(dump, ""):
        status, note = "applied", _how(path)
        if path == "runtime.attention_kernel" and value is not None and (problem := kernel_problem(value)):
            status, note = "unsupported", f"{problem} here: falls back to sdpa with a warning"
        elif path == "quality_targets" and value:
            status, note = _targets_status(manifest, report_values)
        elif value is None and not path.endswith((".weights", "fingerprint")):
            note = "not set"
        elif value == [] and path in ("soft_prompts", "adapters", "quality_targets"):
            note = "none declared"
        elif (path.endswith(".weights") and value is None) or (path == "base_model.fingerprint" and value is None):
            note = "filled in by peftkit package"
        elif path.startswith("training") and manifest.training is None:
            note = "no training section"
        statuses.append(FieldStatus(path.replace(".[", "[").replace("].", "]."), value, status, note))
    return statuses


def _targets_status(manifest: ExpertManifest, report: dict[str, Any] | None) -> tuple[str, str]:
    from peftkit.evaluation.targets import evaluate_targets, parse_target

    if report is None:
        return "unsupported", "no evaluation report in the package: targets not checked"
    variants = report.get("variants", {})
    base = [v for v, r in variants.items() if r.get("adapters") is None]
    values = {v: r.get("values", {}) for v, r in variants.items()}
    results = evaluate_targets([parse_target(t) for t in manifest.quality_targets], values, base)
    shown = "; ".join(f"{r.target.text} on {r.variant}: {r.value} {'ok' if r.passed else 'FAILED'}" for r in results)
    return ("applied" if all(r.passed for r in results) else "error"), f"checked against eval/report.json: {shown}"


def semantic_errors(manifest: ExpertManifest, tokenizer: Any = None, vocab_size: int | None = None) -> list[str]:
    """Checks beyond the schema: the grammar compiles; the fingerprint matches a locally available base."""
    errors = []
    if manifest.decoding.grammar is not None:
        try:
            check_grammar(manifest, tokenizer, vocab_size)
        except ValueError as exc:
            errors.append(f"decoding.grammar: {exc}")
    return errors


def check_grammar(manifest: ExpertManifest, tokenizer: Any = None, vocab_size: int | None = None) -> None:
    import llguidance as llg

    from peftkit.grammar import compile_grammar, grammar_text

    grammar = manifest.decoding.grammar
    assert grammar is not None
    if tokenizer is not None and vocab_size is not None:
        compile_grammar(grammar, tokenizer, vocab_size)
        return
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar_text(grammar))
    if failed:
        raise ValueError(f"does not compile: {messages[0]}")


def validate_target(target: str | Path, *, check_base: bool = True) -> ValidationReport:
    """Validate a manifest file (``.yaml`` / ``.json``) or a package (``.expert``)."""
    target = Path(target)
    is_package = target.suffix == ".expert"
    report = ValidationReport(str(target), "package" if is_package else "manifest")
    tensors: dict[str, dict[str, Any]] = {}
    eval_report = None
    try:
        if is_package:
            from peftkit.experts.package import parse_tensors

            with open_expert(target) as archive:
                manifest = parse_manifest(archive.read_json(MANIFEST), f"{target.name}:{MANIFEST}")
                for entry in [*manifest.soft_prompts, *manifest.adapters]:
                    if entry.weights is None or entry.weights not in archive.members:
                        report.errors.append(f"{entry.name}: weights {entry.weights!r} are not in the package")
                        continue
                    tensors[entry.name] = parse_tensors(archive.read(entry.weights), entry.weights)
                if "eval/report.json" in archive.members:
                    eval_report = archive.read_json("eval/report.json")
        else:
            manifest = parse_manifest(read_manifest_data(target), str(target))
    except (ManifestError, ExpertPackageError) as exc:
        report.errors.append(str(exc))
        return report
    report.fields = field_statuses(manifest, eval_report)
    report.errors += [f"{f.path}: {f.note}" for f in report.fields if f.status == "error"]
    tokenizer = vocab = None
    fingerprint = manifest.base_model.fingerprint
    if check_base:
        try:
            from peftkit.experts.package import base_fingerprint
            from peftkit.models.loading import load_tokenizer

            local = base_fingerprint(manifest.base_model.name, hash_weights=fingerprint is not None)
            if fingerprint is not None and (diff := fingerprint.differences(local)):
                report.errors.append(
                    f"base_model.fingerprint: {fingerprint.short()} does not match {manifest.base_model.name} "
                    f"here, {local.short()} ({'; '.join(diff)})"
                )
            fingerprint = fingerprint or local
            tokenizer, vocab = load_tokenizer(manifest.base_model.name), local.vocab_size
        except (OSError, ValueError, RuntimeError) as exc:
            note = f"base model not available here ({exc}): fingerprint not checked"
            report.fields.append(FieldStatus("base_model.name", manifest.base_model.name, "unsupported", note))
    report.errors += semantic_errors(manifest, tokenizer, vocab)
    if tensors and fingerprint is not None:
        from peftkit.experts.package import check_shapes

        report.errors += check_shapes(manifest, tensors, fingerprint)
    return report
