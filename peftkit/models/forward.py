"""Running the frozen base model on a prepared batch (:class:`~peftkit.methods.base.ModelInputs`).

The base model is called with explicit ``position_ids`` (padding and unused virtual slots do not
advance them), the full attention mask (key/value prefix included), a cache carrying the prefix,
and ``logits_to_keep`` set to exactly the positions whose logits are wanted:

* the user's own tokens (``(B, L, V)`` returned, virtual positions never appear), or
* only the labelled positions, in training (``return_logits=False`` / ``"labelled"``), so a
  classification example with a 40-token prompt and a 1-token answer costs one vocabulary
  projection, not 40.

On CPU, frozen fp32 projections run through oneDNN instead of MKL during the call
(:mod:`peftkit.models.fast_linear`: about 2x faster matmuls on AMD processors).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftkit.methods.base import ModelInputs
from peftkit.models.cache import cache_survives_checkpointing, growing_prefix_cache, readonly_prefix_cache
from peftkit.models.fast_linear import frozen_linear_on_onednn


def run_base_model(
    base_model: nn.Module,
    inputs: ModelInputs,
    *,
    use_cache: bool = False,
    return_logits: bool | Literal["labelled"] = True,
    logits_to_keep: int = 0,
    cache: Any = None,
    position_ids: Tensor | None = None,
    **kwargs: Any,
) -> CausalLMOutputWithPast:
    """Run ``base_model`` on a prepared batch.

    With labels: ``return_logits=True`` returns ``(B, L, V)`` user logits and the mean next-token
    cross-entropy as ``loss``; ``False`` returns the loss only (only labelled positions were
    projected); ``"labelled"`` returns the ``(T, V)`` logits of the ``T`` labelled targets and no
    loss: the caller (the trainer's loss) owns it.

    ``position_ids`` ``(B, L)``: the user's own positions for their tokens; they are shifted past the
    virtual tokens and key/value prefix the row attends to (see :func:`shifted_positions`).
    """
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if cache is None and use_cache:
        cache = growing_prefix_cache(inputs.prefix, base_model.config)
    elif cache is None and inputs.prefix is not None:
        cache = readonly_prefix_cache(inputs.prefix)
        if base_model.training and is_checkpointing(base_model):
            guard = cache_survives_checkpointing(base_model)
    predicting = inputs.prediction_mask()
    labelled = return_logits == "labelled"
    if predicting is None:
        keep: int | Tensor = inputs.user_positions[:, -logits_to_keep:] if logits_to_keep else inputs.user_positions
    else:
        keep = predicting if labelled or not return_logits else 0
    with guard, frozen_linear_on_onednn(inputs.inputs_embeds):
        out = base_model(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.full_attention_mask(),
            position_ids=inputs.position_ids() if position_ids is None else shifted_positions(inputs, position_ids),
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=keep,
            **kwargs,
        )
    logits, loss, hidden_states = out.logits, None, out.hidden_states
    if predicting is not None:
        scored = logits if keep is predicting else logits[predicting]  # (T, V)
        if labelled:
            logits = scored
            if hidden_states is not None:
                hidden_states = tuple(h[predicting] for h in hidden_states)  # each (T, D)
        else:
            loss = F.cross_entropy(scored.float(), inputs.next_token_targets()[predicting])
            logits = user_logits(logits, inputs.user_positions) if return_logits else None
    return CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        cache=out.cache if use_cache else None,
        hidden_states=hidden_states,
        attentions=out.attentions,
    )


def shifted_positions(inputs: ModelInputs, user_position_ids: Tensor) -> Tensor:
    """``(B, S)`` positions with the user's ``(B, L)`` ``position_ids`` placed after the virtual slots.

    Each row's virtual tokens and key/value prefix keep their positions (``0 .. V-1`` for the ``V``
    slots it attends to), and user token ``i`` gets ``user_position_ids[:, i] + V``: PEFT's rule for
    prefix tuning (positions offset by ``num_virtual_tokens``), applied to every soft prompt. With the
    default positions (``arange``) this is exactly what is computed without ``position_ids``.
    """
    positions = inputs.position_ids()
    user_mask = inputs.attention_mask.gather(1, inputs.user_positions)  # (B, L)
    first_real = inputs.user_positions.gather(1, user_mask.argmax(1, keepdim=True))  # (B, 1)
    virtual = positions.gather(1, first_real)  # attended virtual slots before the user's first token
    shifted = user_position_ids.to(positions.device, positions.dtype) + virtual
    return positions.scatter(1, inputs.user_positions, shifted)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, across transformers' renames."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def user_logits(logits: Tensor, user_positions: Tensor) -> Tensor:
    """``(B, L, V)`` logits at the user's token positions of a ``(B, S, V)`` tensor."""
    return torch.take_along_dim(logits, user_positions.unsqueeze(-1), dim=1)
