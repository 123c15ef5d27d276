"""PEFT's exception and warning classes."""


class PeftError(Exception):
    """Base class of PEFT's errors."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter's ``target_modules`` matched no module of the base model (PEFT's error class)."""


class PeftWarning(UserWarning):
    """Base class of PEFT's warnings."""
