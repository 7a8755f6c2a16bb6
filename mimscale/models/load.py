"""A trained encoder from what a run leaves behind, for evaluation and export.

``load_encoder(path)`` accepts
  - a mimscale checkpoint: a tag directory (``checkpoints/stepN``), a ``checkpoints`` directory or a
    run's ``output_dir`` (the newest complete tag); any ZeRO stage, consolidated on the CPU. The
    model comes from the ``config.yaml`` saved in the tag (older tags: the run's ``config.yaml``);
  - an export (``python -m mimscale.export``): its directory, or its ``config.json`` or
    ``encoder.safetensors``. The model comes from ``config.json``'s ``mimscale.model`` section.
Returns a ``ViTEncoder`` in fp32 and eval mode, and the model section used ({name, img_size,
patch_size}).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder

EXPORT_CONFIG = "config.json"
EXPORT_ENCODER = "encoder.safetensors"


def model_section(path: str | Path) -> tuple[dict, Path]:
    """({name, img_size, patch_size}, weights location) for a checkpoint or export ``path``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected a mimscale checkpoint or export)")
    if p.is_file() and p.name != EXPORT_CONFIG:
        cfg_file = p.parent / EXPORT_CONFIG
        weights = p
    elif p.is_file() or (p / EXPORT_CONFIG).is_file():
        cfg_file = p if p.is_file() else p / EXPORT_CONFIG
        weights = cfg_file.parent / EXPORT_ENCODER
    else:
        from mimscale.checkpoint import CONFIG, resolve_resume

        tag = resolve_resume(str(p), p)
        for cand in (tag / CONFIG, tag.parent.parent / CONFIG):
            if cand.is_file():
                model = (yaml.safe_load(cand.read_text()) or {}).get("model", {})
                return _checked(model, cand), tag
        raise FileNotFoundError(f"checkpoint {tag} has no {CONFIG} (written by mimscale since the eval release); "
                                f"export it with a known model instead")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{weights} has no {EXPORT_CONFIG} beside it: pass the export directory")
    model = json.loads(cfg_file.read_text()).get("mimscale", {}).get("model", {})
    return _checked(model, cfg_file), weights


def _checked(model: dict, where: Path) -> dict:
    name = model.get("name")
    if name not in ENCODERS:
        raise ValueError(f"{where}: model.name {name!r} is not one of {', '.join(ENCODERS)}")
    return {"name": name, "img_size": int(model.get("img_size", 224)), "patch_size": model.get("patch_size")}


def build_encoder(model: dict) -> ViTEncoder:
    return ViTEncoder(ENCODERS[model["name"]], img_size=model["img_size"], patch_size=model["patch_size"])


def load_encoder(path: str | Path) -> tuple[ViTEncoder, dict]:
    from mimscale.masking.extractor_weights import load_encoder_state

    model, weights = model_section(path)
    encoder = build_encoder(model)
    state = load_encoder_state(weights)
    want = encoder.state_dict()
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"{weights} lacks {len(missing)} of the encoder's weights, e.g. {missing[:3]}")
    encoder.load_state_dict({k: state[k] for k in want})
    return encoder.float().eval(), model
