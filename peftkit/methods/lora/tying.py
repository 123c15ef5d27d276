"""``ensure_weight_tying``: when the output head shares its weight with the input embedding (Gemma, tied
Llama), an adapter on one of them acts on the other too, so the two stay tied, as in PEFT.

- **LoRA on the embedding** (``target_modules`` names it): the head gets the transposed factors,
  ``A_head = B_embᵀ``, ``B_head = A_embᵀ``, so ``ΔW_head = s · A_embᵀ B_embᵀ = ΔW_embᵀ`` — the same update
  seen from the other side. The head's factors *are* the embedding's (one set of parameters, gradients from
  both uses); files carry them under the head's keys too, as PEFT writes them.
- **modules_to_save** naming the embedding or the head: both are saved, and the head's trained copy
  shares its weight with the embedding's trained copy.
- ``trainable_token_indices``: see :mod:`peftkit.methods.lora.tokens` (tied heads always share the rows;
  ``ensure_weight_tying`` turns different indices for the two into an error).

Without ``ensure_weight_tying`` the head keeps computing with the untouched shared base weight (PEFT warns
about it; so does peftkit). With it but nothing tied to tie, peftkit warns as PEFT does.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

from torch import nn

from peftkit.methods.lora.tokens import tied_heads
from peftkit.methods.tuners.adapter import SavedModule
from peftkit.methods.tuners.layer import base_of

if TYPE_CHECKING:
    from peftkit.methods.lora.module import Lora


def input_embedding_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = base_of(get()) if callable(get) and get() is not None else None
    return next((name for name, module in model.named_modules() if base_of(module) is embedding), None)


def apply_weight_tying(adapter: Lora, model: nn.Module) -> None:
    """Tie the adapter's parts on the embedding to its tied heads (see the module docstring)."""
    embedding = input_embedding_path(model)
    heads = tied_heads(model, embedding) if embedding else []
    targeted = embedding in adapter.parts and "lora_embedding_A" in adapter.parts[embedding]
    saved = [p for p in adapter.saved if p == embedding or p in heads]
    if not adapter.config.ensure_weight_tying:
        if heads and (targeted or saved):
            warnings.warn(
                f"{embedding!r} shares its weight with {heads} and is adapted, but ensure_weight_tying is False: "
                "the tied layers keep using the base weight (merging, and exporting to other formats, can then "
                "surprise)",
                UserWarning,
                stacklevel=4,
            )
        return
    if not heads:
        warnings.warn(
            "ensure_weight_tying=True but no layer of this model is tied to the input embedding",
            UserWarning,
            stacklevel=4,
        )
        return
    if not (targeted or saved or adapter.token_paths):
        warnings.warn(
            "ensure_weight_tying=True but neither target_modules, modules_to_save nor trainable_token_indices "
            f"adapts {embedding!r} or the layers tied to it",
            UserWarning,
            stacklevel=4,
        )
        return
    if targeted:
        for head in heads:
            if head in adapter.saved:
                raise ValueError(f"{head!r} is in modules_to_save but is tied to the adapted {embedding!r}")
            dropout = adapter.parts[embedding].get("lora_dropout")
            adapter.parts[head] = {"lora_dropout": dropout if dropout is not None else nn.Identity()}
            adapter.tied_lora[head] = embedding
            adapter.scaling[head] = adapter.scaling[embedding]
    if saved:
        if embedding not in adapter.saved:  # PEFT adds the embedding the heads are tied to
            adapter.saved[embedding] = SavedModule(
                copy.deepcopy(base_of(model.get_submodule(embedding))).requires_grad_(True)
            )
        source = adapter.saved[embedding].module
        for head in heads:
            if head not in adapter.saved:
                adapter.saved[head] = SavedModule(
                    copy.deepcopy(base_of(model.get_submodule(head))).requires_grad_(True)
                )
            adapter.saved[head].module.weight = source.weight
