"""User-level scripts written once against the PEFT API and run with ``lib`` = ``peft`` or ``peftkit``.

Each script takes the library module and returns plain values (tensors, lists, dicts) that the
conformance tests compare between the two libraries. Models are tiny and random, built from
transformers config classes; adapter weights are filled deterministically per file key
(:func:`fill_adapter`), so both libraries compute with the same numbers whenever their adapter
state dicts have the same keys and shapes.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from tests.conftest import tiny_model

IDS = torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 11, 12]])
MASK = torch.ones_like(IDS)


def quiet() -> warnings.catch_warnings:
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore")
    return context


def fill_adapter(lib: Any, model: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Give every adapter tensor values seeded by its file key (identical in both libraries)."""
    state = lib.get_peft_model_state_dict(model, adapter_name=adapter_name)
    filled = {}
    for key, value in state.items():
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        filled[key] = (torch.randn(value.shape, generator=generator) * 0.1).to(value.dtype)
    lib.set_peft_model_state_dict(model, filled, adapter_name=adapter_name)
    return filled


def llama_seq_cls() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def bert(cls: type = BertModel, **extra: Any) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **extra
    )
    return cls(config).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))


def lora_llama(lib: Any, **extra: Any) -> Any:
    config = lib.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], **extra)
    model = lib.get_peft_model(tiny_model("llama"), config)
    fill_adapter(lib, model)
    return model


# ------------------------------------------------------------------------------------ PeftModel API
def base_model_layout(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    return {
        "base_model.model": type(model.base_model.model).__name__,
        "base_model": type(model.base_model).__name__,
        "get_base_model": type(model.get_base_model()).__name__,
        "is_same": model.base_model.model is model.get_base_model(),
        "keys": sorted(model.state_dict()),
        "logits": model(input_ids=IDS, attention_mask=MASK).logits,
        "base_model_logits": model.base_model(input_ids=IDS, attention_mask=MASK).logits,
    }


def status(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    model.add_adapter("other", lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.set_requires_grad("other", False)  # PEFT freezes an added, inactive adapter; peftkit does not
    model.merge_adapter()
    model_status = dataclasses.asdict(model.get_model_status())
    layers = [dataclasses.asdict(s) for s in model.get_layer_status()]
    for layer in layers:
        layer.pop("module_type")  # the wrapper class's name (documented difference)
    return {"model": model_status, "layers": layers, "function": dataclasses.asdict(lib.get_model_status(model))}


def requires_grad(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.set_requires_grad("b", True)
    model.set_requires_grad(["default"], False)
    return {
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "status": model.get_model_status().requires_grad,
    }


def targeted_modules(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    return {"targeted": model.targeted_module_names, "on_base_model": model.base_model.targeted_module_names}


def gradient_checkpointing(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    base = model.get_base_model()
    before = base.get_input_embeddings()(IDS).requires_grad
    model.prepare_model_for_gradient_checkpointing(base)
    return {"before": before, "after": base.get_input_embeddings()(IDS).requires_grad}


def generate_scores(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    out = model.generate(
        input_ids=IDS,
        attention_mask=MASK,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    return {"type": type(out).__name__, "sequences": out.sequences, "scores": torch.stack(out.scores)}


def delete_active_adapter(lib: Any) -> dict[str, Any]:
    context = quiet()
    model = lora_llama(lib)
    model.add_adapter("a", lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["v_proj"]))
    model.set_adapter("b")
    model.delete_adapter("b")
    first = model.active_adapter
    model.delete_adapter(first)
    context.__exit__(None, None, None)
    return {"after_b": first, "after_first": model.active_adapter, "left": sorted(model.peft_config)}


def delete_active_prompt(lib: Any) -> dict[str, Any]:
    context = quiet()
    model = lib.get_peft_model(
        tiny_model("llama"), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), adapter_name="z"
    )
    model.add_adapter("a", lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.delete_adapter("z")
    context.__exit__(None, None, None)
    return {"active": model.active_adapter, "left": sorted(model.peft_config)}


def from_pretrained_keeps_config(lib: Any, folder: Path) -> dict[str, Any]:
    lora_llama(lib).save_pretrained(folder)
    config = lib.LoraConfig.from_pretrained(folder)
    model = lib.PeftModel.from_pretrained(tiny_model("llama"), folder, config=config)
    return {
        "same_object": model.peft_config["default"] is config,
        "inference_mode": config.inference_mode,
        "class": type(model).__name__,
        "logits": model(input_ids=IDS, attention_mask=MASK).logits,
    }


def model_card(lib: Any, folder: Path) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    lora_llama(lib).save_pretrained(folder)
    card = ModelCard.load(folder / "README.md").data.to_dict()
    return {key: card.get(key) for key in ("library_name", "tags", "pipeline_tag", "base_model")}


def prefix_position_ids(lib: Any) -> dict[str, Any]:
    config = lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = lib.get_peft_model(tiny_model("llama"), config)
    fill_adapter(lib, model)
    positions = torch.arange(IDS.shape[1]).expand_as(IDS)
    return {
        "default": model(input_ids=IDS, attention_mask=MASK, position_ids=positions).logits,
        "shifted": model(input_ids=IDS, attention_mask=MASK, position_ids=positions + 2).logits,
    }


# ------------------------------------------------------------------------------------ task types
def seq_cls(lib: Any) -> dict[str, Any]:
    config = lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])
    model = lib.get_peft_model(llama_seq_cls(), config)
    weights = fill_adapter(lib, model)
    labels = torch.tensor([0, 2])
    out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
    return {
        "class": type(model).__name__,
        "same_object": model.peft_config["default"] is config,
        "modules_to_save": config.modules_to_save,
        "keys": sorted(weights),
        "trainable": model.get_nb_trainable_parameters(),
        "logits": out.logits,
        "loss": out.loss,
    }


def token_cls(lib: Any) -> dict[str, Any]:
    config = lib.LoraConfig(task_type="TOKEN_CLS", r=4, target_modules=["query", "value"])
    model = lib.get_peft_model(bert(BertForTokenClassification, num_labels=5), config)
    weights = fill_adapter(lib, model)
    return {
        "class": type(model).__name__,
        "modules_to_save": config.modules_to_save,
        "keys": sorted(weights),
        "logits": model(input_ids=IDS, attention_mask=MASK).logits,
    }


def question_answering(lib: Any) -> dict[str, Any]:
    config = lib.LoraConfig(task_type="QUESTION_ANS", r=4, target_modules=["query", "value"])
    model = lib.get_peft_model(bert(BertForQuestionAnswering), config)
    weights = fill_adapter(lib, model)
    out = model(input_ids=IDS, attention_mask=MASK)
    return {
        "class": type(model).__name__,
        "modules_to_save": config.modules_to_save,
        "keys": sorted(weights),
        "start": out.start_logits,
        "end": out.end_logits,
    }


def feature_extraction(lib: Any) -> dict[str, Any]:
    config = lib.LoraConfig(task_type="FEATURE_EXTRACTION", r=4, target_modules=["query", "value"])
    model = lib.get_peft_model(bert(), config)
    weights = fill_adapter(lib, model)
    return {
        "class": type(model).__name__,
        "keys": sorted(weights),
        "hidden": model(input_ids=IDS, attention_mask=MASK).last_hidden_state,
    }


def plain_mlp(lib: Any) -> dict[str, Any]:
    config = lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"])
    model = lib.get_peft_model(mlp(), config)
    weights = fill_adapter(lib, model)
    adapted = model(X)
    with model.disable_adapter():
        base = model(X)
    merged = model.merge_and_unload()(X)
    return {
        "class": type(model).__name__,
        "task_type": config.task_type,
        "keys": sorted(weights),
        "adapted": adapted,
        "base": base,
        "merged": merged,
    }


def inject_into_mlp(lib: Any) -> dict[str, Any]:
    model = mlp()
    returned = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False), model)
    names = sorted(n for n, _ in model.named_parameters() if "lora" in n)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator))
    return {"same_object": returned is model, "names": names, "out": model(X)}


# ------------------------------------------------------------------------------------ configs, helpers
def config_dataclass(lib: Any) -> dict[str, Any]:
    config = lib.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])
    replaced = dataclasses.replace(config, r=16, lora_alpha=32)
    shared = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora", "use_rslora", "peft_type")
    as_dict = dataclasses.asdict(replaced)
    names = {f.name for f in dataclasses.fields(config)}
    return {
        "type": type(replaced).__name__,
        "is_dataclass": dataclasses.is_dataclass(config),
        "values": {k: str(getattr(as_dict[k], "value", as_dict[k])) for k in shared if k != "target_modules"},
        "target_modules": sorted(as_dict["target_modules"]),  # PEFT turns the list into a set
        "has_fields": sorted(names & set(shared)),
        "original_r": config.r,
    }


def state_dict_helpers(lib: Any) -> dict[str, Any]:
    model = lora_llama(lib)
    adapter = lib.get_peft_model_state_dict(model)
    base = lib.get_base_model_state_dict(model)
    lib.set_base_model_state_dict(model, {k: v + 0.01 for k, v in base.items()})
    return {
        "adapter": adapter,
        "base_keys": sorted(base),
        "base_q": base["model.layers.0.self_attn.q_proj.weight"],
        "logits_after_set_base": model(input_ids=IDS, attention_mask=MASK).logits,
    }


def load_weights(lib: Any, folder: Path) -> dict[str, Any]:
    lora_llama(lib).save_pretrained(folder)
    return {"weights": lib.load_peft_weights(str(folder), device="cpu")}


def get_peft_config(lib: Any) -> dict[str, Any]:
    config = lib.get_peft_config({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 3, "target_modules": ["q_proj"]})
    return {"type": type(config).__name__, "r": config.r}


def kbit_preparation(lib: Any) -> dict[str, Any]:
    model = tiny_model("llama").to(torch.bfloat16)
    returned = lib.prepare_model_for_kbit_training(model)
    return {
        "same_object": returned is model,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "trainable": sum(p.requires_grad for p in model.parameters()),
        "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
    }


def auto_model(lib: Any, folder: Path) -> dict[str, Any]:
    base_dir = folder / "base"
    tiny_model("llama").save_pretrained(base_dir)
    base = type(tiny_model("llama")).from_pretrained(base_dir)
    model = lib.get_peft_model(base, lib.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    fill_adapter(lib, model)
    model.save_pretrained(folder / "adapter")
    loaded = lib.AutoPeftModelForCausalLM.from_pretrained(folder / "adapter")
    return {
        "class": type(loaded).__name__,
        "base_name": loaded.peft_config["default"].base_model_name_or_path == str(base_dir),
        "logits": loaded(input_ids=IDS, attention_mask=MASK).logits,
    }


def task_from_pretrained(lib: Any, folder: Path) -> dict[str, Any]:
    seq_model = lib.get_peft_model(llama_seq_cls(), lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    fill_adapter(lib, seq_model)
    seq_model.save_pretrained(folder)
    loaded = lib.PeftModel.from_pretrained(llama_seq_cls(), folder)
    return {"class": type(loaded).__name__, "logits": loaded(input_ids=IDS, attention_mask=MASK).logits}


def no_matching_module(lib: Any) -> dict[str, Any]:
    try:
        lib.get_peft_model(tiny_model("llama"), lib.LoraConfig(task_type="CAUSAL_LM", target_modules=["nope"]))
    except lib.NoMatchingPeftModuleError as error:
        return {"error": type(error).__name__, "value_error": isinstance(error, ValueError)}
    return {"error": None}


def adalora_seq_cls_loss(lib: Any) -> dict[str, Any]:
    """AdaLoRA's orthogonal penalty joins the loss of a non-LM task model too."""
    config = lib.AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    model = lib.get_peft_model(llama_seq_cls(), config)
    fill_adapter(lib, model)
    model.train()
    out = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 2]))
    return {"loss": out.loss, "logits": out.logits}


def status_of_soft_prompt(lib: Any) -> dict[str, Any]:
    model = lib.get_peft_model(tiny_model("llama"), lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    errors = {}
    for name in ("get_model_status", "get_layer_status"):
        try:
            getattr(model, name)()
        except Exception as error:  # the error class is what is compared
            errors[name] = type(error).__name__
    return errors


def tuner_model_directly(lib: Any) -> dict[str, Any]:
    """PEFT's low-level route: ``LoraModel(model, config, name)`` places the adapter in ``model``."""
    model = tiny_model("llama")
    config = lib.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights=False)
    tuner = lib.LoraModel(model, config, "default")
    names = sorted(n for n, _ in tuner.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for name, param in tuner.named_parameters():
            if "lora_" in name:
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return {
        "wraps": tuner.model is model,
        "names": names,
        "targeted": tuner.targeted_module_names,
        "logits": tuner(input_ids=IDS, attention_mask=MASK).logits,
    }
