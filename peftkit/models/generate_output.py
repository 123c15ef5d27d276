"""``generate(return_dict_in_generate=True, output_scores=True)``: transformers' output object.

peftkit's decoder (:mod:`peftkit.models.generation`) returns the token ids. The scores of each step are
the next-token scores after every logits processor (temperature, top-k, a grammar, ...), exactly what
transformers puts in ``GenerateDecoderOnlyOutput.scores``; a last processor records them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor
from transformers.generation.utils import GenerateDecoderOnlyOutput

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel


class _ScoreRecorder:
    """A logits processor that keeps each step's scores ``(B, V)`` and changes nothing."""

    def __init__(self) -> None:
        self.scores: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.scores.append(scores.clone())
        return scores


def generate_with_output(
    model: PeftModel, generate: Callable[..., Tensor], *args: Any, **kwargs: Any
) -> GenerateDecoderOnlyOutput | Tensor:
    """Run ``generate`` and wrap its ids (and, with ``output_scores``, the scores) like transformers."""
    return_dict = bool(kwargs.pop("return_dict_in_generate", False))
    output_scores = bool(kwargs.pop("output_scores", False))
    recorder = _ScoreRecorder()
    if output_scores:
        kwargs["logits_processor"] = [*(kwargs.get("logits_processor") or []), recorder]
    sequences = generate(model, *args, **kwargs)
    if not return_dict:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(recorder.scores) if output_scores else None)
