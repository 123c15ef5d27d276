"""What the three soft-prompt methods share: config fields, expert banks, placement, packing.

Virtual tokens go *right before the user's first real token*, after any left padding and after
the segments of soft prompts applied earlier in the same call::

    user row (left-padded):   [pad pad  t0 t1 t2]
    PEFT puts them first:     [v0 v1 pad pad t0 t1 t2]      (positions of t* shift with padding)
    peftkit:                  [pad pad v0 v1 t0 t1 t2]      (same positions as the unpadded row)
    two prompts (c, then p):  [pad pad c0 c1 p0 p1 t0 t1 t2]

so a padded row computes exactly what the same row computes alone. Positions count only attended
tokens (:meth:`ModelInputs.position_ids`).

Rows a prompt does not serve get masked slots; once every adapter has prepared the batch,
:func:`pack_virtual_slots` moves each row's unused virtual slots to the front with one stable
sort and drops the columns no row needs. A batch therefore has length
``max over rows (own virtual tokens + L)``, however many different prompts its rows use.

A prompt-tuning or prefix-tuning adapter may hold a *bank* of experts (:class:`PromptBank`,
``expert_ids`` in its config): its table has one row per expert and ``rows`` picks each row's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import field_validator
from torch import Tensor, nn

from peftkit.config import PeftConfig
from peftkit.experts.bank import SINGLE_EXPERT_ID, ExpertIndex, expert_row, num_experts
from peftkit.methods.base import IGNORE_INDEX, ModelInputs, ParameterOwner, expect_tensor

if TYPE_CHECKING:
    from collections.abc import Iterator

    from peftkit.models.peft_model import PeftModel


#: Key prefix for prompt-encoder weights that PEFT does not save (they make training resumable).
ENCODER_PREFIX = "peftkit_encoder."


class PromptLearningConfig(PeftConfig):
    """Fields shared by soft-prompt configs (PEFT's ``PromptLearningConfig``).

    The geometry fields (``token_dim``, ``num_layers``, ``num_attention_heads``) are filled from the
    base model by :func:`~peftkit.get_peft_model` and written to ``adapter_config.json``.
    """

    num_virtual_tokens: int = 20
    """Number of virtual tokens (soft-prompt length); must be > 0."""
    token_dim: int | None = None
    """Width of one virtual token: the hidden size (prefix tuning: ``head_dim * num_kv_heads``)."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only models (PEFT uses 2 for encoder-decoders)."""
    num_attention_heads: int | None = None
    """Attention heads of the base model (prefix tuning: key/value heads)."""
    num_layers: int | None = None
    """Decoder layers of the base model."""
    modules_to_save: list[str] | None = None
    """Not used by soft-prompt methods; must stay empty."""
    expert_ids: list[str] | None = None
    """peftkit: the adapter is a bank of ``len(expert_ids)`` experts, one table row each, in this
    order (``None``: a single prompt, stored exactly as PEFT stores it). Prompt and prefix tuning."""

    extension_fields: ClassVar[frozenset[str]] = frozenset({"expert_ids"})

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @field_validator("num_virtual_tokens")
    @classmethod
    def _positive_tokens(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"num_virtual_tokens must be > 0, got {value}")
        return value

    @field_validator("expert_ids")
    @classmethod
    def _unique_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("expert_ids must hold at least one id (or be None for a single prompt)")
            ExpertIndex(value)  # raises on empty or repeated ids
        return value

    @property
    def num_experts(self) -> int:
        """Experts in the adapter's table (1 for a single prompt)."""
        return 1 if self.expert_ids is None else len(self.expert_ids)

    @field_validator("num_transformer_submodules")
    @classmethod
    def _decoder_only(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"num_transformer_submodules must be 1 for causal LMs, got {value}")
        return value

    @field_validator("modules_to_save")
    @classmethod
    def _no_modules_to_save(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise ValueError(f"modules_to_save is not supported for soft-prompt methods, got {value}")
        return value

    def resolved_for(self, model_config: Any) -> PromptLearningConfig:
        """A copy with the geometry fields filled from the base model's config."""
        geometry = model_geometry(model_config)
        updates: dict[str, Any] = {"num_transformer_submodules": 1}
        if self.num_layers is None:
            updates["num_layers"] = geometry.num_layers
        if self.token_dim is None:
            updates["token_dim"] = geometry.hidden_size
        if self.num_attention_heads is None:
            updates["num_attention_heads"] = geometry.num_heads
        return self.model_copy(update=updates)


class ModelGeometry:
    """Sizes of a decoder-only transformer, read from its Hugging Face config."""

    def __init__(self, model_config: Any) -> None:
        cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

        def first(*names: str) -> Any:
            for name in names:
                value = getattr(cfg, name, None)
                if value is not None:
                    return value
            raise ValueError(f"cannot read {names[0]} from the base model config ({type(cfg).__name__})")

        self.hidden_size: int = first("hidden_size", "n_embd", "d_model")
        self.num_layers: int = first("num_hidden_layers", "n_layer", "num_layers")
        self.num_heads: int = first("num_attention_heads", "n_head", "num_heads")
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads


def model_geometry(model_config: Any) -> ModelGeometry:
    return ModelGeometry(model_config)


class SoftPrompt(ParameterOwner, nn.Module):
    """Base class of the soft-prompt adapters: they live in ``PeftModel.prompt_encoder[name]``."""

    config: PromptLearningConfig

    def attach(self, model: PeftModel, adapter_name: str) -> None:
        model.prompt_encoder[adapter_name] = self

    def detach(self, model: PeftModel, adapter_name: str) -> None:
        del model.prompt_encoder[adapter_name]

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.parameters())

    def served_prompt(self, row: int = 0) -> Any:
        """Expert ``row``'s soft prompt as the serving engine takes it
        (:class:`peftkit.serving.types.SoftPrompt`, detached copies, computed once)."""
        raise NotImplementedError

    def _row_index(self, row: int) -> Tensor:
        return torch.tensor([row], dtype=torch.long, device=next(self.parameters()).device)

    def check_rows(self, rows: Tensor) -> Tensor:
        """``(B,)`` bool: which rows use this adapter; raises if a row names a missing expert."""
        count = num_experts(self)
        if rows.numel() and int(rows.max()) >= count:  # one check per adapter and call
            raise IndexError(f"rows index expert {int(rows.max())}, but this adapter holds {count}")
        return rows >= 0


class PromptBank:
    """A soft prompt whose trainable table is a bank of experts (prompt tuning, prefix tuning).

    The table is one parameter, ``embedding.weight`` ``(N * n_virtual, W)``; :attr:`table` views it
    as ``(N, n_virtual, W)``, row ``e`` = expert ``e`` (``experts.ids[e]``). A single prompt is a
    bank of one (``N = 1``), so ``embedding.weight`` keeps PEFT's ``(n_virtual, W)`` shape.
    """

    config: PromptLearningConfig
    embedding: nn.Embedding
    experts: ExpertIndex

    def _setup_bank(self, width: int, new_rows: Callable[[int], Tensor] | None = None) -> None:
        """Create the table for ``config.expert_ids`` (or one expert); ``new_rows(k)`` -> ``(k, n, W)``
        initial values for experts added later (default: zeros)."""
        ids = self.config.expert_ids
        self.experts = ExpertIndex(ids if ids is not None else [SINGLE_EXPERT_ID])
        self.embedding = nn.Embedding(len(self.experts) * self.config.num_virtual_tokens, width)
        self._new_rows = new_rows

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def is_bank(self) -> bool:
        """True when the config names the experts (files then hold ``(N, n, W)`` tensors)."""
        return self.config.expert_ids is not None

    @property
    def table(self) -> Tensor:
        """``(N, n_virtual, W)`` view of ``embedding.weight`` (gradients flow to the parameter)."""
        return self.embedding.weight.view(self.num_experts, self.config.num_virtual_tokens, -1)

    def initial_rows(self, count: int) -> Tensor:
        """``(count, n_virtual, W)`` starting values for new experts, as the config's init says."""
        weight = self.embedding.weight
        if self._new_rows is None:
            return weight.new_zeros(count, self.config.num_virtual_tokens, weight.shape[1])
        return self._new_rows(count).to(device=weight.device, dtype=weight.dtype)

    def add_experts(self, ids: Sequence[str], values: Tensor | None = None) -> range:
        """Append experts ``ids`` (values ``(k, n_virtual, W)``, default: the config's init).

        Existing rows keep their exact values; the parameter is replaced by a longer one (same
        ``requires_grad``), so an optimiser holding the old one must be rebuilt. Returns the new rows.
        """
        ids = list(ids)
        old = self.embedding.weight
        shape = (len(ids), self.config.num_virtual_tokens, old.shape[1])
        if values is None:
            values = self.initial_rows(len(ids))
        elif tuple(values.shape) != shape:
            raise ValueError(f"values has shape {tuple(values.shape)}, expected {shape} for {len(ids)} experts")
        rows = self.experts.extend(ids)
        grown = nn.Embedding(len(self.experts) * shape[1], shape[2], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            grown.weight.copy_(torch.cat([old.detach(), values.detach().reshape(-1, shape[2]).to(old)], dim=0))
        grown.weight.requires_grad_(old.requires_grad)
        self.embedding = grown
        self.config.expert_ids = self.experts.ids  # same object as PeftModel.peft_config[name]
        return rows

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Each row's own prompt: ``(n, W)`` for a bank of one, else ``(B, n, W)``.

        Rows with ``-1`` get row 0's prompt; the caller masks them (they are not served)."""
        if self.num_experts == 1:
            return self.table[0]
        return self.table.index_select(0, rows.clamp_min(0))

    def bank_state_dict(self) -> dict[str, Tensor]:
        """``prompt_embeddings``: ``(N, n, W)`` for a bank, PEFT's ``(n, W)`` for a single prompt."""
        table = self.table.detach()
        return {"prompt_embeddings": table if self.is_bank else table[0]}

    def load_bank_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load ``prompt_embeddings``: ``(N, n, W)`` into a bank; PEFT's ``(n, W)`` into a bank of one."""
        n, width = self.config.num_virtual_tokens, self.embedding.weight.shape[1]
        given = state_dict.get("prompt_embeddings")
        single = not self.is_bank or (self.num_experts == 1 and given is not None and given.dim() == 2)
        shape = (n, width) if single else (self.num_experts, n, width)
        tensor = expect_tensor(state_dict, "prompt_embeddings", shape)
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.reshape(-1, width))

    def expert_state_dict(self, expert: str | int) -> dict[str, Tensor]:
        """One expert's tensors in PEFT's single-adapter layout: ``prompt_embeddings`` ``(n, W)``."""
        return {"prompt_embeddings": self.table[expert_row(self, expert)].detach().clone()}

    def load_expert_state_dict(self, expert: str | int, state_dict: dict[str, Tensor]) -> None:
        """Write one expert's row from PEFT's single-adapter ``prompt_embeddings`` ``(n, W)``."""
        row = expert_row(self, expert)
        tensor = expect_tensor(state_dict, "prompt_embeddings", tuple(self.table.shape[1:]))
        with torch.no_grad():
            self.table[row].copy_(tensor)


class EmbeddingSoftPrompt(SoftPrompt):
    """A soft prompt that enters as extra input embeddings (prompt tuning, p-tuning)."""

    def prompt(self) -> Tensor:
        """``(n_virtual, D)`` the virtual token embeddings."""
        raise NotImplementedError

    def forward(self, batch_size: int) -> Tensor:
        """``(batch_size, n_virtual, D)`` the prompt repeated for every row (identical rows)."""
        return self.prompt().unsqueeze(0).expand(batch_size, -1, -1)

    def row_prompts(self, rows: Tensor) -> Tensor:
        """The prompt of each row: ``(n, D)`` shared by every row, or ``(B, n, D)``."""
        return self.prompt()

    @torch.no_grad()
    def served_prompt(self, row: int = 0) -> Any:
        """``SoftPrompt("prompt", n, embeddings)``: the ``(n, D)`` virtual embeddings (the prompt
        encoder run once for p-tuning)."""
        from peftkit.serving.types import SoftPrompt as ServedPrompt

        self.check_rows(self._row_index(row))
        prompts = self.row_prompts(self._row_index(row))
        embeddings = prompts[0] if prompts.dim() == 3 else prompts
        return ServedPrompt("prompt", self.config.num_virtual_tokens, embeddings=embeddings.detach().clone())

    def prepare_inputs(self, inputs: ModelInputs, rows: Tensor) -> ModelInputs:
        selected = self.check_rows(rows)
        return insert_virtual_embeddings(inputs, self.row_prompts(rows), selected)


def leading_padding(attention_mask: Tensor) -> Tensor:
    """``(B,)`` how many masked positions open each row (its left padding)."""
    length = attention_mask.shape[1]
    first_real = attention_mask.ne(0).int().argmax(-1)
    return torch.where(attention_mask.ne(0).any(-1), first_real, torch.full_like(first_real, length))


def first_user_token(inputs: ModelInputs) -> Tensor:
    """``(B,)`` sequence position of each row's first attended user token (``S`` if it has none)."""
    user_mask = inputs.attention_mask.gather(1, inputs.user_positions)
    first = leading_padding(user_mask)
    length = inputs.user_positions.shape[1]
    if length == 0:
        return torch.full_like(first, inputs.inputs_embeds.shape[1])
    position = inputs.user_positions.gather(1, first.clamp_max(length - 1).unsqueeze(1)).squeeze(1)
    return torch.where(first < length, position, torch.full_like(position, inputs.inputs_embeds.shape[1]))


def insert_virtual_embeddings(inputs: ModelInputs, prompt: Tensor, selected: Tensor) -> ModelInputs:
    """Insert ``prompt`` (``(n, D)`` for every row, or ``(B, n, D)`` per row) where ``selected``.

    The virtual tokens go right before each selected row's first real token (after its left
    padding and after virtual tokens inserted before); rows that are not selected receive ``n``
    masked slots at the front (they behave as extra padding, and :func:`pack_virtual_slots`
    removes them). Labels get ``-100`` at virtual positions and ``user_positions`` follow the
    user's tokens.
    """
    embeds, mask = inputs.inputs_embeds, inputs.attention_mask
    batch, length, dim = embeds.shape
    n = prompt.shape[-2]
    virtual = prompt.to(embeds.dtype).expand(batch, n, dim)
    virtual_mask = selected.long().unsqueeze(1).expand(batch, n)
    lead = torch.where(selected, first_user_token(inputs), torch.zeros_like(selected, dtype=torch.long))

    labels = inputs.labels
    if not bool(lead.any()):  # the common case: virtual tokens simply go first
        new_embeds = torch.cat([torch.where(selected[:, None, None], virtual, 0.0), embeds], dim=1)
        new_mask = torch.cat([virtual_mask, mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX).expand(batch, n), labels], 1)
        return inputs.with_(
            inputs_embeds=new_embeds,
            attention_mask=new_mask,
            labels=labels,
            user_positions=inputs.user_positions + n,
        )

    # Source index into cat(virtual, sequence) for every output position j:
    #   j < lead           -> sequence[j]       (left padding, earlier virtual tokens stay in front)
    #   lead <= j < lead+n -> virtual[j - lead]
    #   j >= lead + n      -> sequence[j - n]
    j = torch.arange(length + n, device=embeds.device).unsqueeze(0)
    lead_ = lead.unsqueeze(1)
    source = torch.where(j < lead_, j + n, torch.where(j < lead_ + n, j - lead_, j))
    stacked = torch.cat([torch.where(selected[:, None, None], virtual, 0.0), embeds], dim=1)
    new_embeds = stacked.gather(1, source.unsqueeze(-1).expand(-1, -1, dim))
    new_mask = torch.cat([virtual_mask, mask], dim=1).gather(1, source)
    if labels is not None:
        padded = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX).expand(batch, n), labels], 1)
        labels = padded.gather(1, source)
    user_positions = inputs.user_positions + n * (inputs.user_positions >= lead_).long()
    return inputs.with_(inputs_embeds=new_embeds, attention_mask=new_mask, labels=labels, user_positions=user_positions)


def pack_virtual_slots(inputs: ModelInputs) -> ModelInputs:
    """Drop the virtual slots no row uses: one stable sort per sequence (and prefix), no loops.

    In every row, unused (masked) virtual slots move to the front, everything else keeps its order
    (the user's own padding stays where the user put it); then the leading columns that are unused
    in every row are cut. The sequence becomes ``max over rows (own virtual tokens + L)`` long and
    the key/value prefix ``max over rows (own prefix)``. Positions skip masked slots, so each row
    computes what it computes alone. Costs one host sync for each of the two lengths.
    """
    return _pack_prefix(_pack_sequence(inputs))


def _pack_sequence(inputs: ModelInputs) -> ModelInputs:
    mask = inputs.attention_mask
    batch, length = mask.shape
    if length == inputs.user_positions.shape[1]:  # no virtual slots at all
        return inputs
    is_user = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, inputs.user_positions, True)
    unused = (mask == 0) & ~is_user
    drop = int(unused.sum(1).min())
    if drop == 0:
        return inputs
    order = torch.sort((~unused).to(torch.uint8), dim=1, stable=True).indices  # unused first
    arange = torch.arange(length, device=mask.device).expand(batch, length)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # new position of each old position
    order = order[:, drop:]
    dim = inputs.inputs_embeds.shape[-1]
    return inputs.with_(
        inputs_embeds=inputs.inputs_embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, dim)),
        attention_mask=mask.gather(1, order),
        labels=None if inputs.labels is None else inputs.labels.gather(1, order),
        user_positions=rank.gather(1, inputs.user_positions) - drop,
    )


def _pack_prefix(inputs: ModelInputs) -> ModelInputs:
    if inputs.prefix is None or inputs.prefix_mask is None:
        return inputs
    unused = inputs.prefix_mask == 0
    drop = int(unused.sum(1).min())
    if drop == 0:
        return inputs
    if drop == unused.shape[1]:  # no row uses any prefix slot
        return inputs.with_(prefix=None, prefix_mask=None)
    order = torch.sort((~unused).to(torch.uint8), dim=1, stable=True).indices[:, drop:]  # (B, P')

    def take(states: Tensor) -> Tensor:  # (B, H_kv, P, d) -> (B, H_kv, P', d)
        index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
        return states.gather(2, index)

    return inputs.with_(
        prefix=[(take(keys), take(values)) for keys, values in inputs.prefix],
        prefix_mask=inputs.prefix_mask.gather(1, order),
    )
