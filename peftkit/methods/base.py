"""What every adaptation method implements, and the batch it works on.

A forward pass through a :class:`~peftkit.PeftModel` runs like this::

    user batch ──► ModelInputs ──► adapter_1.prepare_inputs ──► ... ──► base model ──► logits
                   (embeds, mask,     (a soft prompt prepends          (weight adapters act
                    labels)            tokens or a KV prefix)           inside its layers)

Every adapter is asked to prepare the batch for the rows it serves: ``rows`` is a ``(B,)`` long
tensor, ``-1`` for a row the adapter does not serve and otherwise the index of the expert that row
uses in the adapter's table (``0`` for a single adapter). So one batch can carry a different
expert per row, and nothing in the model wrapper switches on the method's type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from peftkit.config import PeftConfig
    from peftkit.models.peft_model import PeftModel

IGNORE_INDEX = -100


@dataclass
class ModelInputs:
    """The batch on its way to the base model.

    Shapes: ``B`` rows, ``S`` positions in the current sequence, ``L`` user tokens, ``P`` cached
    prefix positions, ``D`` hidden size.

    Attributes:
        inputs_embeds: ``(B, S, D)`` token (and virtual token) embeddings.
        attention_mask: ``(B, S)`` 1 for a position that is attended to, 0 for padding or an
            unused virtual slot.
        user_positions: ``(B, L)`` where each of the user's own tokens sits in the current
            sequence; logits returned to the user are gathered from these positions.
        labels: ``(B, S)`` next-token targets aligned with the sequence, ``-100`` for no loss.
        prefix: per decoder layer, ``(keys, values)`` each ``(B, H_kv, P, d_head)``: key/value
            states placed in the attention cache before the sequence (prefix tuning).
        prefix_mask: ``(B, P)`` 1 where a prefix position is attended to.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    user_positions: Tensor
    labels: Tensor | None = None
    prefix: list[tuple[Tensor, Tensor]] | None = None
    prefix_mask: Tensor | None = None

    @classmethod
    def from_user(
        cls, inputs_embeds: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Self:
        """Wrap the user's batch; an absent mask means every position is real."""
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        elif attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, length)}")
        if labels is not None and labels.shape != (batch, length):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {(batch, length)}")
        positions = torch.arange(length, device=device).expand(batch, length)
        return cls(inputs_embeds, attention_mask.long(), positions, labels)

    @property
    def batch_size(self) -> int:
        return self.inputs_embeds.shape[0]

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_mask is None else self.prefix_mask.shape[1]

    def position_ids(self) -> Tensor:
        """``(B, S)`` positions that count only attended tokens, prefix included.

        Padding and unused virtual slots do not advance the position, so a left-padded row gets
        the same positions as the same row unpadded.
        """
        offset = 0 if self.prefix_mask is None else self.prefix_mask.sum(-1, keepdim=True)
        return (offset + self.attention_mask.cumsum(-1) - 1).clamp_min(0)

    def full_attention_mask(self) -> Tensor:
        """``(B, P + S)`` mask over the prefix and the sequence, as the base model expects it."""
        if self.prefix_mask is None:
            return self.attention_mask
        return torch.cat([self.prefix_mask, self.attention_mask], dim=1)

    def prediction_mask(self) -> Tensor | None:
        """``(B, S)`` True at positions whose next-token prediction has a label."""
        if self.labels is None:
            return None
        targets = self.labels[:, 1:] != IGNORE_INDEX
        return torch.cat([targets, torch.zeros_like(targets[:, :1])], dim=1)

    def next_token_targets(self) -> Tensor | None:
        """``(B, S)`` the label each position predicts (the next position's label)."""
        if self.labels is None:
            return None
        pad = torch.full_like(self.labels[:, :1], IGNORE_INDEX)
        return torch.cat([self.labels[:, 1:], pad], dim=1)

    def with_(self, **changes) -> ModelInputs:
        return replace(self, **changes)


@runtime_checkable
class Adapter(Protocol):
    """Behaviour every adapter has, whatever its method."""

    config: PeftConfig

    def prepare_inputs(self, inputs: ModelInputs, rows: Tensor) -> ModelInputs:
        """Adapt the batch for the rows this adapter serves (``rows[b] >= 0``)."""
        ...

    def attach(self, model: PeftModel, adapter_name: str) -> None:
        """Place the adapter on the model (register its modules, wrap layers, ...)."""
        ...

    def detach(self, model: PeftModel, adapter_name: str) -> None:
        """Remove every trace of the adapter from the model."""
        ...

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The adapter's own parameters (those a trainer optimises)."""
        ...

    def num_parameters(self) -> int:
        """Count of the adapter's own parameters."""
        ...

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Tensors to save, keyed as in PEFT's ``adapter_model.safetensors``."""
        ...

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (or by PEFT); errors name what is wrong."""
        ...


class AdaptsDuringTraining(Protocol):
    """Optional: adapters that change shape or budget as training runs (AdaLoRA)."""

    def after_optimizer_step(self, global_step: int) -> None:
        """Called by the training loop after every ``optimizer.step()`` and *before* ``zero_grad()``
        (the gradients are still there); ``global_step`` counts from 0."""
        ...


@runtime_checkable
class Mergeable(Protocol):
    """Adapters whose effect can be folded into the base weights (the weight adapters).

    ``merge`` computes every new weight before writing it; with ``safe_merge`` a NaN/inf anywhere
    raises and leaves the model as it was. ``unmerge`` restores the base weights (exactly up to
    floating-point rounding where the maths is invertible).
    """

    def merge(self, safe_merge: bool = False) -> None: ...

    def unmerge(self) -> None: ...

    @property
    def merged(self) -> bool: ...


class RegularizesLoss(Protocol):
    """Optional: adapters that add a term to the training loss (AdaLoRA's orthogonality penalty)."""

    def regularization_loss(self) -> Tensor | None:
        """Added to ``PeftModel.forward``'s loss whenever a loss is computed and the adapter serves rows."""
        ...


class Trainable(Protocol):
    """Adapters whose parameters can be frozen and unfrozen."""

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    @property
    def is_frozen(self) -> bool: ...


class ParameterOwner:
    """Freeze / unfreeze / count, for adapters whose parameters are :meth:`adapter_parameters`."""

    def adapter_parameters(self) -> Iterator[nn.Parameter]:  # pragma: no cover - overridden
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def freeze(self) -> None:
        for p in self.adapter_parameters():
            p.requires_grad_(False)

    def unfreeze(self) -> None:
        for p in self.adapter_parameters():
            p.requires_grad_(True)

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.adapter_parameters())


def expect_tensor(state_dict: dict[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """``state_dict[key]``, checked for presence and shape, with errors that say what was found."""
    if key not in state_dict:
        raise KeyError(f"adapter weights have no {key!r} (found: {sorted(state_dict)[:8]})")
    tensor = state_dict[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed``, or from torch's global RNG (so ``torch.manual_seed`` rules)."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator.manual_seed(seed)
    return generator
