"""Adaptation methods, one package each: ``config.py`` + ``module.py``, registered on import.

To add a method, create ``methods/<name>/`` with a pydantic config (subclass of
:class:`~peftkit.config.PeftConfig`) and an adapter class following
:class:`~peftkit.methods.base.Adapter`, then call
``register_method(MyConfig, MyAdapter)`` in its ``__init__`` and import it here.
"""

from peftkit.methods import lora, p_tuning, prefix_tuning, prompt_tuning
from peftkit.methods.base import Adapter, Mergeable, ModelInputs
from peftkit.methods.registry import known_methods, register_method

__all__ = [
    "Adapter",
    "Mergeable",
    "ModelInputs",
    "known_methods",
    "lora",
    "p_tuning",
    "prefix_tuning",
    "prompt_tuning",
    "register_method",
]
