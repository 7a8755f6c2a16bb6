"""Errors every layer may raise, in a module that imports nothing of mimscale (so checkpoint,
data or a method can report a configuration problem without importing the config loader)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, with a message that names the offending key (exit code 2)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops without saving, keeping the last good checkpoint (exit code 3)."""


# Exit statuses of pretrain.py (every rank) and of docker/entrypoint.sh: what Slurm requeue rules
# and Kubernetes podFailurePolicy act on (docker/slurm, docker/k8s).
EXIT_DONE = 0
EXIT_FAILED = 1  # anything unexpected (a traceback says what)
EXIT_CONFIG = 2  # ConfigError: fix the configuration, a rerun would fail the same way
EXIT_DIVERGED = 3  # TrainingDiverged: the last good checkpoint is kept
EXIT_STOPPED = 143  # stopped early on a signal with a checkpoint saved: run it again to resume
