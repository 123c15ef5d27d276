"""PEFT's task classes: ``PeftModelForCausalLM``, ``PeftModelForSequenceClassification``, ...

Each is a :class:`~peftkit.PeftModel`; what differs is only the heads a weight adapter saves whole
(``modules_to_save``). ``get_peft_model`` and ``PeftModel.from_pretrained`` pick the class from the
config's ``task_type`` through :data:`MODEL_TYPE_TO_PEFT_MODEL_MAPPING`, as PEFT does.
"""

from __future__ import annotations

from peftkit.config import TaskType
from peftkit.models.peft_model import PeftModel
from peftkit.models.tasks import TASK_HEADS


class PeftModelForCausalLM(PeftModel):
    """A causal LM with adapters (soft prompts and weight adapters)."""


class PeftModelForSequenceClassification(PeftModel):
    """A sequence classifier with weight adapters; its ``classifier`` / ``score`` head is saved whole."""

    default_modules_to_save = TASK_HEADS[TaskType.SEQ_CLS.value]


class PeftModelForTokenClassification(PeftModel):
    """A token classifier with weight adapters; its ``classifier`` / ``score`` head is saved whole."""

    default_modules_to_save = TASK_HEADS[TaskType.TOKEN_CLS.value]


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive QA model with weight adapters; its ``qa_outputs`` head is saved whole."""

    default_modules_to_save = TASK_HEADS[TaskType.QUESTION_ANS.value]


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder / hidden-state model with weight adapters."""


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder with weight adapters (its own ``forward`` and ``generate``)."""


#: ``task_type`` → the PeftModel class PEFT builds for it.
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
