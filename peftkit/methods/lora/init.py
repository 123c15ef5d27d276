"""LoRA initialisations that read the base weight (``init_lora_weights`` other than ``True`` / ``False`` /
``"gaussian"``), with PEFT 0.21's maths and random draws, so the same seed gives the same tensors.

- ``"pissa"`` ([PiSSA](https://arxiv.org/abs/2404.02948)): with ``W = U S Vᵀ``, ``A = √(S_r/s) V_rᵀ``,
  ``B = U_r √(S_r/s)``; the base weight becomes the residual ``W - s·BA``;
- ``"pissa_niter_K"``: the same from ``torch.svd_lowrank(W, r, niter=K)`` (randomised, fast);
- ``"olora"`` ([OLoRA](https://arxiv.org/abs/2406.01775)): with ``W = QR``, ``A = R[:r]``, ``B = Q[:, :r]``; the
  base weight becomes ``W - s·BA``;
- ``"orthogonal"``: ``A`` and ``B`` from two halves of the rows of a random orthogonal ``r × r`` matrix, ``/10``;
  the base weight is unchanged.

``s`` is the LoRA scaling. The first three move the top of the weight's spectrum into the adapter, so the
adapter starts *non-zero* and the base weight is changed: the adapted model still computes what the
original model computed. As in PEFT, loading such an adapter runs the same initialisation on the base model
it is loaded onto (which must be the original one), then reads ``A`` and ``B`` from the file.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Options that need something peftkit does not have, with the reason.
NEEDS_MORE = {
    "loftq": "LoftQ initialises from a quantised base model (bitsandbytes quantisation, loftq_config)",
    "eva": "EVA initialises from activations on calibration data (eva_config and a data loader)",
    "corda": "CorDA initialises from covariance statistics of calibration data (corda_config)",
}


def residual_init(init: str, weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, B, new weight)`` for PiSSA / OLoRA; ``weight`` is the dense ``(out, in)`` base weight."""
    dense = weight.detach().to(torch.float32)
    if init == "olora":
        q, upper = torch.linalg.qr(dense)
        a, b = upper[:r].contiguous(), q[:, :r].contiguous()
    elif init == "pissa":
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        root = torch.diag(torch.sqrt(s[:r] / scaling))
        a, b = root @ vh[:r], u[:, :r] @ root
    else:  # pissa_niter_K
        u, s, v = torch.svd_lowrank(dense, r, niter=int(init.split("_niter_")[1]))
        root = torch.diag(torch.sqrt(s / scaling))
        a, b = root @ v.t(), u @ root
    return a, b, dense - scaling * b @ a


def orthogonal_init(r: int, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """``(A, B)``: rows of one random orthogonal ``r × r`` matrix split between them, so ``BA`` starts small
    but both factors are well conditioned (https://datta0.github.io/posts/rethink-lora-init/)."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(in_features, r // 2).mm(q[0::2]).t() / 10.0
    b = torch.randn(r // 2, out_features).t().mm(q[1::2]) / 10.0
    return a.contiguous(), b.contiguous()


def is_residual(init: bool | str) -> bool:
    """True for the options that change the base weight."""
    return isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))
