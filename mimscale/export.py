"""Export a trained encoder (and the MAE decoder) from a mimscale checkpoint, for timm and elsewhere.

    python -m mimscale.export --checkpoint runs/x --out exports/x [--no-decoder] [--dtype bf16] [--force]

``--checkpoint``: a tag (``checkpoints/stepN``), a ``checkpoints`` directory or a run's output_dir
(the newest complete tag); any ZeRO stage, consolidated on the CPU. ``--out`` is timm's Hub layout,
so ``timm.create_model("local-dir:<out>", pretrained=True)`` loads it strictly with the right
mean/std, and the folder can be pushed to the Hugging Face Hub as is (``hf-hub:<repo>``):
  - ``model.safetensors``: the encoder in timm ``VisionTransformer`` key names. mimscale's keys
    already are timm's; the one addition is ``pos_embed`` [1, 1 + L, D]: mimscale's is a fixed 2-D
    sin-cos buffer that checkpoints do not hold, timm's a learned parameter, so its values are written;
  - ``config.json``: timm's own (written by timm's ``save_config_for_hf``): architecture,
    num_features, model_args, pretrained_cfg with the ImageNet mean/std mimscale trains with,
    bicubic, crop 0.875;
  - ``decoder.safetensors``: the MAE decoder's weights (keys of models/decoder.py) plus its fixed
    ``pos_embed`` [1, 1 + L, Dd] for convenience; ``mimscale.checkpoint.weights.load_decoder(out)`` rebuilds
    the ``MAEDecoder``;
  - ``mimscale.json``: mimscale's own metadata beside timm's: the model section
    (``mimscale.checkpoint.weights.load_encoder(out)`` reads it), the source checkpoint and step, the decoder's dims,
    and the export's ``format_version`` (checkpoint/formats.py: a reader refuses a newer one, naming it).
mimscale.checkpoint.weights reads the checkpoint and checks the weights against the model; this module writes.
The export is written to a temporary folder beside ``--out`` and renamed at the end, so a failed
export leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import safetensors.torch
import timm
import torch
from timm.models._hub import save_config_for_hf

from mimscale.checkpoint import formats, weights
from mimscale.checkpoint.weights import EXPORT_CONFIG, EXPORT_DECODER, EXPORT_ENCODER, TIMM_CONFIG
from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import sincos_pos_embed_2d

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The timm model each preset is. timm's factories take every size kwarg as an override, and the
# export always passes them all, so the name only picks the family and its default pretrained cfg.
# vit_2b (2560 wide, 24 deep, /14) has no timm preset: it is vit_huge_patch14_224 (same patch size)
# with embed_dim/depth/num_heads overridden.
TIMM_ARCH = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
    "vit_giant": "vit_giant_patch14_224",
    "vit_2b": "vit_huge_patch14_224",
}


def timm_section(model: dict) -> dict:
    """architecture, timm_kwargs and pretrained_cfg_overlay for a model section {name, img_size, patch_size}.

    ``global_pool="token"``: the CLS feature, with the final ``norm`` kept in ``forward_features``
    (with "avg" timm moves it to ``fc_norm``, which would rename the weights); ``num_classes=0``:
    no head. The overlay's mean/std are the ImageNet statistics mimscale trains with (models/mim.py):
    timm's cfgs for these names carry other values (0.5 for the augreg weights), which
    ``timm.data.resolve_model_data_config`` would otherwise hand to a user's transforms; its
    ``num_classes=0`` makes timm load the file strictly (a cfg of 1000 classes loads non-strictly)."""
    spec = ENCODERS[model["name"]]
    img, patch = int(model["img_size"]), int(model["patch_size"] or spec.patch_size)
    kwargs = dict(img_size=img, patch_size=patch, embed_dim=spec.dim, depth=spec.depth, num_heads=spec.heads,
                  mlp_ratio=spec.mlp_ratio, num_classes=0, global_pool="token")
    if model.get("layer_scale") is not None:  # timm's Block then holds ls1 and ls2 (see timm_encoder_state)
        kwargs["init_values"] = float(model["layer_scale"])
    overlay = dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), input_size=[3, img, img], num_classes=0)
    return {"architecture": TIMM_ARCH[model["name"]], "timm_kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def write_timm_config(path: Path, model: dict) -> None:
    """timm's Hub ``config.json`` for a model section, written by timm itself from the model it builds
    (on the meta device: nothing allocated). Evaluation defaults: bicubic, center crop 0.875."""
    section = timm_section(model)
    with torch.device("meta"):
        net = timm.create_model(section["architecture"], pretrained=False, **section["timm_kwargs"])
    data = dict(mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD), interpolation="bicubic", crop_pct=0.875)
    save_config_for_hf(net, str(path), model_config={"pretrained_cfg": {"tag": "mimscale"}}, data_config=data)


def timm_encoder_state(state: dict, reference: torch.nn.Module) -> dict:
    """A ViTEncoder's checked state in timm ``VisionTransformer`` keys. ``pos_embed`` [1, 1 + L, D]:
    a learned one (``model.pos_embed: learned``) is in the state already; the fixed sin-cos, a buffer
    checkpoints do not hold, is written out (timm's is a parameter). With ``model.layer_scale`` timm
    scales both branches of a block: the attention branch's ``ls1.gamma``, absent here (mimscale
    scales the MLP branch only), is written as ones, the same function."""
    state = dict(state)
    if "pos_embed" not in state:
        state["pos_embed"] = sincos_pos_embed_2d(reference.embed_dim, reference.grid)[None]
    if reference.layer_scale is not None:
        for i in range(len(reference.blocks)):
            state.setdefault(f"blocks.{i}.ls1.gamma", torch.ones(reference.embed_dim))
    return state


def decoder_section(run_model: dict) -> dict:
    """The MAEDecoder's constructor arguments (and the loss's norm_pix flag) from a run's ``model`` config."""
    spec = ENCODERS[run_model["name"]]
    patch = int(run_model.get("patch_size") or spec.patch_size)
    return {"encoder_dim": spec.dim, "decoder_dim": int(run_model.get("decoder_dim", 512)),
            "depth": int(run_model.get("decoder_depth", 8)), "heads": int(run_model.get("decoder_heads", 16)),
            "mlp_ratio": 4.0, "patch_size": patch, "grid": int(run_model["img_size"]) // patch,
            "norm_pix_loss": bool(run_model.get("norm_pix_loss", True))}


def _check_out(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty: pass --force to replace it")


def _prepare_out(out: Path, force: bool) -> Path:
    """An empty temporary folder beside ``out`` (same file system, so the final rename is atomic)."""
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old ``out`` is moved aside first and removed last."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_export(out: str | Path, run_model: dict, encoder_state: dict, decoder_state: Optional[dict] = None,
                 dtype: str = "fp32", source: Optional[str] = None, step: Optional[int] = None, force: bool = False) -> dict:
    """Write an export from state dicts: ``encoder_state`` in ViTEncoder keys, ``decoder_state`` in
    MAEDecoder keys (None: no decoder). ``run_model``: the run's ``model`` config (name, img_size,
    patch_size; decoder_dim/depth/heads, norm_pix_loss for the decoder). Returns mimscale.json's content."""
    if run_model.get("name") not in ENCODERS:
        raise ValueError(f"model.name {run_model.get('name')!r} is not one of {', '.join(ENCODERS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    spec = ENCODERS[run_model["name"]]
    model = {"name": run_model["name"], "img_size": int(run_model.get("img_size", 224)),
             "patch_size": int(run_model.get("patch_size") or spec.patch_size), **weights.architecture_options(run_model)}
    # Modules on the meta device: the expected keys and shapes without allocating (vit_2b is 7.6 GB in fp32).
    with torch.device("meta"):
        reference = weights.build_encoder(model)
    files = {EXPORT_ENCODER: timm_encoder_state(weights.checked_state(encoder_state, reference, "encoder"), reference)}
    config = formats.stamp("export", {**timm_section(model), "dtype": dtype,
                                      "mimscale": {"model": model, "source_checkpoint": source, "step": step}})
    if decoder_state is not None:
        section = decoder_section({**run_model, **model})
        with torch.device("meta"):
            ref_dec = weights.build_decoder(section)
        files[EXPORT_DECODER] = weights.checked_state(decoder_state, ref_dec, "decoder")
        files[EXPORT_DECODER]["pos_embed"] = sincos_pos_embed_2d(section["decoder_dim"], section["grid"])[None]  # [1, 1 + L, Dd]
        config["decoder"] = section
    config["files"] = {}
    trained = {EXPORT_ENCODER: set(reference.state_dict())}
    if decoder_state is not None:
        trained[EXPORT_DECODER] = set(ref_dec.state_dict())
    tmp = _prepare_out(out, force)
    try:
        for name, state in files.items():
            # clone: consolidated tensors can be views of one flat shard, and safetensors refuses shared storage
            tensors = {k: v.detach().to("cpu", DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().clone()
                       for k, v in state.items()}
            safetensors.torch.save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            # trained tensors only: not the written-out sin-cos pos_embed nor timm's unit ls1.gamma
            config["files"][name] = {"params": sum(v.numel() for k, v in tensors.items() if k in trained[name]),
                                     "bytes": (tmp / name).stat().st_size}
        write_timm_config(tmp / TIMM_CONFIG, model)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def export_checkpoint(checkpoint: str | Path, out: str | Path, decoder: Optional[bool] = None, dtype: str = "fp32",
                      force: bool = False) -> dict:
    """Consolidate ``checkpoint`` and write the export to ``out``. ``decoder``: None exports it when the
    run has one (C-MAE has none), True requires it, False leaves it out. Returns mimscale.json's content."""
    out = Path(out)
    _check_out(out, force)  # before the (slow) consolidation
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    src = weights.locate(checkpoint, "--checkpoint")
    if src.kind != "checkpoint":
        raise ValueError(f"--checkpoint {checkpoint} is not a mimscale checkpoint directory (an export, or a file)")
    tag, model = src.path, weights.run_model(src)
    # the decoder only when it is written: consolidation assembles what it is asked for
    parts = weights.consolidate(tag, ("encoder", "decoder") if decoder is not False else ("encoder",))
    enc, dec = parts["encoder"], parts.get("decoder") or None
    if decoder and dec is None:
        raise ValueError(f"checkpoint {tag} has no MAE decoder (its method builds none): export with --no-decoder")
    return write_export(out, model, enc, dec, dtype=dtype, source=str(tag.resolve()), step=weights.marker(tag).get("step"),
                        force=force)


def timm_snippet(out: Path) -> str:
    """The create_model call that rebuilds the exported encoder (to copy into other code)."""
    return f"model = timm.create_model({'local-dir:' + str(out.resolve())!r}, pretrained=True)"


def summary(config: dict, out: Path) -> str:
    m = config["mimscale"]
    lines = [f"exported {m['source_checkpoint']} (step {m['step']}, {m['model']['name']} "
             f"{m['model']['img_size']}px/{m['model']['patch_size']}) to {out}"]
    for name, f in config["files"].items():
        lines.append(f"  {name:<20} {f['params']:>14,} params  {config['dtype']}  {f['bytes'] / 1e6:,.1f} MB")
    lines.append(f"  {TIMM_CONFIG} (timm's), {EXPORT_CONFIG} (mimscale's)")
    lines += ["timm (forward_features -> [B, 1 + L, D], the CLS token first):", "  import timm", "  " + timm_snippet(out)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimscale.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/stepN tag, a checkpoints directory or a run's output_dir")
    p.add_argument("--out", required=True, help="export directory (created; must be empty unless --force)")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="write decoder.safetensors (default: when the run has an MAE decoder)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written weights (default fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        config = export_checkpoint(args.checkpoint, args.out, decoder=args.decoder, dtype=args.dtype, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"mimscale.export: error: {e}", file=sys.stderr)
        return 2
    print(summary(config, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
