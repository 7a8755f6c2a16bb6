"""Errors every layer may raise, in a module that imports nothing of mimscale (so checkpoint,
data or a method can report a configuration problem without importing the config loader)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, with a message that names the offending key (exit code 2)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops without saving, keeping the last good checkpoint (exit code 3)."""
