"""Expert banks: one adapter holding a table of many experts, one row per expert.

A bank is a plain parameter table plus an ordered index of string ids::

    expert ids   ["p000", "p001", ..., "p199"]          (ExpertIndex: id <-> row)
    table        (N, n_virtual, W)  row e = expert e     (one nn.Parameter, viewed per expert)

    prompt tuning  W = hidden size                 (PEFT's prompt_embeddings row)
    prefix tuning  W = num_layers * 2 * kv_dim     (PEFT's prefix layout, per expert)

A batch routes each row to an expert by its *row index* in the table (``-1``: the adapter does not
serve the row), so a forward pass gathers every row's own prompt with one indexing op, whatever
the number of distinct experts. Adding experts appends rows; existing rows keep their values
(the parameter object is replaced by a longer one, so an optimiser must be told, see
``docs/experts.md``).

Adapters that hold a bank follow :class:`ExpertBank`; every other adapter is a bank of one (its
only expert has index ``0``, id ``"0"``). :func:`expert_row` turns what a caller writes for a row
(an id, an index, or ``None``) into that index, with errors that name the adapter and the id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

#: id of the only expert of an adapter that is not a bank (a single prompt, a LoRA, ...).
SINGLE_EXPERT_ID = "0"


class ExpertIndex:
    """Ordered, growable index of expert ids: ``ids[e]`` names row ``e`` of the table.

    Memory per expert is one string and one dict entry (no tensors, no modules).
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self.extend(ids)

    def extend(self, ids: Iterable[str]) -> range:
        """Append ``ids`` (new, unique, non-empty strings); returns their rows."""
        ids = list(ids)
        for expert_id in ids:
            if not isinstance(expert_id, str) or not expert_id:
                raise ValueError(f"expert ids must be non-empty strings, got {expert_id!r}")
        duplicates = sorted({i for i, count in Counter(ids).items() if count > 1 or i in self._rows})
        if duplicates:
            raise ValueError(f"expert id(s) already in the bank or repeated: {duplicates[:10]}")
        start = len(self._ids)
        self._ids.extend(ids)
        self._rows.update({expert_id: start + k for k, expert_id in enumerate(ids)})
        return range(start, len(self._ids))

    def row(self, expert_id: str) -> int:
        try:
            return self._rows[expert_id]
        except KeyError:
            sample = ", ".join(self._ids[:5]) + (", ..." if len(self._ids) > 5 else "")
            raise KeyError(f"no expert {expert_id!r} in this bank of {len(self._ids)} ({sample})") from None

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._rows

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)


@runtime_checkable
class ExpertBank(Protocol):
    """An adapter holding a table of experts (soft prompts: prompt tuning, prefix tuning)."""

    experts: ExpertIndex

    @property
    def num_experts(self) -> int: ...

    @property
    def table(self) -> Tensor:
        """``(N, n_virtual, W)`` view of the trainable parameter: row ``e`` is expert ``e``."""
        ...

    def add_experts(self, ids: Sequence[str], values: Tensor | None = None) -> range:
        """Append experts (``values`` ``(k, n_virtual, W)``, or the adapter's init); returns their rows."""
        ...

    def expert_state_dict(self, expert: str | int) -> dict[str, Tensor]:
        """One expert's tensors in PEFT's single-adapter layout (``prompt_embeddings``)."""
        ...

    def load_expert_state_dict(self, expert: str | int, state_dict: dict[str, Tensor]) -> None:
        """Write one expert's row from PEFT's single-adapter tensors."""
        ...


def num_experts(adapter: object) -> int:
    """How many experts ``adapter`` holds (1 for an adapter that is not a bank)."""
    return adapter.num_experts if isinstance(adapter, ExpertBank) else 1


def expert_row(adapter: object, expert: str | int | None, adapter_name: str = "adapter") -> int:
    """The table row of ``expert`` in ``adapter``: ``None`` -> ``-1`` (row not served).

    ``expert`` is an id (``str``) or a row index (``int``); an adapter that is not a bank has one
    expert, index ``0`` / id ``"0"``.
    """
    if expert is None:
        return -1
    count = num_experts(adapter)
    if isinstance(expert, bool) or not isinstance(expert, (int, str)):
        raise TypeError(f"{adapter_name!r}: an expert is an id (str) or an index (int), got {expert!r}")
    if isinstance(expert, int):
        if not 0 <= expert < count:
            raise IndexError(f"{adapter_name!r}: expert index {expert} out of range (it holds {count})")
        return expert
    if isinstance(adapter, ExpertBank):
        try:
            return adapter.experts.row(expert)
        except KeyError as error:
            raise KeyError(f"{adapter_name!r}: {error.args[0]}") from None
    if expert != SINGLE_EXPERT_ID:
        raise KeyError(f"{adapter_name!r} is not a bank: its only expert is {SINGLE_EXPERT_ID!r} or 0, not {expert!r}")
    return 0


def has_expert(adapter: object, expert: str | int | None) -> bool:
    """Whether ``expert`` names an expert of ``adapter`` (``None`` never does)."""
    if expert is None:
        return False
    try:
        expert_row(adapter, expert)
    except (KeyError, IndexError, TypeError):
        return False
    return True
