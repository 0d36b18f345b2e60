"""The error types jaxlm raises, in a leaf every layer may import.

They live here, not beside the code that raises them, so a layer can raise or catch one
without importing the layer that owns it: the data pipeline raises `ConfigError` without
importing `jaxlm.config` (and through it the model). Each message names the input (a config
field, a flag, a file), the value, and what would be valid.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


class PathError(ValueError):
    """A path given on the command line cannot be used; the message names the flag and the fix."""


class CheckpointError(RuntimeError):
    """The checkpoint directory cannot be written or read; the message says what to do."""


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the field and why."""


class TopologyError(ValueError):
    """A topology name that names no slice, or no compiler to compile for it."""


class RunError(ValueError):
    """A run that cannot be read as asked; the message says which and what to give instead."""


class GenerateError(ValueError):
    """A generation request that cannot work; the message says which input and why."""


class EvalError(ValueError):
    """An evaluation input that cannot work; the message names it and the fix."""


class SweepError(ValueError):
    """A sweep that cannot start (its space, storage or study); the message names which."""


class BadRecord(ValueError):
    """A record that cannot be trained on; `reason` is a key of readers.SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; nothing bad was applied or saved."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of `step` was saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint saved at step {step}")
        self.step = step
