"""Machinery shared by the weight adapters: targeting, the layer wrapper, PEFT file keys, merging.

- :mod:`~peftkit.methods.tuners.targeting`: ``target_modules`` / ``layers_to_transform`` / ``modules_to_save``
  resolution, with errors that list candidate module names;
- :mod:`~peftkit.methods.tuners.layer`: :class:`AdaptedLayer`, the routing-aware wrapper holding several
  adapters per layer;
- :mod:`~peftkit.methods.tuners.adapter`: :class:`WeightAdapter`, the base class a method subclasses
  with only its maths;
- :mod:`~peftkit.methods.tuners.config`: the targeting fields of every weight-adapter config.
"""

from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.config import LayeredTunerConfig, TunerConfig
from peftkit.methods.tuners.layer import AdaptedLayer

__all__ = ["AdaptedLayer", "LayeredTunerConfig", "TunerConfig", "WeightAdapter"]
