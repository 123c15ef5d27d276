"""``add_weighted_adapter``: a new LoRA adapter combined from existing ones, as PEFT 0.21 combines them.

Two families, per adapted layer (each source adapter ``i`` with weight ``w_i`` and scaling ``s_i``):

- **factor-wise** (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the ``A``
  factors are merged with weights ``sign(w_i s_i) √|w_i s_i|`` and the ``B`` factors with ``√|w_i s_i|``,
  each stack on its own. For one adapter this is exact (``B'A' = w s BA``); for several it is PEFT's
  approximation, ``Σ B_i · Σ A_i`` with cross terms. All sources need the same rank.
- **exact then truncated** (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): the full updates ``ΔW_i = s_i B_i A_i`` are merged, then the result is cut back
  to rank ``svd_rank`` (default: the largest source rank) by SVD: ``B' = U_r S_r``, ``A' = V_rᵀ``.
- ``cat``: exact, rank ``Σ r_i``: ``A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B' = [B_1, B_2, ...]``.

The merging rules ([TIES](https://arxiv.org/abs/2306.01708), [DARE](https://arxiv.org/abs/2311.03099)):
magnitude pruning keeps the ``density`` fraction of entries with the largest magnitude; DARE keeps each
entry with probability ``density`` and rescales by ``1/density`` (random: it draws from torch's global
generator in PEFT's order, so the same seed gives PEFT's result); TIES keeps, per entry, the sources
whose sign agrees with the majority sign (``"total"``: sign of the sum, ``"frequency"``: the more common
sign) and averages them.

The new adapter has ``r = lora_alpha =`` the new rank (scaling 1) and the union of the sources' targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from peftkit.methods.lora import Lora

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTOR_WISE, *SVD, "cat")


# ---------------------------------------------------------------------------------------- merging rules
def magnitude_mask(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density · n)`` entries of largest magnitude."""
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def prune(tensor: Tensor, density: float, random: bool) -> Tensor:
    if density >= 1:
        return tensor
    if random:  # DARE: drop at random, rescale to keep the expectation
        return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density
    return magnitude_mask(tensor, density)


def combine(kind: str, tensors: list[Tensor], weights: Tensor, density: float | None, sign_method: str) -> Tensor:
    """Merge same-shaped ``tensors`` with per-source ``weights`` by rule ``kind`` (without ``_svd``)."""
    if kind in ("linear", "svd"):
        stacked = torch.stack(tensors, dim=0)
    else:
        assert density is not None
        stacked = torch.stack([prune(t, density, random=kind.startswith("dare")) for t in tensors], dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


# ---------------------------------------------------------------------------------------- the entry point
def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add LoRA adapter ``adapter_name`` combined from ``adapters`` (see the module docstring for the rules).

    Args:
        adapters: names of existing LoRA adapters.
        weights: one weight per adapter (negative subtracts).
        combination_type: one of :data:`COMBINATIONS` (a single adapter is always combined ``linear``).
        svd_rank: rank of the result for the ``*svd`` types (default: the largest source rank).
        svd_clamp: for ``*svd``: clamp the factors to this quantile of their entries' distribution.
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd``.
        density: fraction of entries kept by the pruning types, in [0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES types).

    The new adapter is not activated (``set_adapter``), and is trainable like any added adapter.
    """
    sources = _check(model, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    configs = [source.config for source in sources]
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    kind = "linear" if len(sources) == 1 else combination_type
    if kind in FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type={kind!r} needs adapters of one rank; got {dict(zip(adapters, ranks, strict=True))}"
            )
        new_rank = ranks[0]
    else:
        new_rank = sum(ranks) if kind == "cat" else svd_rank or max(ranks)
    model.add_adapter(adapter_name, _combined_config(configs, new_rank))
    new = model.adapters[adapter_name]
    assert isinstance(new, Lora)
    with torch.no_grad():
        for path in new.parts:
            if path in new.token_paths or path in new.tied_lora:  # token rows start from the base; tied heads follow
                continue
            layer = model.get_base_model().get_submodule(path)
            present = [(s, w) for s, w in zip(sources, weights, strict=True) if path in s.parts]
            if not present:
                raise ValueError(f"no source adapter adapts {path}")
            target_a, target_b = _factors(new, layer)
            if kind == "cat":
                a, b = _cat(layer, present, target_a, target_b)
            elif kind in SVD:
                a, b = _svd(
                    layer,
                    present,
                    kind,
                    new_rank,
                    density,
                    majority_sign_method,
                    svd_clamp,
                    svd_full_matrices,
                    svd_driver,
                )
            else:
                a, b = _factor_wise(layer, present, kind, density, majority_sign_method)
            target_a.data, target_b.data = a.to(target_a.dtype), b.to(target_b.dtype)


def _check(model, adapters, weights, adapter_name, combination_type, density, sign_method) -> list[Lora]:
    if adapter_name in model.adapters:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name (PEFT returns silently here)")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    model._check_names(list(adapters))
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is not supported; use one of {list(COMBINATIONS)}")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={sign_method!r}; use 'total' or 'frequency'")
    prunes = combination_type not in ("linear", "svd", "cat") and len(adapters) > 1
    if prunes and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1], got {density!r}")
    sources = [model.adapters[name] for name in adapters]
    for name, source in zip(adapters, sources, strict=True):
        if not isinstance(source, Lora):
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is {type(source.config).__name__}")
        if source.config.use_dora:
            raise ValueError(f"adapter {name!r} uses DoRA: its magnitude vector cannot be combined")
        if source.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() first")
    kinds = {isinstance(s.config.target_modules, str) for s in sources}
    if len(kinds) > 1:
        raise ValueError("the adapters' target_modules mix lists and regex strings; PEFT cannot combine those either")
    return sources


def _combined_config(configs, new_rank: int):
    first = configs[0]
    if isinstance(first.target_modules, str):
        targets: list[str] | str = "|".join(f"({c.target_modules})" for c in configs)
    else:
        targets = sorted({t for c in configs for t in c.target_modules})
    init = True if first.init_lora_weights not in (True, False, "gaussian", "orthogonal") else first.init_lora_weights
    return first.model_copy(
        update={
            "r": new_rank,
            "lora_alpha": new_rank,
            "target_modules": targets,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": False,  # scaling 1: the combined factors already carry the sources' scalings
            "init_lora_weights": init,  # never redo a PiSSA / OLoRA split of the base weights
            "inference_mode": False,
        }
    )


def _factors(adapter: Lora, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of ``adapter`` on ``layer`` (an embedding's ``lora_embedding_A/B``)."""
    if isinstance(layer.base_layer, nn.Embedding):
        return adapter.part(layer, "lora_embedding_A"), adapter.part(layer, "lora_embedding_B")
    return adapter.part(layer, "lora_A").weight, adapter.part(layer, "lora_B").weight


def _cat(layer, present, target_a: Tensor, target_b: Tensor) -> tuple[Tensor, Tensor]:
    parts = [(_factors(s, layer), w * s.scaling[layer.path]) for s, w in present]
    a_cat = torch.cat([a.detach() * scale for (a, _), scale in parts], dim=0)
    b_cat = torch.cat([b.detach() for (_, b), _ in parts], dim=1)
    a, b = torch.zeros_like(target_a), torch.zeros_like(target_b)
    a[: a_cat.shape[0]] = a_cat  # sources missing from this layer leave zero rows
    b[:, : b_cat.shape[1]] = b_cat
    return a, b


def _factor_wise(layer, present, kind, density, sign_method) -> tuple[Tensor, Tensor]:
    scaled = [w * s.scaling[layer.path] for s, w in present]
    weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    factors = [_factors(s, layer) for s, _ in present]
    dtype = factors[0][0].dtype
    a = combine(kind, [f[0].detach() for f in factors], weights_a.to(factors[0][0].device), density, sign_method)
    b = combine(kind, [f[1].detach() for f in factors], weights_b.to(factors[0][1].device), density, sign_method)
    return a.to(dtype), b.to(dtype)


def _svd(layer, present, kind, rank, density, sign_method, clamp, full_matrices, driver) -> tuple[Tensor, Tensor]:
    base = layer.base_layer
    deltas = [_stored_update(s, layer) for s, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = combine(kind.removesuffix("_svd"), deltas, weights, density, sign_method)
    # As a matrix (out, in): an embedding's (num, dim) and a Conv1D's (in, out) transposed, a kernel flattened.
    delta = delta.t() if isinstance(base, nn.Embedding) or layer.transposed else delta.flatten(1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    if isinstance(base, nn.Conv1d | nn.Conv2d):  # back to conv kernels: A (r, in, *k), B (out, r, 1, ...)
        kernel = base.weight.shape[2:]
        vh = vh.reshape(rank, base.in_channels, *kernel)
        u = u.reshape(base.out_channels, rank, *(1,) * len(kernel))
    return vh, u


def _stored_update(source: Lora, layer) -> Tensor:
    """``s · B A`` laid out as the base weight is stored (PEFT prunes in this layout, so DARE's random draws
    land on the same entries)."""
    update = source.lora_weight(layer)
    return update.t() if layer.transposed else update
