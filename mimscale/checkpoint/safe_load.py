"""Loading torch pickles without running code.

A pickle can name any callable and have it called on load, so a checkpoint, an RNG file or a state
dict given by path could run code. Every pickle mimscale reads goes through torch's weights-only
unpickler (``torch.load(weights_only=True)``): tensors, storages, python containers and scalars, and
beyond them only the globals named in an explicit allowlist (the eval feature cache, which needs none,
calls torch.load(weights_only=True) itself):

  - ``load``: our own files (rng_rank<r>.pt, state dicts given by path) and ``extra`` for a caller
    that names what it expects;
  - ``deepspeed_loads()``: around code of DeepSpeed's that loads its checkpoints (``zero_to_fp32``'s
    consolidation, ``engine.load_checkpoint``). DeepSpeed 0.19.8 calls ``torch.load(...,
    weights_only=False)`` explicitly (zero_to_fp32, TorchCheckpointEngine.load), so no default can
    reach it: for the duration, ``torch.load`` (the module attribute those call sites read) is
    replaced by a wrapper that forces ``weights_only=True`` with ``DEEPSPEED_GLOBALS`` allowed, and
    put back afterwards, on error too. The allowlist is exactly the non-torch classes DeepSpeed
    0.19.8 pickles into its model_states / optim_states files under ZeRO-1, 2 and 3 in fp32 and
    bf16 (found by writing each and reading it back; tests/unit/checkpoint/test_safe_load.py does so for every
    stage and precision): the loss scaler and the ZeRO stage enum (every optim_states file) and the
    fragment addresses of ZeRO-1/2's param_slice_mappings.

A file that needs anything else is refused with ``UnsafeFileError`` naming the file and the global;
nothing in it has run. Exports are safetensors, which hold no code at all.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch

# What DeepSpeed 0.19.8 pickles beyond tensors and containers (module, class):
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # optim_states: optimizer_state_dict.loss_scaler
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # optim_states: optimizer_state_dict.zero_stage
    ("deepspeed.utils.tensor_fragment", "fragment_address"),  # ZeRO-1/2 optim_states: param_slice_mappings
)

_Global = Union[Callable, tuple]


def numpy_array_globals() -> list[_Global]:
    """What a pickled numpy array names (np.random.get_state()'s key in RNG files written before
    they held tensors): numpy's array rebuild function, ndarray and dtype, under numpy 2's module
    path and numpy 1's. Safe to allow: they rebuild an array whose contents come from the same
    weights-only unpickler."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy._core.multiarray._reconstruct"), (_reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def deepspeed_globals() -> list[_Global]:
    """DEEPSPEED_GLOBALS as the classes (importing them imports DeepSpeed: only when needed)."""
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]


class UnsafeFileError(ValueError):
    """A pickle that needs more than the weights-only unpickler and its allowlist: refused unrun."""


def _refusal(path, e: pickle.UnpicklingError) -> UnsafeFileError:
    text = str(e)
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    other = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    why = f"it names {named.group(1)}" if named else other.group(1) if other else (text.splitlines() or [""])[0]
    return UnsafeFileError(f"refused to load {path}: it is not a plain tensor file ({why}), and mimscale never unpickles "
                           "code (torch.load weights_only=True; mimscale/safe_load.py lists what is allowed)")


def _name(f) -> str:
    return str(f) if isinstance(f, (str, Path)) else getattr(f, "name", repr(f))


def load(path: str | Path, map_location="cpu", extra: Sequence[_Global] = ()):
    """``torch.load(path, weights_only=True)`` with ``extra`` globals allowed; a refused file raises
    UnsafeFileError naming it."""
    try:
        with torch.serialization.safe_globals(list(extra)):
            return torch.serialization.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


@contextlib.contextmanager
def deepspeed_loads() -> Iterator[None]:
    """Within: every ``torch.load`` call (DeepSpeed's explicit ``weights_only=False`` included) is
    weights-only, with DEEPSPEED_GLOBALS allowed. Process-wide while it lasts (torch.load is one
    module attribute): another thread's load in that window is made safe too, never less safe."""
    allowed = deepspeed_globals()
    previous = torch.load

    def weights_only_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.serialization.load(f, map_location=map_location, pickle_module=pickle_module,
                                                weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(_name(f), e) from None

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = previous
