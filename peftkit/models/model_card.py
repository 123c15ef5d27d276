"""The model card (``README.md``) that ``save_pretrained`` writes beside the adapter, as PEFT does.

The card's metadata is what the Hugging Face Hub reads to list and load an adapter: ``library_name:
peft`` (the files are PEFT's format, so PEFT and the Hub's loaders open them), the tags PEFT sets
(``transformers``, ``lora``, ``base_model:adapter:<name>``), ``pipeline_tag: text-generation`` for a
causal LM, and ``base_model`` when the base model has a name. An existing card is updated, not replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

FRAMEWORK_HEADING = "### Framework versions"


def write_model_card(peft_model: PeftModel, output_dir: str | Path) -> Path:
    """Create or update ``output_dir/README.md`` for ``peft_model``'s adapters."""
    from transformers import PreTrainedModel

    import peftkit

    path = Path(output_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    base = peft_model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    if isinstance(base, PreTrainedModel) and peft_model.base_model is not base:
        tags.add("transformers")
    if peft_model.peft_config and str(peft_model.active_peft_config.peft_type) == "LORA":
        tags.add("lora")
    name = getattr(base, "name_or_path", None)
    if name is not None:
        tags.add(f"base_model:adapter:{name}")
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and peft_model.is_causal_lm:
        card.data.pipeline_tag = "text-generation"
    config = getattr(base, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    if "_name_or_path" in config_dict:
        card.data["base_model"] = config_dict["_name_or_path"]
    lines = card.text.splitlines()
    version = f"- peftkit {peftkit.__version__}"
    if version not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, version)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{version}")
    card.text = "\n".join(lines)
    card.save(path)
    return path
