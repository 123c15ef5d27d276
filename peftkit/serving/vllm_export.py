"""Export experts for vLLM: LoRA as PEFT folders, soft prompts as ``prompt_embeds`` material.

vLLM serves LoRA (``--lora-modules NAME=DIR``) but dropped its prompt adapters in 2025; its
replacement, the ``prompt_embeds`` request input (``--enable-prompt-embeds``), leaves the soft prompt
to the client. ``peftkit export --format vllm --experts SRC --output DIR`` writes::

    DIR/index.json                  per expert: its LoRA folder, its prompt file, cache_salt, base model;
                                    what was skipped and why; the `vllm serve` command
    DIR/lora/<name>/                adapter_config.json + adapter_model.safetensors (PEFT's layout)
    DIR/prompts/<name>.safetensors  "prompt_embeds": the expert's virtual tokens (n, D)
    DIR/client_example.py           embeds a prompt, prepends the soft prompt, sends it to vLLM

A request is ``cat(soft prompt, embed(prompt tokens))`` (:func:`prompt_embeds`), exactly what a
prompt-tuning model computes. Its ``cache_salt`` (a hash of the expert's name and weights) keeps
vLLM's prefix cache from sharing blocks between experts whose embeddings differ under the same
placeholder token ids. Prefix tuning (keys/values in every layer) and weight adapters other than
LoRA cannot be expressed this way: such experts are skipped, with the reason in ``index.json``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import PeftConfig
from peftkit.io import atomic_save_safetensors

__all__ = ["ExportedExpert", "cache_salt", "encode_prompt_embeds", "export_vllm", "prompt_embeds", "read_experts"]

CLIENT_TEMPLATE = Path(__file__).with_name("vllm_client_example.py")
#: LoraConfig fields vLLM's LoRA loader does not support, with the value it needs.
VLLM_LORA_DEFAULTS: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ExportedExpert:
    """One expert as vLLM can serve it: an optional soft prompt ``(n, D)`` and an optional LoRA.

    ``skipped`` names why it cannot be served (then nothing of it is written).
    """

    name: str
    source: str
    base_model: str | None = None
    prompt: Tensor | None = None
    lora: tuple[PeftConfig, dict[str, Tensor]] | None = None
    skipped: str | None = None
    parts: list[str] = field(default_factory=list)


def prompt_embeds(soft_prompt: Tensor, token_ids: Sequence[int] | Tensor, input_embeddings: nn.Module) -> Tensor:
    """The ``(n + L, D)`` input embeddings of one request: the soft prompt, then the prompt's tokens
    embedded by the base model's input embedding module (``model.get_input_embeddings()``), as a
    prompt-tuning model builds them. ``client_example.py`` does the same."""
    weight = next(input_embeddings.parameters())
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=weight.device).reshape(-1)
    tokens = input_embeddings(ids)  # (L, D)
    return torch.cat([soft_prompt.to(device=tokens.device, dtype=tokens.dtype), tokens], dim=0)


def encode_prompt_embeds(embeds: Tensor) -> str:
    """vLLM's wire format for ``prompt_embeds``: base64 of ``torch.save(tensor)`` (written, never read
    back here: peftkit loads no pickles)."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def cache_salt(name: str, tensors: dict[str, Tensor]) -> str:
    """A stable SHA-256 (hex) of the expert's name and every tensor (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(b"peftkit-vllm-cache-salt/1\0" + name.encode() + b"\0")
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_experts(source: str | Path) -> list[ExportedExpert]:
    """The experts in ``source``: an ``.expert`` file, a PEFT adapter folder (a peftkit bank gives one
    expert per id), or a folder of those."""
    source = Path(source)
    if source.is_file():
        if source.suffix != ".expert":
            raise ValueError(f"{source}: expected an .expert file, an adapter folder or a folder of those")
        return [_from_expert_file(source)]
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    if (source / "adapter_config.json").is_file():
        return _from_adapter_folder(source)
    experts: list[ExportedExpert] = []
    for child in sorted(source.iterdir()):
        if child.is_file() and child.suffix == ".expert":
            experts.append(_from_expert_file(child))
        elif child.is_dir() and (child / "adapter_config.json").is_file():
            experts.extend(_from_adapter_folder(child))
    if not experts:
        raise ValueError(f"{source} holds no .expert file and no adapter folder (adapter_config.json)")
    return experts


def _from_expert_file(path: Path) -> ExportedExpert:
    from peftkit.experts.load import read_expert

    contents = read_expert(path)
    manifest = contents.manifest
    expert = ExportedExpert(manifest.name, str(path), manifest.base_model.name)
    prompts: list[Tensor] = []
    for entry in [*manifest.soft_prompts, *manifest.adapters]:  # peftkit's order: prompts, then adapters
        config = PeftConfig.from_dict(contents.configs[entry.name])
        _add_part(expert, entry.name, config, contents.tensors[entry.name], prompts)
    if prompts and not expert.skipped:
        expert.prompt = torch.cat(prompts, dim=0)
    return expert


def _from_adapter_folder(folder: Path) -> list[ExportedExpert]:
    from peftkit.compat.state_dict import load_peft_weights

    config = PeftConfig.from_pretrained(folder)
    tensors = load_peft_weights(folder, device="cpu")
    base = config.base_model_name_or_path
    ids = getattr(config, "expert_ids", None)
    if ids is None:
        expert = ExportedExpert(folder.name, str(folder), base)
        prompts: list[Tensor] = []
        _add_part(expert, folder.name, config, tensors, prompts)
        expert.prompt = prompts[0] if prompts and not expert.skipped else None
        return [expert]
    table = tensors.get("prompt_embeddings")  # a bank: (N, n, W), row e = expert ids[e]
    if table is None or table.dim() != 3 or table.shape[0] != len(ids):
        shape = None if table is None else tuple(table.shape)
        raise ValueError(f"{folder}: a bank of {len(ids)} experts needs prompt_embeddings (N, n, W), got {shape}")
    single = config.model_copy(update={"expert_ids": None})
    experts = []
    for row, expert_id in enumerate(ids):
        expert = ExportedExpert(expert_id, f"{folder}[{expert_id}]", base)
        prompts = []
        _add_part(expert, expert_id, single, {"prompt_embeddings": table[row]}, prompts)
        expert.prompt = prompts[0] if prompts and not expert.skipped else None
        experts.append(expert)
    return experts


def _add_part(
    expert: ExportedExpert, part: str, config: PeftConfig, tensors: dict[str, Tensor], prompts: list[Tensor]
) -> None:
    """Add one adapter of ``expert``: a soft prompt to ``prompts``, a LoRA as its LoRA; or mark the
    expert skipped with the reason."""
    from peftkit.methods.registry import adapter_class_for
    from peftkit.methods.soft_prompt import EmbeddingSoftPrompt

    expert.parts.append(f"{part} ({config.peft_type})")
    if expert.skipped:
        return
    if config.is_prompt_learning:
        if not issubclass(adapter_class_for(config), EmbeddingSoftPrompt):
            expert.skipped = (
                f"{part} is {config.peft_type}: its virtual tokens are keys/values inside every attention layer, "
                "not input embeddings, so vLLM's prompt_embeds cannot carry it (serve it with `peftkit serve`)"
            )
            return
        prompt = tensors.get("prompt_embeddings")
        if prompt is None or prompt.dim() != 2:
            raise ValueError(f"{expert.source}: {part} has no prompt_embeddings (n, D)")
        prompts.append(prompt.detach().float())
        return
    if config.peft_type != "LORA":
        expert.skipped = f"{part} is {config.peft_type}: vLLM serves LoRA weight adapters only"
        return
    unsupported = [
        f"{k}={getattr(config, k)!r}" for k, v in VLLM_LORA_DEFAULTS.items() if getattr(config, k, v) not in (v, None)
    ]
    extra = [k for k in tensors if not re.search(r"\.lora_[AB]\.weight$", k)]
    if unsupported or extra:
        what = ", ".join(unsupported) or f"tensors other than lora_A/lora_B ({extra[:3]})"
        expert.skipped = f"{part}: vLLM's LoRA loader does not support {what}"
        return
    if expert.lora is not None:
        expert.skipped = f"{part}: a second LoRA (vLLM applies one LoRA per request)"
        return
    expert.lora = (config, tensors)


def export_vllm(source: str | Path, output: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``source``'s experts under ``output`` for vLLM (see the module docstring); returns the index.

    Raises:
        ValueError: nothing in ``source`` can be exported (the message gives each expert's reason), two
            experts share a name, or ``output`` is not empty (without ``overwrite``).
    """
    experts = read_experts(source)
    names = [e.name for e in experts]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"several experts are named {duplicates}: export them separately")
    if not any(e.skipped is None for e in experts):
        raise ValueError("nothing to export: " + "; ".join(f"{e.name}: {e.skipped}" for e in experts))
    output = Path(output)
    if output.exists() and (output.is_file() or any(output.iterdir())):
        if not overwrite:
            raise ValueError(f"{output} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    entries: dict[str, Any] = {}
    for expert in experts:
        if expert.skipped:
            continue
        file_name = _file_name(expert.name)
        base = _served_base(expert.base_model) if expert.base_model else None
        entry: dict[str, Any] = {"source": expert.source, "parts": expert.parts, "base_model": base}
        hashed: dict[str, Tensor] = {}
        if expert.lora is not None:
            config, tensors = expert.lora
            folder = output / "lora" / file_name
            atomic_save_safetensors(tensors, folder / "adapter_model.safetensors")
            config.model_copy(update={"inference_mode": True}).save_pretrained(folder)
            entry |= {"lora": f"lora/{file_name}", "lora_rank": config.r, "model": expert.name}
            hashed |= {f"lora.{k}": v for k, v in tensors.items()}
        if expert.prompt is not None:
            atomic_save_safetensors(
                {"prompt_embeds": expert.prompt.contiguous()}, output / "prompts" / f"{file_name}.safetensors"
            )
            n, width = expert.prompt.shape
            entry |= {
                "prompt_embeds": f"prompts/{file_name}.safetensors",
                "num_virtual_tokens": n,
                "hidden_size": width,
            }
            hashed["prompt_embeds"] = expert.prompt
        entry["cache_salt"] = cache_salt(expert.name, hashed)
        entries[expert.name] = entry
    index = {
        "format": "peftkit-vllm-export/1",
        "experts": entries,
        "skipped": {e.name: e.skipped for e in experts if e.skipped},
        "vllm_serve": _serve_command(entries, output.resolve()),
    }
    (output / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.copyfile(CLIENT_TEMPLATE, output / "client_example.py")
    return index


def _file_name(name: str) -> str:
    """``name`` when it is a safe file name, else a sanitised form plus a short hash (no ``/``, no ``..``)."""
    if _SAFE_NAME.match(name) and ".." not in name:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._")[:100] or "expert"
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _served_base(name: str) -> str:
    """What ``vllm serve`` takes for base model ``name``: an embedded alias's local folder when it is
    cached, else the name (a folder or a Hub id)."""
    from peftkit.models.loading import EMBEDDED_MODELS, cache_folder, cache_problem

    if name in EMBEDDED_MODELS and cache_problem(folder := cache_folder(EMBEDDED_MODELS[name])) is None:
        return str(folder)
    return name


def _serve_command(entries: dict[str, Any], output: Path) -> str:
    bases = sorted({str(e["base_model"] or "BASE_MODEL") for e in entries.values()})
    parts = ["vllm serve", bases[0] if len(bases) == 1 else "BASE_MODEL"]
    if any("prompt_embeds" in e for e in entries.values()):
        parts.append("--enable-prompt-embeds")
    loras = {name: e for name, e in entries.items() if "lora" in e}
    if loras:
        rank = max(e["lora_rank"] for e in loras.values())
        allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]  # vLLM accepts these values only
        modules = " ".join(f"{name}={output / e['lora']}" for name, e in loras.items())
        parts += ["--enable-lora", f"--max-lora-rank {allowed[0] if allowed else rank}"]
        parts += [f"--max-loras {min(len(loras), 16)}", f"--lora-modules {modules}"]
    return " ".join(parts)
