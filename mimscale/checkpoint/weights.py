"""The one reader of trained weights: a run's checkpoint, an export, or a plain state-dict file.

``locate(path)`` tells which of three kinds ``path`` is:
  - ``checkpoint``: a tag directory (``checkpoints/stepN`` with its COMPLETE marker), a
    ``checkpoints`` directory or a run's output_dir (its newest complete tag). Any ZeRO stage,
    consolidated on the CPU by DeepSpeed's zero_to_fp32, lazily: only the submodules asked for are
    assembled (not a masker's, an EMA's or C-MAE's target copies). The model comes from the tag's
    ``config.yaml`` (older tags: the run's);
  - ``export`` (``python -m mimscale.export``): its directory, its ``mimscale.json``, or a weights
    file with a ``mimscale.json`` beside it. The model comes from ``mimscale.json``'s ``mimscale.model``;
  - ``file``: any other state-dict file, ``.safetensors`` or a torch pickle (``.pt``/``.pth``/
    ``.bin``), e.g. timm's, optionally nested under "model"/"state_dict"/"module". It names no model.
No pickle read here runs code: each is loaded weights-only (mimscale.checkpoint.safe_load), and one that needs
more is refused with an error naming it.
Encoder state dicts come back in ViTEncoder's keys and shapes, fp32: ``patch_embed.proj.weight``
[D, 3, P, P], ``cls_token`` [1, 1, D], ``blocks.<i>.*``, ``norm.weight`` [D]; decoder ones in
MAEDecoder's. ``checked_state`` is the one check that a state dict fits a module (every key there,
every shape equal). Nothing here needs a process group.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
import yaml

from mimscale.checkpoint import formats, safe_load
from mimscale.checkpoint.checkpointer import CONFIG, MARKER, DamagedCheckpoint, resolve_resume
from mimscale.models.decoder import MAEDecoder
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder

# An export (python -m mimscale.export) is a timm Hub folder (config.json and model.safetensors,
# which timm.create_model("local-dir:<dir>", pretrained=True) loads) plus mimscale's own files.
EXPORT_CONFIG = "mimscale.json"  # mimscale's metadata: the model section, source run, decoder; marks an export
EXPORT_ENCODER = "model.safetensors"  # the encoder in timm's keys (timm's Hub weights file name)
EXPORT_DECODER = "decoder.safetensors"
TIMM_CONFIG = "config.json"  # timm's, written by timm
EXTRACTOR_KEY = "masking.automae.extractor_checkpoint"  # how extractor_state's one caller names its path

WRAPPERS = ("model", "state_dict", "module")  # dict keys training scripts nest their weights under
PREFIXES = ("module.", "model.")  # key prefixes of DDP / DeepSpeed / EMA wrappers
HEAD = ("head.", "fc_norm.", "head_drop.")  # a timm classifier's head: not part of an encoder


@dataclass(frozen=True)
class Weights:
    """Where weights are. ``path``: the tag directory (checkpoint) or the weights file (export,
    file). ``config``: the file naming the model (config.yaml, mimscale.json); None when there is none."""

    kind: str  # "checkpoint", "export" or "file"
    path: Path
    config: Optional[Path]

    @property
    def stamp(self) -> Path:
        """A file that changes whenever the weights can have: a tag's marker (written last), else the file."""
        return self.path / MARKER if self.kind == "checkpoint" else self.path


def locate(path: str | Path, label: str = "checkpoint") -> Weights:
    """What ``path`` is (see the module docstring), its format version checked (a newer mimscale's
    checkpoint or export: FormatVersionError, a ValueError). ``label``: what errors call the path."""
    src = _find(path, label)
    if src.kind == "checkpoint":
        formats.check("checkpoint", marker(src.path), src.path / MARKER)
    elif src.kind == "export":
        formats.check("export", json.loads(src.config.read_text()), src.config)
    return src


def _find(path: str | Path, label: str) -> Weights:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{label} {str(path)!r} does not exist (no such file or directory; expected a "
                                "mimscale checkpoint, an export or a state-dict file)")
    if p.is_file():
        beside = p.parent / EXPORT_CONFIG
        if p.name in (EXPORT_CONFIG, TIMM_CONFIG) and beside.is_file():
            return Weights("export", p.parent / EXPORT_ENCODER, beside)
        return Weights("export", p, beside) if beside.is_file() else Weights("file", p, None)
    if (p / EXPORT_CONFIG).is_file():
        return Weights("export", p / EXPORT_ENCODER, p / EXPORT_CONFIG)
    try:
        tag = resolve_resume(str(p.resolve()), p)  # resolved: a folder named "auto" or "never" is a path
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(f"{label} {e}") from None
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{label} {path} holds no complete checkpoint: expected a checkpoints/stepNNNNNNNN directory with a "
            f"{MARKER} marker (a save that was cut off has none), a checkpoints directory, or a run's output_dir") from None
    config = next((c for c in (tag / CONFIG, tag.parent.parent / CONFIG) if c.is_file()), None)
    return Weights("checkpoint", tag, config)


def _model_config(src: Weights) -> dict:
    """The raw ``model`` mapping of ``src``'s config file (a run's config.yaml, an export's mimscale.json)."""
    if src.config is None:
        if src.kind == "file":
            raise FileNotFoundError(f"{src.path} has no {EXPORT_CONFIG} beside it: pass the export directory")
        raise FileNotFoundError(f"checkpoint {src.path} has no {CONFIG} (nor has its run folder "
                                f"{src.path.parent.parent}): the model it holds is unknown")
    if src.kind == "checkpoint":
        return (yaml.safe_load(src.config.read_text()) or {}).get("model", {})
    return json.loads(src.config.read_text()).get("mimscale", {}).get("model", {})


def model_section(src: Weights) -> dict:
    """{name, img_size, patch_size} of ``src``'s model, the name checked (patch_size None: the preset's)."""
    model = _model_config(src)
    name = model.get("name")
    if name not in ENCODERS:
        raise ValueError(f"{src.config}: model.name {name!r} is not one of {', '.join(ENCODERS)}")
    return {"name": name, "img_size": int(model.get("img_size", 224)), "patch_size": model.get("patch_size"),
            **architecture_options(model)}


def architecture_options(model: dict) -> dict:
    """The model options that change the encoder's weights (``model.layer_scale``: ls2.gamma;
    ``model.pos_embed`` learned: a pos_embed parameter), only when not the default, so a default
    model's section (and the eval caches and exports keyed by it) stays {name, img_size, patch_size}.
    Drop path changes no weight and is left out."""
    out = {}
    if model.get("layer_scale") is not None:
        out["layer_scale"] = float(model["layer_scale"])
    if model.get("pos_embed", "sincos") != "sincos":
        out["pos_embed"] = str(model["pos_embed"])
    return out


def run_model(src: Weights) -> dict:
    """The whole ``model`` config (a run's decoder_* and norm_pix_loss too), the checked section on top."""
    return {**_model_config(src), **model_section(src)}


def marker(tag: Path) -> dict:
    """The facts a tag's COMPLETE marker records (step, world_size, ...)."""
    return json.loads((tag / MARKER).read_text() or "{}")


def _check_shards(tag: Path) -> None:
    """Every rank's optimizer shard (which holds its fp32 master weights) and the model states file."""
    world = int(marker(tag).get("world_size", 1))
    missing = [f"*zero_pp_rank_{r}_mp_rank_*_optim_states.pt" for r in range(world)
               if not any(tag.glob(f"*zero_pp_rank_{r}_mp_rank_*_optim_states.pt"))]
    if not any(tag.glob("*model_states.pt")):
        missing.append("*model_states.pt")
    if missing:
        raise FileNotFoundError(f"checkpoint {tag} (written by {world} ranks) is incomplete: missing {', '.join(missing)}")


def consolidate(tag: Path, parts: tuple[str, ...] = ("encoder",)) -> dict[str, dict[str, torch.Tensor]]:
    """{part: its fp32 tensors, keys without the ``part.`` prefix} of a ZeRO checkpoint of any stage,
    for top-level submodules of the trained MIMModel ("encoder", "decoder"); {} for one it lacks."""
    _check_shards(tag)
    try:
        # DeepSpeed binds its logger to the stdout of its import and prints progress: both go to
        # stderr, so a CLI's stdout stays its result. Imported here, not at the top: importing it
        # costs seconds, and readers of exports and files never need it. zero_to_fp32 unpickles
        # every shard with weights_only=False: deepspeed_loads makes each load weights-only.
        with contextlib.redirect_stdout(sys.stderr), safe_load.deepspeed_loads():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, lazy_mode=True)
            # contiguous(): assembles one tensor; views of one flat shard otherwise
            return {part: {k[len(part) + 1:]: v.contiguous() for k, v in lazy.items() if k.startswith(part + ".")}
                    for part in parts}
    except (FileNotFoundError, safe_load.UnsafeFileError):
        raise
    except Exception as e:  # DeepSpeed's own errors (a truncated shard, another format), named with the checkpoint
        raise ValueError(f"checkpoint {tag} could not be consolidated: {type(e).__name__}: {e}") from e


def read_file(path: Path) -> dict:
    """A state-dict file as saved: safetensors, else a torch pickle (tensors and containers only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (an export without its weights?)")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    return safe_load.load(path)


def strip(state: dict) -> dict:
    """Bare module keys: unnested from WRAPPERS, wrapper PREFIXES dropped, and of a whole MIM model
    (``encoder.*`` keys next to ``decoder.*``, ``masker.*``) the encoder's alone."""
    for _ in range(3):
        for w in WRAPPERS:
            if isinstance(state.get(w), dict):
                state = state[w]
    bare = {}
    for k, v in state.items():
        while k.startswith(PREFIXES):
            k = k.split(".", 1)[1]
        bare[k] = v
    if any(k.startswith("encoder.") for k in bare):
        bare = {k[len("encoder."):]: v for k, v in bare.items() if k.startswith("encoder.")}
    return bare


def _vit_tensors(src: Weights) -> dict[str, torch.Tensor]:
    """Every tensor of ``src``'s ViT in fp32 (timm's keys, a classifier head dropped), unchecked."""
    state = consolidate(src.path)["encoder"] if src.kind == "checkpoint" else strip(dict(read_file(src.path)))
    return {k: v.float() for k, v in state.items() if torch.is_tensor(v) and not k.startswith(HEAD)}


def encoder_state(src: Weights) -> dict[str, torch.Tensor]:
    """The encoder's tensors of ``src`` in fp32, unchecked. A ``pos_embed`` (timm's learned one, an
    export's copy of the sin-cos) is kept: ``checked_state`` drops it for a sin-cos encoder (a fixed
    buffer that it rebuilds, not in its state dict) and loads it into a ``model.pos_embed: learned``
    one. An export's ``ls1.gamma`` (ones, written for timm) is dropped likewise: mimscale's layer
    scale is on the MLP branch only."""
    return _vit_tensors(src)


def extractor_state(path: str | Path, label: str = EXTRACTOR_KEY) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """AutoMAE's frozen extractor: the ViT's tensors at any path ``locate`` takes, its ``pos_embed``
    KEPT (a learned one is part of what the checkpoint computes), and the model section when the
    path names one (a mimscale checkpoint or export; None for a bare state-dict file)."""
    src = locate(path, label)
    return _vit_tensors(src), (model_section(src) if src.config is not None else None)


def checked_state(state: dict, reference: torch.nn.Module, what: str, source: Optional[Path] = None) -> dict:
    """``state`` restricted to ``reference``'s keys, which must all be there with the same shapes
    (``reference`` may live on the meta device). ``what`` ("encoder") and ``source`` name it in errors."""
    want = reference.state_dict()
    where = f"the {what} weights" + (f" in {source}" if source else "")
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"{where} lack {len(missing)} of {len(want)} tensors, e.g. {missing[:3]}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{where} do not fit the model in the config: {'; '.join(wrong[:3])}")
    return {k: state[k] for k in want}


def build_encoder(model: dict) -> ViTEncoder:
    """An untrained ViTEncoder for a model section {name, img_size, patch_size[, layer_scale, pos_embed]}."""
    return ViTEncoder(ENCODERS[model["name"]], img_size=model["img_size"], patch_size=model["patch_size"],
                      layer_scale=model.get("layer_scale"), pos_embed=model.get("pos_embed", "sincos"))


def build_decoder(section: dict) -> MAEDecoder:
    """An untrained MAEDecoder for an export's ``decoder`` section (export.decoder_section)."""
    s = section
    return MAEDecoder(s["encoder_dim"], s["grid"], s["patch_size"], dim=s["decoder_dim"], depth=s["depth"],
                      heads=s["heads"], mlp_ratio=s["mlp_ratio"])


def load_encoder(path: str | Path, label: str = "checkpoint") -> tuple[ViTEncoder, dict]:
    """(ViTEncoder in fp32 and eval mode with the weights at ``path``, its model section)."""
    src = locate(path, label)
    model = model_section(src)
    encoder = build_encoder(model)
    encoder.load_state_dict(checked_state(encoder_state(src), encoder, "encoder", src.path))
    return encoder.float().eval(), model


def load_decoder(path: str | Path) -> tuple[MAEDecoder, dict]:
    """(MAEDecoder in fp32 and eval mode with an export's decoder weights, its config section)."""
    src = locate(path, "export")
    if src.kind != "export":
        raise FileNotFoundError(f"{path} is not an export (no {EXPORT_CONFIG} in it)")
    out = src.config.parent
    section = json.loads(src.config.read_text()).get("decoder")
    if section is None or not (out / EXPORT_DECODER).is_file():
        raise FileNotFoundError(f"{out} holds no decoder (exported with --no-decoder, or its run had none)")
    decoder = build_decoder(section)
    state = {k: v.float() for k, v in read_file(out / EXPORT_DECODER).items()}  # its pos_embed: not a weight, dropped
    decoder.load_state_dict(checked_state(state, decoder, "decoder", out / EXPORT_DECODER))
    return decoder.float().eval(), section
