"""Weights for AutoMAE's frozen extractor: a pretrained ViT encoder from a file or a mimscale run.

Accepted: a timm-format state dict (.safetensors, or .pt/.pth/.bin, optionally wrapped in
"model"/"state_dict"/"module"), a mimscale export, or a mimscale DeepSpeed checkpoint (a tag
directory, a ``checkpoints`` directory or a run's output_dir; consolidated from any ZeRO stage).
Returned keys are the encoder's own (``patch_embed.*``, ``cls_token``, ``blocks.*``, ``norm.*``);
a classifier head and a learned ``pos_embed`` (timm) are dropped, the latter since mimscale's encoder uses fixed 2-D sin-cos, as MAE.
"""
from __future__ import annotations

from pathlib import Path

import torch

WRAPPERS = ("model", "state_dict", "module")
PREFIXES = ("module.", "encoder.", "model.")


def _strip(state: dict) -> dict:
    for _ in range(3):
        for w in WRAPPERS:
            if isinstance(state.get(w), dict):
                state = state[w]
    if any(k.startswith("encoder.") for k in state):  # a whole MIM model: keep the encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    out = {}
    for k, v in state.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"masking.automae.extractor_checkpoint {str(path)!r} does not exist")
    if p.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from mimscale.checkpoint import resolve_resume

        tag = resolve_resume(str(p), p)
        # lazy: only the encoder's tensors are assembled (not the decoder, a masker's or C-MAE's target copies)
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, lazy_mode=True)
        state = {k: v.contiguous() for k, v in lazy.items() if k.startswith("encoder.")}
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    state = _strip(dict(state))
    state.pop("pos_embed", None)
    # a classifier's head (timm) is not part of an encoder
    return {k: v.float() for k, v in state.items() if torch.is_tensor(v) and not k.startswith(("head.", "fc_norm.", "head_drop."))}
