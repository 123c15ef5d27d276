"""Task types: which forward a model gets, and the heads a task saves whole (PEFT's task classes).

- A generating decoder-only model (a transformers ``...ForCausalLM``) takes peftkit's causal-LM path:
  soft prompts, logits aligned with the user's tokens, the label loss.
- Any other model (``...ForSequenceClassification``, ``BertForTokenClassification``, an encoder-decoder,
  a plain MLP) runs its own forward, with the weight adapters inside its layers. Soft prompts are
  refused there with an error that says why.
- ``SEQ_CLS`` / ``TOKEN_CLS`` save the ``classifier`` / ``score`` head whole and ``QUESTION_ANS`` the
  ``qa_outputs`` head (``modules_to_save``), as PEFT's ``PeftModelFor...`` classes do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from peftkit.config import PeftConfig, TaskType

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

#: ``task_type`` → the head names PEFT adds to ``modules_to_save`` for it.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    TaskType.SEQ_CLS.value: ("classifier", "score"),
    TaskType.TOKEN_CLS.value: ("classifier", "score"),
    TaskType.QUESTION_ANS.value: ("qa_outputs",),
}


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers decoder-only model that generates text (has a vocabulary head and ``generate``)."""
    from transformers import GenerationMixin

    config = getattr(model, "config", None)
    return (
        isinstance(model, GenerationMixin)
        and not getattr(config, "is_encoder_decoder", False)
        and callable(getattr(model, "get_input_embeddings", None))
    )


def prepare_task_config(peft_model: PeftModel, model: nn.Module, config: PeftConfig) -> PeftConfig:
    """Check ``config`` against the model and the task; return the config the adapter is built from.

    Updates ``config`` in place as PEFT does: the task's head names join ``modules_to_save`` (once: PEFT
    appends them again on every load), and a
    ``task_type`` left at its default on a model that is not a causal LM becomes ``None`` (PEFT's
    default, so the saved file loads in PEFT as a plain ``PeftModel``). The returned copy leaves out
    head names that match no module of this model (PEFT lists both ``classifier`` and ``score`` and
    saves whichever exists).
    """
    causal = is_causal_lm(model)
    if config.is_prompt_learning:
        if not causal:
            raise ValueError(
                f"{type(config).__name__} needs a causal LM (a transformers ...ForCausalLM model), got "
                f"{type(model).__name__}: peftkit's soft prompts adapt causal LMs only; weight adapters "
                "(LoRA, IA3, ...) work on any model"
            )
        return config
    if not causal and "task_type" not in config.model_fields_set:
        config.__dict__["task_type"] = None
    heads = type(peft_model).default_modules_to_save
    if not heads or "modules_to_save" not in type(config).model_fields:
        return config
    given = list(config.modules_to_save or [])
    if config.modules_to_save is None or any(h not in given for h in heads):
        config.modules_to_save = [*given, *[h for h in heads if h not in given]]
    kept = [m for m in config.modules_to_save if m not in heads or _has_module(model, m)]
    return config.model_copy(update={"modules_to_save": kept or None})


def keep_given_config(given: PeftConfig, resolved: PeftConfig) -> None:
    """Copy the values the adapter resolved (defaults that depend on the model) into the user's object.

    ``modules_to_save`` keeps the given list (PEFT's layout, see :func:`prepare_task_config`).
    """
    if resolved is given:
        return
    for name in type(given).model_fields:
        if name != "modules_to_save":
            given.__dict__[name] = resolved.__dict__[name]


def _has_module(model: nn.Module, name: str) -> bool:
    return any(path == name or path.endswith(f".{name}") for path, _ in model.named_modules())
