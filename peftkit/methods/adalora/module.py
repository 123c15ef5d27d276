"""AdaLoRA on Linear / GPT-2 Conv1D layers (https://arxiv.org/abs/2303.10512).

::

    ΔW = s / r₀ · P (Λ ⊙ Q)        Q = lora_A (r, in), Λ = lora_E (r, 1), P = lora_B (out, r)
    y  = W x + ΔW x               s = lora_alpha (or r₀ when 0), r₀ = init_r (fixed, even after pruning)

Training adds ``orth_reg_weight · mean(‖QQᵀ - I‖_F, ‖PᵀP - I‖_F)`` over the layers to the loss and,
after each optimiser step, lets :class:`RankAllocator` re-allocate the rank budget (pruned triplets
get ``Λ_i = 0``). Saved files hold only the kept triplets, with ``rank_pattern`` in the config, so a
pruned layer really is smaller on disk and when loaded. File keys (PEFT, no ``.weight``):
``<path>.lora_A (r, in)``, ``<path>.lora_E (r, 1)``, ``<path>.lora_B (out, r)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.rank_allocator import LayerTriplets, RankAllocator
from peftkit.methods.tuners.adapter import PREFIX, WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, cast_input, dense_weight


class AdaLora(WeightAdapter):
    """The AdaLoRA adapter; ``after_optimizer_step`` drives its rank allocator."""

    config: AdaLoraConfig
    bias_only = "lora_only"
    default_targets_table = "adalora"

    def __init__(self, config: AdaLoraConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)
        self.ranknum = float(config.init_r)
        self._allocator: RankAllocator | None = None

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        out_features, in_features = dense_weight(module).shape
        kept = (self.config.rank_pattern or {}).get(f"{path}.lora_E")
        r = sum(kept) if kept is not None else self.config.init_r
        lora_a, lora_e, lora_b = torch.randn(r, in_features), torch.randn(r, 1), torch.randn(out_features, r)
        if self.config.init_lora_weights:
            nn.init.zeros_(lora_e)
            nn.init.normal_(lora_a, mean=0.0, std=0.02)
            nn.init.normal_(lora_b, mean=0.0, std=0.02)
        dropout = nn.Dropout(self.config.lora_dropout) if self.config.lora_dropout > 0 else nn.Identity()
        return {
            "lora_A": nn.Parameter(lora_a),
            "lora_E": nn.Parameter(lora_e),
            "lora_B": nn.Parameter(lora_b),
            "lora_dropout": dropout,
        }

    # ------------------------------------------------------------------ maths
    def delta(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        lora_a, lora_e, lora_b = (self.part(layer, n) for n in ("lora_A", "lora_E", "lora_B"))
        x = self.part(layer, "lora_dropout")(cast_input(x, lora_a.dtype))
        return (x @ (lora_a * lora_e).T @ lora_b.T) * self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        lora_a, lora_e, lora_b = (self.part(layer, n).float() for n in ("lora_A", "lora_E", "lora_B"))
        return lora_b @ (lora_a * lora_e) * self.scaling / (self.ranknum + 1e-5)

    def regularization_loss(self) -> Tensor | None:
        """``orth_reg_weight`` × the mean over all ``Q`` and ``P`` of ``‖QQᵀ - I‖_F`` / ``‖PᵀP - I‖_F`` (as PEFT)."""
        if self.is_frozen or self.config.orth_reg_weight == 0:
            return None
        penalties = []
        for parts in self.parts.values():
            for name, gram in (("lora_A", lambda p: p @ p.T), ("lora_B", lambda p: p.T @ p)):
                product = gram(parts[name])
                eye = torch.eye(product.shape[0], device=product.device, dtype=product.dtype)
                penalties.append(torch.linalg.norm(product - eye, ord="fro"))
        return self.config.orth_reg_weight * torch.stack(penalties).mean() if penalties else None

    # ------------------------------------------------------------------ rank allocation
    @property
    def allocator(self) -> RankAllocator:
        if self._allocator is None:
            layers: dict[str, LayerTriplets] = {
                path: {name: parts[name] for name in ("lora_A", "lora_E", "lora_B")}
                for path, parts in self.parts.items()
            }
            self._allocator = RankAllocator(self.config, layers)
        return self._allocator

    def after_optimizer_step(self, global_step: int) -> None:
        """PEFT's ``update_and_allocate(global_step)``: call after ``optimizer.step()``, before ``zero_grad()``."""
        if self.is_frozen:
            return
        if global_step > self.config.total_step - self.config.tfinal:
            if self.config.rank_pattern:
                self.allocator.apply_pattern(self.config.rank_pattern)
            return
        pattern = self.allocator.step(global_step)
        if pattern:
            self.config.rank_pattern = pattern

    update_and_allocate = after_optimizer_step

    def training_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint needs beyond the weights for an exact resume: the allocator's smoothed
        sensitivity / uncertainty and the kept-triplet pattern (re-applied in the final phase)."""
        allocator = self.allocator
        state = {f"exp_avg_ipt/{k}": v.detach() for k, v in allocator.exp_avg_ipt.items()}
        state.update({f"exp_avg_unc/{k}": v.detach() for k, v in allocator.exp_avg_unc.items()})
        for key, kept in (self.config.rank_pattern or {}).items():
            state[f"rank_pattern/{key}"] = torch.tensor(kept, dtype=torch.bool)
        return state

    def load_training_state_dict(self, state: dict[str, Tensor]) -> None:
        allocator = self.allocator
        allocator.reset()
        pattern: dict[str, list[bool]] = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind == "exp_avg_ipt":
                allocator.exp_avg_ipt[name] = value.clone()
            elif kind == "exp_avg_unc":
                allocator.exp_avg_unc[name] = value.clone()
            elif kind == "rank_pattern":
                pattern[name] = value.tolist()
            else:
                raise KeyError(f"unexpected AdaLoRA training state {key!r}")
        self.config.rank_pattern = pattern or None

    def ranks(self) -> dict[str, int]:
        """Module path → number of singular triplets still in use (non-zero ``Λ``)."""
        return {path: int((parts["lora_E"] != 0).sum()) for path, parts in self.parts.items()}

    # ------------------------------------------------------------------ files
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """PEFT's layout: with a ``rank_pattern``, only the kept triplets of each layer are written."""
        tensors = super().adapter_state_dict()
        for path, kept in self._full_size_patterns().items():
            index = torch.tensor(kept, dtype=torch.bool)
            for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                key = f"{PREFIX}{path}.{name}"
                tensors[key] = tensors[key].index_select(dim, index.nonzero().squeeze(1).to(tensors[key].device))
        return tensors

    def _full_size_patterns(self) -> dict[str, list[bool]]:
        """Patterns of layers still at full size (pruned by masking during this run, not yet resized)."""
        found = {}
        for key, kept in (self.config.rank_pattern or {}).items():
            path = key.removesuffix(".lora_E")
            if path in self.parts and self.parts[path]["lora_E"].shape[0] == len(kept):
                found[path] = kept
        return found
