"""AdaLoRA's rank allocator (Zhang et al., 2023, https://arxiv.org/abs/2303.10512, §3.2-3.3).

Every step before ``total_step - tfinal`` it smooths each parameter's sensitivity ``I = |θ · ∂L/∂θ|``::

    Ī ← β₁ Ī + (1 - β₁) I                 (sensitivity)
    Ū ← β₂ Ū + (1 - β₂) |I - Ī|           (uncertainty)

A singular triplet ``i`` of a layer scores ``S(Λ_i) + mean_j S(P_ji) + mean_j S(Q_ij)`` with
``S = Ī · Ū``. The budget (total kept triplets over all layers) follows the cubic schedule::

    b(t) = b_init                                               t <= tinit
    b(t) = b_target + (b_init - b_target) (1 - (t - tinit) / (T - tfinal - tinit))³   (integer part)
    b(t) = b_target                                             t > T - tfinal

Every ``deltaT`` steps the lowest-scoring triplets beyond the budget get ``Λ_i = 0``; at step
``T - tfinal`` the final pattern is fixed and re-applied after every later step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from peftkit.methods.adalora.config import AdaLoraConfig


def budget_schedule(step: int, init_budget: int, target_budget: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """``(budget, reallocate_now)`` at ``step`` (PEFT's and the paper's cubic schedule)."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % config.deltaT == 0


#: One layer's SVD factors by PEFT name: ``lora_A`` ``(r, in)`` (Q), ``lora_E`` ``(r, 1)`` (Λ),
#: ``lora_B`` ``(out, r)`` (P).
LayerTriplets = dict[str, Tensor]


@dataclass
class RankAllocator:
    """Sensitivity statistics and the budget for one AdaLoRA adapter (layers keyed by module path)."""

    config: AdaLoraConfig
    layers: dict[str, LayerTriplets]
    ipt: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_ipt: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_unc: dict[str, Tensor] = field(default_factory=dict)

    @property
    def init_budget(self) -> int:
        return sum(t["lora_E"].shape[0] for t in self.layers.values())

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.layers)

    def reset(self) -> None:
        self.ipt.clear()
        self.exp_avg_ipt.clear()
        self.exp_avg_unc.clear()

    def update_sensitivity(self) -> None:
        """Fold the current gradients into the smoothed sensitivity and uncertainty."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, triplets in self.layers.items():
                for name in ("lora_A", "lora_E", "lora_B"):
                    param = triplets[name]
                    if param.grad is None:
                        continue
                    key = f"{path}.{name}"
                    if key not in self.exp_avg_ipt:
                        self.exp_avg_ipt[key] = torch.zeros_like(param)
                        self.exp_avg_unc[key] = torch.zeros_like(param)
                    ipt = (param * param.grad).abs()
                    self.ipt[key] = ipt
                    self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
                    self.exp_avg_unc[key] = (
                        beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - self.exp_avg_ipt[key]).abs()
                    )

    def triplet_scores(self) -> dict[str, Tensor]:
        """Path → ``(r,)`` importance of each singular triplet."""
        scores = {}
        for path in self.layers:
            if f"{path}.lora_E" not in self.exp_avg_ipt:
                continue
            score_a = self._score(path, "lora_A").mean(dim=1)
            score_b = self._score(path, "lora_B").mean(dim=0)
            score_e = self._score(path, "lora_E").view(-1)
            scores[path] = score_e + score_a + score_b
        return scores

    def _score(self, path: str, name: str) -> Tensor:
        key = f"{path}.{name}"
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``Λ`` entries of all but the ``budget`` best triplets; return the kept pattern."""
        scores = self.triplet_scores()
        if not scores:
            return {}
        pruned = self.init_budget - budget
        everything = torch.cat(list(scores.values()))
        threshold = torch.kthvalue(everything, k=pruned).values.item() if pruned > 0 else -float("inf")
        pattern = {}
        with torch.no_grad():
            for path, score in scores.items():
                drop = score <= threshold
                self.layers[path]["lora_E"].masked_fill_(drop.view(-1, 1), 0.0)
                pattern[f"{path}.lora_E"] = (~drop).tolist()
        return pattern

    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Re-zero the pruned triplets (after each step of the final phase)."""
        with torch.no_grad():
            for path, triplets in self.layers.items():
                kept = pattern.get(f"{path}.lora_E")
                if kept is not None and len(kept) == triplets["lora_E"].shape[0]:
                    mask = torch.tensor(kept, device=triplets["lora_E"].device).view(-1, 1)
                    triplets["lora_E"].masked_fill_(~mask, 0.0)

    def step(self, global_step: int) -> dict[str, list[bool]] | None:
        """PEFT's ``update_and_allocate``: returns a new pattern when one was computed."""
        final = self.config.total_step - self.config.tfinal
        if global_step < final:
            self.update_sensitivity()
            budget, now = budget_schedule(global_step, self.init_budget, self.target_budget, self.config)
            return self.mask_to_budget(budget) if now else None
        if global_step == final:
            pattern = self.mask_to_budget(self.target_budget)
            self.reset()
            return pattern
        return None
