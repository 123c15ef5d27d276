"""Adaptation methods, one package each: ``config.py`` + ``module.py``, registered on import.

Soft prompts (``prompt_tuning``, ``prefix_tuning``, ``p_tuning``) prepare the batch; weight adapters
(``lora``, ``ia3``, ``adalora``, ``loha``, ``lokr``, ``oft``, ``boft``, ``vera``) wrap layers through the
shared machinery in :mod:`peftkit.methods.tuners`.

To add a method, create ``methods/<name>/`` with a pydantic config (subclass of
:class:`~peftkit.config.PeftConfig`) and an adapter class following
:class:`~peftkit.methods.base.Adapter`, then call
``register_method(MyConfig, MyAdapter)`` in its ``__init__`` and import it here.
"""

from peftkit.methods import (
    adalora,
    boft,
    ia3,
    loha,
    lokr,
    lora,
    oft,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    vera,
)
from peftkit.methods.base import Adapter, Mergeable, ModelInputs
from peftkit.methods.registry import known_methods, register_method

__all__ = [
    "Adapter",
    "Mergeable",
    "ModelInputs",
    "adalora",
    "boft",
    "ia3",
    "known_methods",
    "loha",
    "lokr",
    "lora",
    "oft",
    "p_tuning",
    "prefix_tuning",
    "prompt_tuning",
    "register_method",
    "vera",
]
