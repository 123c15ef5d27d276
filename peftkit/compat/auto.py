"""``AutoPeftModel...``: load an adapter folder together with the base model it names.

The base model is the config's ``base_model_name_or_path``: an embedded alias of peftkit
(``smollm2-135m-instruct``) or a local Hugging Face model folder, loaded with the task's transformers
Auto class. Hub downloads are not attempted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import transformers
from torch import nn

from peftkit.config import PeftConfig
from peftkit.models.peft_model import PeftModel
from peftkit.models.task_models import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


class _BaseAutoPeftModel:
    _target_class: ClassVar[Any] = None
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model the adapter names, then the adapter onto it (``kwargs`` go to the base loader)."""
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{pretrained_model_name_or_path}: adapter_config.json names no base_model_name_or_path")
        task_type = peft_config.task_type
        target_class = cls._target_class
        if target_class is None:
            if task_type is not None:
                raise ValueError(
                    "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                    "(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
                )
            target_class = transformers.AutoModel
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[str(task_type)]
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, "
                    f"but you have asked for: {cls._target_peft_class.__name__}"
                )
        base = _load_base(target_class, base_path, revision, **kwargs)
        return cls._target_peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


def _load_base(target_class: Any, name: str, revision: str | None, **kwargs: Any) -> nn.Module:
    from peftkit.models.loading import EMBEDDED_MODELS, load_base

    if name in EMBEDDED_MODELS and target_class is transformers.AutoModelForCausalLM:
        return load_base(name)[0]
    if revision is not None:
        kwargs["revision"] = revision
    return target_class.from_pretrained(name, local_files_only=True, **kwargs)


def _auto(name: str, target: Any, peft_class: type[PeftModel]) -> type[_BaseAutoPeftModel]:
    doc = f"PEFT's ``{name}``: ``from_pretrained(adapter_dir)`` loads the base model and the adapter."
    attrs = {"_target_class": target, "_target_peft_class": peft_class, "__doc__": doc, "__module__": __name__}
    return type(name, (_BaseAutoPeftModel,), attrs)


AutoPeftModel = _auto("AutoPeftModel", None, PeftModel)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", transformers.AutoModelForCausalLM, PeftModelForCausalLM)
AutoPeftModelForSeq2SeqLM = _auto(
    "AutoPeftModelForSeq2SeqLM", transformers.AutoModelForSeq2SeqLM, PeftModelForSeq2SeqLM
)
AutoPeftModelForSequenceClassification = _auto(
    "AutoPeftModelForSequenceClassification",
    transformers.AutoModelForSequenceClassification,
    PeftModelForSequenceClassification,
)
AutoPeftModelForTokenClassification = _auto(
    "AutoPeftModelForTokenClassification",
    transformers.AutoModelForTokenClassification,
    PeftModelForTokenClassification,
)
AutoPeftModelForQuestionAnswering = _auto(
    "AutoPeftModelForQuestionAnswering", transformers.AutoModelForQuestionAnswering, PeftModelForQuestionAnswering
)
AutoPeftModelForFeatureExtraction = _auto(
    "AutoPeftModelForFeatureExtraction", transformers.AutoModel, PeftModelForFeatureExtraction
)
