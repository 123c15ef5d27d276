"""Every public name of Hugging Face PEFT resolves in peftkit, with PEFT's signature where it makes sense.

Names of PEFT methods peftkit does not ship import fine; using one raises an error that names the
method and the methods peftkit ships (never a silent substitute).
"""

from __future__ import annotations

import inspect

import peft
import peft.utils
import pytest

import peftkit
import peftkit.utils
from peftkit.compat.unsupported import PLACEHOLDERS, UnsupportedMethodError

SHIPPED_CONFIGS = [
    "PromptTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "LoraConfig",
    "IA3Config",
    "AdaLoraConfig",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "BOFTConfig",
    "VeraConfig",
]


@pytest.mark.parametrize("name", sorted(peft.__all__))
def test_every_peft_name_exists(name):
    assert hasattr(peftkit, name), f"peftkit has no {name} (PEFT exports it)"


@pytest.mark.parametrize("enum_name", ["TaskType", "PeftType", "PromptTuningInit", "MultitaskPromptTuningInit"])
def test_enum_members_equal(enum_name):
    theirs = {m.name: m.value for m in getattr(peft, enum_name)}
    ours = {m.name: m.value for m in getattr(peftkit, enum_name)}
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_unshipped_names_raise_clearly(name):
    placeholder = getattr(peftkit, name)
    with pytest.raises(UnsupportedMethodError, match=rf"{name}: .* not implemented by peftkit.*LoraConfig"):
        placeholder(r=8) if inspect.isclass(placeholder) else placeholder(None)
    assert issubclass(UnsupportedMethodError, NotImplementedError)


def test_unshipped_peft_type_in_a_file_is_named():
    with pytest.raises(NotImplementedError, match="'XLORA' is a PEFT method that peftkit does not implement"):
        peftkit.PeftConfig.from_dict({"peft_type": "XLORA"})


def test_shipped_names_are_real():
    shipped = set(peft.__all__) - set(PLACEHOLDERS)
    assert not {n for n in shipped if getattr(peftkit, n) in PLACEHOLDERS.values()}
    for name in SHIPPED_CONFIGS:
        config_cls = getattr(peftkit, name)
        assert peftkit.PEFT_TYPE_TO_CONFIG_MAPPING[config_cls.model_fields["peft_type"].default] is config_cls


def parameters(obj, skip_var=True):
    """Parameter names in order (``*args`` / ``**kwargs`` left out)."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(obj).parameters.values() if not (skip_var and p.kind in kinds)]


FUNCTIONS = [
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "cast_mixed_precision_params",
    "load_peft_weights",
    "get_peft_config",
    "shift_tokens_right",
    "get_layer_status",
    "get_model_status",
]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_signatures_start_as_peft(name):
    """PEFT's parameters, in PEFT's order (peftkit may accept more keyword arguments after them)."""
    theirs = parameters(getattr(peft, name))
    assert parameters(getattr(peftkit, name))[: len(theirs)] == theirs


METHODS = [
    "__init__",
    "from_pretrained",
    "save_pretrained",
    "load_adapter",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "set_requires_grad",
    "get_layer_status",
    "get_model_status",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "prepare_model_for_gradient_checkpointing",
    "get_base_model",
    "disable_adapter",
    "create_or_update_model_card",
]


@pytest.mark.parametrize("name", METHODS)
def test_peft_model_method_signatures(name):
    theirs = parameters(getattr(peft.PeftModel, name))
    assert parameters(getattr(peftkit.PeftModel, name))[: len(theirs)] == theirs


PROPERTIES = ["active_adapter", "active_adapters", "active_peft_config", "modules_to_save", "base_model_torch_dtype"]


@pytest.mark.parametrize("name", [*PROPERTIES, "targeted_module_names"])
def test_peft_model_attributes_exist(name):
    assert hasattr(peftkit.PeftModel, name) or name == "targeted_module_names"
    if name == "targeted_module_names":  # PEFT: an attribute of the tuner model, reached through PeftModel
        assert isinstance(peftkit.PeftModel.targeted_module_names, property)


@pytest.mark.parametrize(
    "name",
    [
        "PeftMixedModel",
        "AutoPeftModelForCausalLM",
        "LoraModel",
        *[
            f"PeftModelFor{t}"
            for t in (
                "SequenceClassification",
                "TokenClassification",
                "QuestionAnswering",
                "FeatureExtraction",
                "Seq2SeqLM",
                "CausalLM",
            )
        ],
    ],
)
def test_class_constructors(name):
    target = "from_pretrained" if name.startswith("Auto") else "__init__"
    theirs = parameters(getattr(getattr(peft, name), target))
    assert parameters(getattr(getattr(peftkit, name), target))[: len(theirs)] == theirs


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_config_methods(name):
    for method in ("from_pretrained", "save_pretrained", "from_json_file", "to_dict", "from_peft_type"):
        theirs = parameters(getattr(getattr(peft, name), method))
        assert parameters(getattr(getattr(peftkit, name), method))[: len(theirs)] == theirs, method


@pytest.mark.parametrize(
    "name",
    ["get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights", "prepare_model_for_kbit_training"],
)
def test_utils_module(name):
    assert name in peft.utils.__all__ and hasattr(peftkit.utils, name)


def test_soft_prompts_refuse_other_tasks_clearly():
    with pytest.raises(ValueError, match="not supported for soft prompts"):
        peftkit.PromptTuningConfig(task_type="SEQ_CLS")
    from tests.interop.scripts import llama_seq_cls

    with pytest.raises(ValueError, match="needs a causal LM .* LlamaForSequenceClassification"):
        peftkit.get_peft_model(llama_seq_cls(), peftkit.PromptTuningConfig(task_type=None))


def test_pickle_refused_with_reason(tmp_path):
    from tests.interop.scripts import lora_llama

    with pytest.raises(ValueError, match="safe_serialization=False would write a pickle"):
        lora_llama(peftkit).save_pretrained(tmp_path, safe_serialization=False)


@pytest.mark.parametrize(
    "options", [{"low_cpu_mem_usage": True}, {"autocast_adapter_dtype": False}, {"mixed": True}], ids=str
)
def test_unsupported_peft_options_are_refused_not_ignored(options):
    from tests.conftest import tiny_model

    with pytest.raises(NotImplementedError):
        peftkit.get_peft_model(tiny_model("llama"), peftkit.LoraConfig(target_modules=["q_proj"]), **options)
