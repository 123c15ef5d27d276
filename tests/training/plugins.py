"""User code that subprocess tests load through the run config's ``imports`` list."""

import time

from peftkit.training.callbacks import Callback, register_callback
from peftkit.training.losses import register_loss


@register_callback("test_sleep")
class SleepAfterStep(Callback):
    """Slows a tiny run down so that a test can kill it half-way (changes no number)."""

    def __init__(self, *, seconds: float = 0.05):
        self.seconds = seconds

    def on_step_end(self, state, metrics):
        time.sleep(self.seconds)


@register_loss("test_nan")
def always_nan(inputs):
    """A loss that is NaN from the first step (to exercise the divergence stop)."""
    return inputs.logits.float().sum(-1) * float("nan")
