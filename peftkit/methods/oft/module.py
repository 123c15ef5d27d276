"""OFT on Linear / GPT-2 Conv1D layers (https://arxiv.org/abs/2306.07280).

::

    oft_R.weight (r, b(b-1)/2) ─► skew-symmetric Q_i (b × b) ─► Cayley R_i = (I - Q_i)(I + Q_i)^-1
    x (…, in) ─► split in r blocks of b ─► x_i R_i ─► base layer:  y = W (x R) + b

The Cayley transform is computed by its Neumann series ``I + 2Q + 2Q² + … + Q^(n-1)`` by default,
exactly as PEFT. Merging: ``W ← W Rᵀ`` (R block-diagonal); unmerging solves with ``R`` again.
File key (PEFT): ``<path>.oft_R.weight``. PEFT cannot wrap GPT-2's ``Conv1D`` with OFT; peftkit can.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, dense_weight, rows_view


class OFTRotation(nn.Module):
    """The rotation parameters of one layer: ``weight`` ``(blocks, b(b-1)/2)`` upper-triangle entries."""

    def __init__(self, blocks: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vector: Tensor) -> Tensor:
        """``(blocks, b, b)`` skew-symmetric matrices from their upper triangles."""
        matrix = vector.new_zeros(vector.shape[0], self.block_size, self.block_size)
        matrix[:, self.rows, self.cols] = vector
        return matrix - matrix.transpose(-2, -1)


def cayley(q: Tensor, neumann: bool, terms: int) -> Tensor:
    """``(n, b, b)`` orthogonal ``(I - Q)(I + Q)^-1``, or its Neumann series (PEFT's exact terms)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    result = eye.clone()
    if terms > 1:
        result = result + 2 * q
    if terms > 2:
        power = q @ q
        result = result + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            result = result + 2 * power
        result = result + power @ q
    return result


def adjusted_size(in_features: int, size: int) -> int:
    """The divisor of ``in_features`` nearest ``size`` (ties: the smaller), as PEFT adjusts OFT blocks."""
    if size >= in_features:
        return in_features
    higher = size
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = size
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if size - lower <= higher - size else higher


class OFT(WeightAdapter):
    """The OFT adapter."""

    config: OFTConfig
    bias_only = "oft_only"

    def __init__(self, config: OFTConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.blocks: dict[str, int] = {}

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        config = self.config
        in_features = dense_weight(module).shape[1]
        wanted = config.oft_block_size if config.r == 0 else config.r
        fitted = adjusted_size(in_features, wanted) if in_features % wanted else wanted
        if fitted != wanted:
            field = "oft_block_size" if config.r == 0 else "r"
            warnings.warn(
                f"OFT: {field}={wanted} does not divide {path}'s {in_features} inputs; using {fitted}", stacklevel=2
            )
        size = fitted if config.r == 0 else in_features // fitted
        blocks = in_features // size
        self.blocks[path] = blocks
        rotation = OFTRotation(1 if config.block_share else blocks, size)
        if not config.init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        return {"oft_R": rotation}

    # ------------------------------------------------------------------ maths
    def rotations(self, layer: AdaptedLayer) -> Tensor:
        """``(blocks, b, b)`` the orthogonal blocks of ``layer`` (block-shared ones repeated)."""
        module: OFTRotation = self.part(layer, "oft_R")
        if self.config.coft:
            with torch.no_grad():
                module.weight.copy_(self._project(module))
        q = module.skew(module.weight)
        rotation = cayley(q, self.config.use_cayley_neumann, self.config.num_cayley_neumann_terms)
        blocks = self.blocks[layer.path]
        if self.config.block_share:
            rotation = rotation.expand(blocks, -1, -1)
        if layer.training and self.config.module_dropout > 0 and blocks > 1:
            dropped = torch.randperm(blocks, device=rotation.device)[: int(self.config.module_dropout * blocks)]
            keep = torch.ones(blocks, 1, 1, device=rotation.device, dtype=rotation.dtype)
            keep[dropped] = 0
            rotation = keep * rotation + (1 - keep) * torch.eye(rotation.shape[-1], device=rotation.device)
        return rotation

    def _project(self, module: OFTRotation) -> Tensor:
        """COFT: shrink each block's generator onto the ball of radius ``eps / √blocks``."""
        q = module.skew(module.weight)
        eps = self.config.eps / q.shape[0] ** 0.5
        norm = torch.linalg.norm(q, dim=(1, 2), keepdim=True)
        q = torch.where(norm <= eps, q, eps * q / norm)
        return q[:, module.rows, module.cols]

    def transform_input(self, layer: AdaptedLayer, x: Tensor, rows: Tensor | None) -> Tensor:
        rotation = self.rotations(layer)
        blocks, size = rotation.shape[0], rotation.shape[-1]
        split = x.to(rotation.dtype).reshape(*x.shape[:-1], blocks, size)
        rotated = torch.einsum("...rk,rkc->...rc", split, rotation).reshape(x.shape).to(x.dtype)
        return rotated if rows is None else torch.where(rows_view(rows, x), rotated, x)

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        return y

    def block_matrix(self, layer: AdaptedLayer) -> Tensor:
        """``(in, in)`` block-diagonal rotation ``R``: the layer computes ``W (x R)``."""
        return torch.block_diag(*self.rotations(layer).float().unbind(0))

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        return {"weight": layer.stored_weight(layer.dense_weight().float() @ self.block_matrix(layer).t())}

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        merged = layer.dense_weight().float()
        return {"weight": layer.stored_weight(torch.linalg.solve(self.block_matrix(layer), merged.t()).t())}
