"""Runtime hints applied to a loaded model: the attention kernel (with an honest fallback)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

FALLBACK_KERNEL = "sdpa"


def kernel_problem(name: str) -> str | None:
    """Why attention kernel ``name`` cannot run here, or ``None`` when it can."""
    import transformers.utils as tu

    if name in ("eager", "sdpa"):
        return None
    if name == "flex_attention":
        return None if tu.is_torch_flex_attn_available() else "needs torch's flex attention"
    needs = {"flash_attention_2": tu.is_flash_attn_2_available, "flash_attention_3": tu.is_flash_attn_3_available}
    if name in needs:
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        return None if needs[name]() else f"needs the {'flash-attn' if name.endswith('2') else 'flash-attn 3'} package"
    return f"unknown kernel {name!r}"


def apply_attention_kernel(model: Any, name: str | None) -> tuple[str, str | None]:
    """Switch ``model`` (a transformers model) to kernel ``name``; returns ``(kernel used, warning)``.

    An unavailable kernel falls back to ``sdpa`` with a warning naming both.
    """
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if name is None:
        return current, None
    problem = kernel_problem(name)
    used, message = name, None
    if problem is not None:
        used = FALLBACK_KERNEL
        message = f"attention_kernel {name} is not available here ({problem}); falling back to {used}"
        warnings.warn(message, UserWarning, stacklevel=2)
    if used != current:
        model.set_attn_implementation(used)
    return used, message
