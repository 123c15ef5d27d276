"""Per-row gathered LoRA (Punica, https://arxiv.org/abs/2310.18547; S-LoRA, https://arxiv.org/abs/2311.03285):
one forward pass applies each row's own LoRA, so 32 distinct LoRAs in a batch cost one pass, not 32.

::

    x (B, T, in) ──► W (frozen) ──────────────────────────────────────────────┐
    │                                                                         + ──► y
    └─► gather A[slot_b] (B, r_max, in) ─► bmm ─► gather B[slot_b] ─► bmm ─► ·s[slot_b]
                                                  (B, out, r_max)

Every ``nn.Linear`` some LoRA targets gets a forward hook holding the stacked factors of every slot:
``A`` ``(S, r_max, in)``, ``B`` ``(S, out, r_max)`` and ``scale`` ``(S,)``. A LoRA of rank ``r < r_max``
is zero-padded, which changes nothing (the extra rank components are ``0 · 0``); a slot that does
not target a layer is all zero there. ``S`` (the slot capacity) doubles when full.

Which slot each row uses is per-call state (:meth:`LoraBank.routing`, a :class:`~contextvars.ContextVar`):
two threads running forwards at once each see only their own rows. Outside ``routing`` (or with every row
``-1``) a hook returns at once and the layer is the bare one.

State-dict keys are PEFT's file keys: ``base_model.model.<module path>.lora_A.weight`` ``(r, in)`` and
``.lora_B.weight`` ``(out, r)``; the layers a LoRA targets (``target_modules``, ``layers_to_transform``)
are the ones its keys name.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.tuners.adapter import PREFIX
from peftkit.methods.tuners.targeting import pattern_value

__all__ = ["LoraBank"]

#: Key tails of PEFT LoRA tensors this bank refuses, with the reason.
REFUSED_TAILS = {
    "lora_embedding_A": "LoRA on embeddings is not supported by the LoRA bank",
    "lora_embedding_B": "LoRA on embeddings is not supported by the LoRA bank",
    "lora_magnitude_vector": "DoRA (use_dora) is not supported by the LoRA bank",
}


@dataclass
class _Route:
    """One call's routing: the ``(B,)`` slots, on the CPU and (lazily) on each device the layers use."""

    slots: Tensor
    used: frozenset[int]
    all_served: bool
    _on: dict[torch.device, tuple[Tensor | None, Tensor]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[Tensor | None, Tensor]:
        """``(rows, slots)`` on ``device``: the served rows (``None``: every row) and their slots."""
        cached = self._on.get(device)
        if cached is None:
            if self.all_served:
                cached = (None, self.slots.to(device))
            else:
                rows = (self.slots >= 0).nonzero().squeeze(1)
                cached = (rows.to(device), self.slots[rows].to(device))
            self._on[device] = cached
        return cached


class _BankedLinear:
    """The forward hook on one ``nn.Linear``: the stacked factors of every slot and the gathered update."""

    def __init__(self, module: nn.Linear, route: contextvars.ContextVar[_Route | None], capacity: int, dtype: Any):
        self.module = module
        self.route = route
        self.occupied: dict[int, int] = {}  # slot -> its rank here
        weight = module.weight
        self.out_features, self.in_features = weight.shape
        self.device, self.dtype = weight.device, dtype
        # (A, B, scale) swapped as one tuple: a forward in another thread never sees A and B of two sizes.
        self.weights = self._zeros(capacity, 1)
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def _zeros(self, capacity: int, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        kw = {"device": self.device, "dtype": self.dtype}
        return (
            torch.zeros(capacity, rank, self.in_features, **kw),
            torch.zeros(capacity, self.out_features, rank, **kw),
            torch.zeros(capacity, **kw),
        )

    @property
    def rank(self) -> int:
        return self.weights[0].shape[1]

    def resize(self, capacity: int, rank: int) -> None:
        """Grow to ``capacity`` slots and rank ``rank`` (zero-padded), keeping every slot's factors."""
        old_a, old_b, old_scale = self.weights
        a, b, scale = self._zeros(capacity, rank)
        n, r = old_a.shape[:2]
        a[:n, :r], b[:n, :, :r], scale[:n] = old_a, old_b, old_scale
        self.weights = (a, b, scale)

    def put(self, slot: int, lora_a: Tensor, lora_b: Tensor, scale: float) -> None:
        r = lora_a.shape[0]
        if r > self.rank:
            self.resize(self.weights[0].shape[0], r)
        a, b, s = self.weights
        a[slot].zero_()
        b[slot].zero_()
        a[slot, :r] = lora_a.to(a)
        b[slot, :, :r] = lora_b.to(b)
        s[slot] = scale
        self.occupied[slot] = r

    def clear(self, slot: int) -> None:
        a, b, s = self.weights
        a[slot].zero_()
        b[slot].zero_()
        s[slot] = 0
        self.occupied.pop(slot, None)
        if self.occupied and self.rank > max(self.occupied.values()):
            self.shrink_rank(max(self.occupied.values()))

    def shrink_rank(self, rank: int) -> None:
        a, b, s = self.weights
        self.weights = (a[:, :rank].contiguous(), b[:, :, :rank].contiguous(), s)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        route = self.route.get()
        if route is None or route.used.isdisjoint(self.occupied):
            return None
        x = args[0] if args else kwargs["input"]
        if x.shape[0] != route.slots.shape[0]:
            raise RuntimeError(
                f"LoraBank: a layer got a batch of {x.shape[0]} rows but routing() was given "
                f"{route.slots.shape[0]} slots (the batch must be the first dimension)"
            )
        a, b, scale = self.weights
        rows, slots = route.on(x.device)
        if rows is not None:
            x = x.index_select(0, rows)
        lead = x.shape[:-1]
        x3 = x.reshape(x.shape[0], -1, self.in_features).to(a.dtype)  # (n, T, in)
        hidden = torch.bmm(x3, a[slots].transpose(1, 2))  # (n, T, r_max)
        delta = torch.bmm(hidden, b[slots].transpose(1, 2)) * scale[slots].view(-1, 1, 1)  # (n, T, out)
        delta = delta.reshape(*lead, self.out_features).to(output.dtype)
        return output + delta if rows is None else output.index_add(0, rows, delta)


class LoraBank:
    """Many LoRAs on one frozen causal LM, each row of a batch using its own (or none).

    ::

        bank = LoraBank(model)
        bank.add("sql", {"peft_type": "LORA", "r": 8, "lora_alpha": 16}, load_file("sql/adapter_model.safetensors"))
        with bank.routing(torch.tensor([bank.slot("sql"), -1])):
            logits = model(input_ids).logits  # row 0 with the "sql" LoRA, row 1 the bare model

    Args:
        model: the base model (a Hugging Face causal LM; frozen, not wrapped by a PEFT model).
        dtype: the factors' dtype (default: the model's parameter dtype). The update is computed in it
            and cast to the layer's output dtype.

    Adding and removing are thread-safe (a lock). Replacing or removing a LoRA while a forward in
    another thread routes rows to it gives those rows either version: the engine swaps between steps.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None, initial_capacity: int = 4) -> None:
        if initial_capacity < 1:
            raise ValueError(f"initial_capacity must be >= 1, got {initial_capacity}")
        self.model = model
        self.dtype = dtype or next(model.parameters()).dtype
        self.capacity = initial_capacity
        self._route: contextvars.ContextVar[_Route | None] = contextvars.ContextVar(
            f"peftkit_lora_bank_{id(self)}", default=None
        )
        self._layers: dict[str, _BankedLinear] = {}
        self._slots: dict[str, int] = {}
        self._versions: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._free: list[int] = []
        self._version = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ registry
    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str) -> int:
        """The slot index of LoRA ``name`` (what :meth:`routing` takes)."""
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(f"no LoRA {name!r} in the bank; it holds {sorted(self._slots)}") from None

    def version(self, name: str) -> int:
        """The version :meth:`add` returned when ``name`` was last added."""
        self.slot(name)
        return self._versions[name]

    def nbytes_of(self, name: str) -> int:
        """Bytes of ``name``'s own factors in the bank's dtype (without rank padding)."""
        self.slot(name)
        return self._sizes[name]

    @property
    def nbytes(self) -> int:
        """Bytes of every stacked tensor (all slots, padded to each layer's ``r_max``)."""
        return sum(t.numel() * t.element_size() for layer in self._layers.values() for t in layer.weights)

    @property
    def layers(self) -> list[str]:
        """Paths of the layers that hold a banked LoRA."""
        return list(self._layers)

    def add(self, name: str, config: dict[str, Any] | LoraConfig, state_dict: dict[str, Tensor]) -> int:
        """Add LoRA ``name`` (or replace it, keeping its slot); returns its new version number.

        Args:
            config: its ``adapter_config.json`` dict or :class:`LoraConfig`.
            state_dict: its tensors in PEFT's file layout (``base_model.model.<path>.lora_A.weight`` ...).

        Raises:
            ValueError: what the bank does not support (DoRA, ``lora_bias``, ``fan_in_fan_out`` / Conv1D,
                embedding LoRA, base-weight changing inits, ``modules_to_save`` ...), or tensors that do not fit.
        """
        config = _lora_config(name, config)
        factors = self._parse(name, config, state_dict)
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._take_slot()
            else:
                for layer in self._layers.values():
                    layer.clear(slot)
            for path, (lora_a, lora_b, scale) in factors.items():
                layer = self._layers.get(path)
                if layer is None:
                    module = self.model.get_submodule(path)
                    layer = self._layers[path] = _BankedLinear(module, self._route, self.capacity, self.dtype)
                layer.put(slot, lora_a, lora_b, scale)
            self._drop_empty_layers()
            self._version += 1
            self._slots[name] = slot
            self._versions[name] = self._version
            size = torch.tensor([], dtype=self.dtype).element_size()
            self._sizes[name] = sum((a.numel() + b.numel()) * size for a, b, _ in factors.values())
            return self._version

    def remove(self, name: str) -> None:
        """Remove LoRA ``name``; its slot is reused by the next :meth:`add`."""
        with self._lock:
            slot = self.slot(name)
            for layer in self._layers.values():
                layer.clear(slot)
            self._drop_empty_layers()
            del self._slots[name], self._versions[name], self._sizes[name]
            self._free.append(slot)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._slots)
        if slot >= self.capacity:
            self.capacity *= 2
            for layer in self._layers.values():
                layer.resize(self.capacity, layer.rank)
        return slot

    def _drop_empty_layers(self) -> None:
        for path in [p for p, layer in self._layers.items() if not layer.occupied]:
            self._layers.pop(path).handle.remove()

    def _parse(self, name: str, config: LoraConfig, state_dict: dict[str, Tensor]) -> dict[str, tuple]:
        """``{module path: (A (r, in), B (out, r), scale)}`` from PEFT-layout keys, each checked."""
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, value in state_dict.items():
            if self._is_base_copy(name, key, value):
                continue
            path, _, tail = key.removeprefix(PREFIX).rpartition(".lora_")
            tail = "lora_" + tail
            for refused, reason in REFUSED_TAILS.items():
                if tail.startswith(refused):
                    raise ValueError(f"LoRA {name!r}: {reason} (key {key!r})")
            if not path or tail not in ("lora_A.weight", "lora_B.weight"):
                hint = " (lora_bias is not supported by the LoRA bank)" if tail == "lora_B.bias" else ""
                raise ValueError(
                    f"LoRA {name!r}: unsupported key {key!r}{hint}; the bank takes only "
                    "'base_model.model.<path>.lora_A.weight' / '.lora_B.weight' (no modules_to_save, no bias)"
                )
            pairs.setdefault(path, {})[tail[5]] = value
        if not pairs:
            raise ValueError(f"LoRA {name!r}: the state dict holds no lora_A / lora_B tensors")
        factors = {}
        for path, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"LoRA {name!r}: {path} has lora_{''.join(pair)} but not both lora_A and lora_B")
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"LoRA {name!r}: the model has no module {path!r}") from None
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"LoRA {name!r}: {path} is a {type(module).__name__}; the bank adapts nn.Linear only "
                    "(no Conv1D / fan_in_fan_out, embeddings or convolutions)"
                )
            lora_a, lora_b = pair["A"], pair["B"]
            r = lora_a.shape[0]
            expected_r = pattern_value(config.rank_pattern, path, config.r)
            shapes = (tuple(lora_a.shape), tuple(lora_b.shape))
            if shapes != ((expected_r, module.in_features), (module.out_features, expected_r)):
                raise ValueError(
                    f"LoRA {name!r}: {path} has lora_A {shapes[0]} and lora_B {shapes[1]}; expected "
                    f"({expected_r}, {module.in_features}) and ({module.out_features}, {expected_r}) (r: the config's)"
                )
            alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
            scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            factors[path] = (lora_a.detach(), lora_b.detach(), scale)
        return factors

    def _is_base_copy(self, name: str, key: str, value: Tensor) -> bool:
        """PEFT also saves the base weights of targeted output / embedding layers (``lm_head.base_layer.weight``):
        accepted when equal to this model's, refused when they differ (the bank never changes base weights)."""
        path, _, tail = key.removeprefix(PREFIX).rpartition(".base_layer.")
        if not path or tail not in ("weight", "bias"):
            return False
        own = getattr(self.model.get_submodule(path), tail, None)
        if own is None or own.shape != value.shape or not torch.equal(value.to(own.dtype), own.detach()):
            raise ValueError(
                f"LoRA {name!r}: the file carries base weights {key!r} that differ from this base model's "
                "(a resized or modified layer); the LoRA bank never changes base weights"
            )
        return True

    # ------------------------------------------------------------------ routing
    @contextlib.contextmanager
    def routing(self, slots: Tensor | Sequence[int]) -> Iterator[None]:
        """Inside, each row ``b`` of a forward uses the LoRA in slot ``slots[b]`` (``-1``: none).

        Args:
            slots: ``(B,)`` int64, one slot per row of the batch (from :meth:`slot`).

        Per call: other threads and asyncio tasks keep their own routing.
        """
        slots = torch.as_tensor(slots, dtype=torch.long).cpu()
        if slots.dim() != 1:
            raise ValueError(f"routing() takes a (B,) tensor of slots, got shape {tuple(slots.shape)}")
        used = frozenset(slots.tolist()) - {-1}
        known = set(self._slots.values())
        if unknown := sorted(used - known):
            raise ValueError(f"routing(): slots {unknown} hold no LoRA (occupied: {sorted(known)}; -1 = none)")
        route = _Route(slots, used, bool((slots >= 0).all())) if used else None
        token = self._route.set(route)
        try:
            yield
        finally:
            self._route.reset(token)

    def close(self) -> None:
        """Remove every LoRA and every hook: the model is the bare model again."""
        with self._lock:
            for name in list(self._slots):
                self.remove(name)


def _lora_config(name: str, config: dict[str, Any] | LoraConfig) -> LoraConfig:
    if isinstance(config, dict):
        from peftkit.config import PeftConfig

        data = {"peft_type": "LORA", **config}
        parsed = PeftConfig.from_dict(data)
        if not isinstance(parsed, LoraConfig):
            raise ValueError(f"LoRA {name!r}: peft_type={data['peft_type']!r} is not LORA")
        config = parsed
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA":
        raise ValueError(f"LoRA {name!r}: expected a LoRA config, got {type(config).__name__}")
    refused = {
        "use_dora": (config.use_dora, "DoRA"),
        "lora_bias": (config.lora_bias, "a bias on lora_B"),
        "fan_in_fan_out": (config.fan_in_fan_out, "Conv1D (GPT-2) layers"),
        "trainable_token_indices": (config.trainable_token_indices is not None, "trained token rows"),
        "layer_replication": (config.layer_replication is not None, "replicated layers"),
        "modules_to_save": (bool(config.modules_to_save), "fully trained module copies"),
        "bias": (config.bias != "none", "trained base biases"),
        "init_lora_weights": (
            config.init_lora_weights in ("pissa", "olora") or str(config.init_lora_weights).startswith("pissa_niter"),
            "residual inits that change the base weights",
        ),
    }
    for key, (bad, what) in refused.items():
        if bad:
            raise ValueError(
                f"LoRA {name!r}: {key}={getattr(config, key)!r} is not supported by the LoRA bank ({what}); "
                "serve it with a PeftModel instead"
            )
    return config
