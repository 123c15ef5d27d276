"""The weight-adapter methods of the conformance matrix: configs for peftkit and PEFT, and the
trainable-parameter formula of each, written out by hand for the tiny models of ``tests/conftest.py``.

Targets (2 decoder layers each):

| arch   | attention targets (in → out)        | IA³ targets                              |
|--------|-------------------------------------|------------------------------------------|
| llama  | q_proj 32→32, v_proj 32→16          | q_proj (out 32), down_proj (ff, in 64)   |
| qwen2  | q_proj 32→32, v_proj 32→8           | same                                     |
| gemma3 | q_proj 32→32, v_proj 32→16          | same                                     |
| gpt2   | c_attn 32→96 (Conv1D)               | c_attn (out 96), mlp.c_proj (ff, in 128) |

PEFT cannot wrap GPT-2's ``Conv1D`` with LoHa, LoKr, OFT or BOFT, so their interop cells on GPT-2
target its one ``nn.Linear``, ``lm_head`` (32→128), instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft

import peftkit

ATTENTION = {
    "llama": [(32, 32), (32, 16)],
    "qwen2": [(32, 32), (32, 8)],
    "gemma3": [(32, 32), (32, 16)],
    "gpt2": [(32, 96)],
}
LAYERS = 2
PEFT_CANNOT_WRAP_CONV1D = {"loha", "lokr", "oft", "boft"}


def attention_targets(arch: str) -> list[str]:
    return ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]


def per_layer(arch: str, formula: Callable[[int, int], int]) -> int:
    """Sum a per-target formula over the attention targets of both decoder layers."""
    return LAYERS * sum(formula(i, o) for i, o in ATTENTION[arch])


@dataclass
class Case:
    """One method of the matrix. ``build(lib, arch, targets)`` makes the config with a non-trivial init."""

    name: str
    build: Callable[[Any, str, list[str] | None], Any]
    count: Callable[[str], int]
    tol: float = 1e-5
    targets: Callable[[str], list[str]] = attention_targets
    extra: dict[str, Any] = field(default_factory=dict)

    def ours(self, arch: str, targets: list[str] | None = None) -> Any:
        return self.build(peftkit, arch, self.targets(arch) if targets is None else targets)

    def theirs(self, arch: str, targets: list[str] | None = None) -> Any:
        return self.build(peft, arch, self.targets(arch) if targets is None else targets)

    def interop_targets(self, arch: str) -> list[str]:
        if arch == "gpt2" and self.name in PEFT_CANNOT_WRAP_CONV1D:
            return ["lm_head"]
        return self.targets(arch)


def ia3_targets(arch: str) -> list[str]:
    return ["c_attn", "mlp.c_proj"] if arch == "gpt2" else ["q_proj", "down_proj"]


def ia3_config(lib: Any, arch: str, targets: list[str]) -> Any:
    feedforward = [t for t in targets if t in ("mlp.c_proj", "down_proj")]
    return lib.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)


def lokr_count(arch: str) -> int:
    # r = 4, decompose_both=False. in = m·n, out = l·k split near √dim; W1 (l, m) full; W2 (k, n) full
    # unless r < max(k, n)/2, then W2a (k, r) + W2b (r, n).
    # 32→32: W1 4×4 + W2 8×8 = 80.  32→16: 4×4 + 4×8 = 48.  32→8: 2×4 + 4×8 = 40.
    # 32→96 (out 8·12, in 4·8): W1 8×4 = 32; max(12, 8)/2 = 6 > 4 → W2a 12×4 + W2b 4×8 = 80 → 112.
    per_target = {(32, 32): 80, (32, 16): 48, (32, 8): 40, (32, 96): 112}
    return per_layer(arch, lambda i, o: per_target[(i, o)])


CASES = [
    Case(
        "lora",
        lambda lib, arch, t: lib.LoraConfig(r=4, target_modules=t, init_lora_weights=False),
        lambda arch: per_layer(arch, lambda i, o: 4 * (i + o)),
    ),
    Case(
        "dora",
        lambda lib, arch, t: lib.LoraConfig(r=4, target_modules=t, init_lora_weights=False, use_dora=True),
        lambda arch: per_layer(arch, lambda i, o: 4 * (i + o) + o),
    ),
    Case(
        "ia3",
        ia3_config,
        # q_proj / c_attn scale their output; down_proj / mlp.c_proj (feed-forward) scale their input.
        lambda arch: LAYERS * (96 + 128 if arch == "gpt2" else 32 + 64),
        targets=ia3_targets,
    ),
    Case(
        "adalora",
        lambda lib, arch, t: lib.AdaLoraConfig(
            init_r=6, target_r=4, total_step=10, target_modules=t, init_lora_weights=False
        ),
        lambda arch: per_layer(arch, lambda i, o: 6 * (i + o + 1)),
        tol=1e-4,
    ),
    Case(
        "loha",
        lambda lib, arch, t: lib.LoHaConfig(r=4, target_modules=t, init_weights=False),
        lambda arch: per_layer(arch, lambda i, o: 2 * 4 * (i + o)),
    ),
    Case("lokr", lambda lib, arch, t: lib.LoKrConfig(r=4, target_modules=t, init_weights=False), lokr_count),
    Case(
        "oft",
        lambda lib, arch, t: lib.OFTConfig(oft_block_size=8, target_modules=t, init_weights=False),
        lambda arch: per_layer(arch, lambda i, o: (i // 8) * (8 * 7 // 2)),
        tol=1e-4,
    ),
    Case(
        "boft",
        lambda lib, arch, t: lib.BOFTConfig(boft_block_size=8, target_modules=t, init_weights=False),
        lambda arch: per_layer(arch, lambda i, o: 1 * (i // 8) * 8 * 8 + o),
        tol=1e-4,
    ),
    Case(
        "vera",
        lambda lib, arch, t: lib.VeraConfig(r=8, target_modules=t, init_weights=False),
        lambda arch: per_layer(arch, lambda i, o: o + 8),
    ),
]
CASE_BY_NAME = {case.name: case for case in CASES}
