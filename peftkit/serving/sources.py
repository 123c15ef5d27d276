"""Reading the experts a server serves: ``.expert`` packages, PEFT adapter folders and peftkit bank folders.

Each source turns into what the engine needs and nothing more::

    NAME.expert           read_expert (checked archive) ─► soft prompts (concatenated, in order) + one LoRA + decoding
    adapter folder        PROMPT_TUNING / P_TUNING ─► SoftPrompt("prompt")  (p-tuning's encoder run once, here)
                          PREFIX_TUNING             ─► SoftPrompt("prefix")  per layer (keys, values) (H_kv, n, d)
                          LORA                      ─► (config, tensors) for the LoraBank
    bank folder           (expert_ids)              ─► BankSource: ONE table (N, n, W); expert e is a view of row e

Soft prompts are built by the method's own adapter class (``create`` + ``load_adapter_state_dict``), so
shapes are checked and p-tuning / prefix projections computed exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig
from peftkit.decoding import DecodingSettings
from peftkit.experts.bank import ExpertIndex
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.soft_prompt import PromptLearningConfig
from peftkit.serving.types import SoftPrompt

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


@dataclass
class ExpertSpec:
    """One expert read from a source, not yet registered: its soft prompt, its LoRA and decoding defaults."""

    name: str
    soft_prompt: SoftPrompt | None = None
    lora: tuple[LoraConfig | dict[str, Any], dict[str, Tensor]] | None = None
    decoding: DecodingSettings = field(default_factory=DecodingSettings)


@dataclass
class BankSource:
    """A bank folder: ``table`` ``(N, n, W)`` (one tensor), ``ids[e]`` naming row ``e``.

    ``W`` is the hidden size (prompt tuning) or ``num_layers * 2 * token_dim`` (prefix tuning).
    """

    experts: ExpertIndex
    table: Tensor
    config: PromptLearningConfig

    @property
    def ids(self) -> list[str]:
        return self.experts.ids

    @property
    def kind(self) -> str:
        return "prefix" if self.config.peft_type == "PREFIX_TUNING" else "prompt"

    @property
    def row_nbytes(self) -> int:
        return self.table[0].numel() * self.table.element_size()

    def soft_prompt(self, row: int) -> SoftPrompt:
        """Expert ``row``'s soft prompt: views of the shared table, no copy."""
        flat = self.table[row]
        n = self.config.num_virtual_tokens
        if self.kind == "prompt":
            return SoftPrompt("prompt", n, embeddings=flat)
        return SoftPrompt("prefix", n, key_values=prefix_layers(flat, self.config))


def prefix_layers(flat: Tensor, config: PromptLearningConfig) -> tuple[tuple[Tensor, Tensor], ...]:
    """Per layer ``(keys, values)``, each ``(H_kv, n, d)``, from a prefix in PEFT's layout ``(n, 2·L·H_kv·d)``
    (keys of layer ``l`` at slot ``2l``, values at ``2l + 1``, as :meth:`PrefixTuning.key_values` reads it)."""
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    kv = flat.view(n, 2 * layers, heads, -1).permute(1, 2, 0, 3)  # (2L, H_kv, n, d)
    return tuple((kv[2 * i], kv[2 * i + 1]) for i in range(layers))


def soft_prompt_adapter(model: nn.Module, config: PromptLearningConfig, tensors: dict[str, Tensor]) -> Any:
    """The method's own adapter built on ``model``'s geometry with ``tensors`` loaded (shape-checked), frozen."""
    from peftkit.methods.registry import adapter_class_for

    config = config.model_copy(update={"inference_mode": True})
    adapter = adapter_class_for(config).create(model, config, "serving", initialize=False)
    adapter.load_adapter_state_dict(tensors, trainable=False)
    adapter.requires_grad_(False)
    return adapter.eval()


def single_soft_prompt(model: nn.Module, config: PromptLearningConfig, tensors: dict[str, Tensor]) -> SoftPrompt:
    """A prompt-tuning / p-tuning / prefix-tuning adapter's soft prompt, computed once."""
    return soft_prompt_adapter(model, config, tensors).served_prompt()


def concat_prompts(prompts: list[SoftPrompt]) -> SoftPrompt | None:
    """Several prompt-kind soft prompts active together, in order: ``[p1 p2 ... user tokens]``."""
    if not prompts:
        return None
    if len(prompts) == 1:
        return prompts[0]
    embeddings = torch.cat([p.embeddings for p in prompts], dim=0)
    return SoftPrompt("prompt", embeddings.shape[0], embeddings=embeddings)


def read_adapter_folder(model: nn.Module, folder: Path, name: str, check_file: Any) -> ExpertSpec | BankSource:
    """A PEFT / peftkit adapter folder: a single expert named ``name``, or a bank (``expert_ids`` in its config).

    ``check_file(path)`` vets every file before it is read (the registry's "inside the experts folder" rule).
    """
    from peftkit.compat.state_dict import load_peft_weights

    check_file(folder / CONFIG_NAME)
    check_file(folder / WEIGHTS_NAME)
    config = PeftConfig.from_pretrained(folder)
    device = next(iter(model.parameters())).device
    tensors = load_peft_weights(folder, device=str(device))
    if isinstance(config, LoraConfig):
        return ExpertSpec(name, lora=(config, tensors))
    if not isinstance(config, PromptLearningConfig) or config.peft_type not in (*PROMPT_TYPES, "PREFIX_TUNING"):
        raise ValueError(
            f"{folder}: peft_type {config.peft_type} cannot be served; the server takes PROMPT_TUNING, P_TUNING, "
            "PREFIX_TUNING (single or bank) and LORA"
        )
    if config.expert_ids is not None:
        adapter = soft_prompt_adapter(model, config, tensors)
        return BankSource(adapter.experts, adapter.table.detach(), adapter.config)
    return ExpertSpec(name, soft_prompt=single_soft_prompt(model, config, tensors))


def read_expert_package(model: nn.Module, path: Path) -> ExpertSpec:
    """A checked ``.expert`` package (:func:`~peftkit.experts.load.read_expert`) on ``model``: its soft prompts
    concatenated in manifest order, its LoRA (at most one) and its manifest's decoding defaults."""
    from peftkit.experts.archive import ExpertPackageError
    from peftkit.experts.load import check_fingerprint, read_expert
    from peftkit.experts.package import fingerprint_of_config

    contents = read_expert(path)
    manifest = contents.manifest
    check_fingerprint(manifest, fingerprint_of_config(model.config), getattr(model.config, "name_or_path", "") or "")
    prompts = []
    for entry in manifest.soft_prompts:
        config = PeftConfig.from_dict(contents.configs[entry.name])
        if config.peft_type not in PROMPT_TYPES:
            raise ExpertPackageError(
                f"{path.name}: soft prompt {entry.name!r} is {config.peft_type}, not prompt tuning"
            )
        prompts.append(single_soft_prompt(model, config, contents.tensors[entry.name]))
    others = [a for a in manifest.adapters if a.type.upper() != "LORA"]
    if others:
        raise ExpertPackageError(
            f"{path.name}: adapters {[f'{a.name} ({a.type})' for a in others]} cannot be served; "
            "the server batches soft prompts and LoRA"
        )
    if len(manifest.adapters) > 1:
        raise ExpertPackageError(
            f"{path.name}: {len(manifest.adapters)} LoRA adapters; the server takes at most one per expert"
        )
    lora = None
    if manifest.adapters:
        entry = manifest.adapters[0]
        lora = (contents.configs[entry.name], contents.tensors[entry.name])
    return ExpertSpec(manifest.name, concat_prompts(prompts), lora, manifest.decoding)
