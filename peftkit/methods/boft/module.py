"""BOFT on Linear / GPT-2 Conv1D layers (https://arxiv.org/abs/2311.06243).

::

    boft_R (F, D, b, b) ─► Cayley per block: R_fd = (I - S)(I + S)^-1, S = (A - Aᵀ)/2
    B_f = P_f · blockdiag(R_f1 … R_fD) · P_fᵀ        (P_f: the f-th butterfly permutation)
    M   = B_{F-1} ⋯ B_1 B_0                        (in × in, orthogonal)
    y   = s ⊙ (W (x M)) + b                        boft_s (out, 1)

Merging: ``W ← s ⊙ (W Mᵀ)``; unmerging: ``W ← (W / s) M`` (``M`` is orthogonal).
File keys (PEFT): ``<path>.boft_R (F, D, b, b)``, ``<path>.boft_s (out, 1)``. PEFT cannot wrap GPT-2's
``Conv1D`` with BOFT; peftkit can.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peftkit.methods.boft.config import BOFTConfig
from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, dense_weight, rows_view


def butterfly_permutation(n: int, blocks: int, half: int, factors: int) -> Tensor:
    """``(n,)`` indices of the block butterfly permutation (PEFT's ``block_butterfly_perm``)."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError(f"BOFT: {blocks} blocks of {2 * half} do not fit {n} features")
    size = n // blocks
    step = size / half
    order = torch.empty(size, dtype=torch.long)
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(sequence):
        order[int(i * half) : int(i * half + half)] = torch.arange(size)[int(pos * half) : int(pos * half + half)]
    indices = torch.arange(n)
    for start in range(0, n, size):
        indices[start : start + size] = indices[start : start + size][order]
    return indices


def geometry(in_features: int, config: BOFTConfig, path: str) -> tuple[int, int]:
    """``(block_size, block_num)`` for a layer, validated as PEFT does (errors name the layer)."""
    extra = config.boft_n_butterfly_factor - 1
    if config.boft_block_num:
        num = config.boft_block_num
        if in_features % num:
            raise ValueError(f"BOFT: {path} has {in_features} inputs, not divisible by boft_block_num={num}")
        if extra and (extra > int(math.log2(num)) or num % (2**extra)):
            raise ValueError(
                f"BOFT: boft_n_butterfly_factor={extra + 1} does not fit boft_block_num={num} "
                "(it needs a multiple of 2^(factor-1) blocks)"
            )
        size = in_features // num
    else:
        size = config.boft_block_size
        if in_features % size:
            raise ValueError(f"BOFT: {path} has {in_features} inputs, not divisible by boft_block_size={size}")
        if extra and in_features % (size * 2**extra):
            raise ValueError(
                f"BOFT: boft_n_butterfly_factor={extra + 1} with boft_block_size={size} does not fit "
                f"{path}'s {in_features} inputs (they must be a multiple of size · 2^(factor-1))"
            )
        num = in_features // size
    if extra and (num % 2 or size % 2):
        raise ValueError(f"BOFT: butterfly factors need an even block size and count, got {size} and {num} at {path}")
    return size, num


class BOFT(WeightAdapter):
    """The BOFT adapter."""

    config: BOFTConfig
    bias_only = "boft_only"

    def __init__(self, config: BOFTConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.permutations: dict[str, Tensor] = {}

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        out_features, in_features = dense_weight(module).shape
        size, num = geometry(in_features, self.config, path)
        factors = self.config.boft_n_butterfly_factor
        self.permutations[path] = torch.stack(
            [butterfly_permutation(in_features, num // 2**i, size // 2, factors - 1) for i in range(factors)]
        )
        rotation = nn.Parameter(torch.zeros(factors, num, size, size))
        scale = nn.Parameter(torch.ones(out_features, 1))
        if not self.config.init_weights:
            nn.init.normal_(rotation, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        return {"boft_R": rotation, "boft_s": scale}

    # ------------------------------------------------------------------ maths
    def rotation(self, layer: AdaptedLayer) -> Tensor:
        """``(in, in)`` the butterfly rotation ``M``: the layer computes ``W (x M)``."""
        params = self.part(layer, "boft_R")
        factors, num, size, _ = params.shape
        a = params.reshape(factors * num, size, size)
        skew = 0.5 * (a - a.transpose(1, 2))
        eye = torch.eye(size, device=a.device, dtype=a.dtype).expand_as(skew)
        blocks = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(factors, num, size, size)
        if layer.training and self.config.boft_dropout > 0:
            blocks = self._dropout(blocks)
        permutation = self.permutations[layer.path].to(a.device)
        matrix = None
        for f in range(factors):
            diagonal = torch.block_diag(*blocks[f].unbind(0))
            # P · D · Pᵀ with P[i, perm[i]] = 1 is D[perm][:, perm]
            index = permutation[f]
            factor = diagonal[index][:, index]
            matrix = factor if matrix is None else factor @ matrix
        return matrix

    def _dropout(self, blocks: Tensor) -> Tensor:
        """Replace a fraction of the blocks of one random factor by the identity (PEFT's BOFT dropout)."""
        factors, num, size, _ = blocks.shape
        chosen = int(torch.randint(0, factors, (1,)).item())
        dropped = torch.randperm(num, device=blocks.device)[: int(self.config.boft_dropout * num)]
        mask = torch.zeros(factors, num, 1, 1, device=blocks.device, dtype=blocks.dtype)
        mask[chosen, dropped] = 1
        return (1 - mask) * blocks + mask * torch.eye(size, device=blocks.device, dtype=blocks.dtype)

    def transform_input(self, layer: AdaptedLayer, x: Tensor, rows: Tensor | None) -> Tensor:
        matrix = self.rotation(layer)
        rotated = (x.to(matrix.dtype) @ matrix).to(x.dtype)
        return rotated if rows is None else torch.where(rows_view(rows, x), rotated, x)

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        bias = getattr(layer.base_layer, "bias", None)
        scale = self.part(layer, "boft_s").squeeze(-1)
        scaled = (y - bias) * scale + bias if bias is not None else y * scale
        scaled = scaled.to(y.dtype)
        return scaled if rows is None else torch.where(rows_view(rows, y), scaled, y)

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        weight = layer.dense_weight().float() @ self.rotation(layer).float().t()
        return {"weight": layer.stored_weight(weight * self.part(layer, "boft_s").float())}

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        weight = (layer.dense_weight().float() / self.part(layer, "boft_s").float()) @ self.rotation(layer).float()
        return {"weight": layer.stored_weight(weight)}

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        factors = self.config.boft_n_butterfly_factor
        for key, value in state_dict.items():
            if key.endswith(".boft_R") and factors > 1 and value.shape[0] == 1:
                raise ValueError(
                    f"{key!r} holds 1 butterfly factor but boft_n_butterfly_factor={factors}: PEFT on a machine "
                    "without its CUDA extension silently trains with 1 factor. Set boft_n_butterfly_factor=1 in "
                    "adapter_config.json to load this file as it was trained"
                )
        super().load_adapter_state_dict(state_dict, trainable=trainable)
