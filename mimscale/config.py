"""Run configuration: a dataclass tree loaded from a YAML preset plus ``--set a.b=c`` overrides.

The YAML owns everything except engine concerns (micro batch, accumulation, precision, ZeRO stage),
which belong to the DeepSpeed JSON (see ``ds_config.py``); gradient clipping is a recipe choice, so
``train.clip_grad`` sets it (the JSON's ``gradient_clipping`` applies only when the YAML leaves it null). Every key is validated before
any model is built: an unknown key names the allowed keys, a bad value names the allowed values.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch._dynamo
import yaml

from mimscale import methods, shipped
from mimscale.data.device_decode import check_available as check_decode
from mimscale.data.streams import SOURCES
from mimscale.errors import ConfigError
from mimscale.methods import MethodName
from mimscale.models.registry import ENCODERS
from mimscale.runtime import dist

__all__ = ["Config", "load_config", "validate", "check_paths", "ffcv_installed", "to_dict", "flatten", "get_key", "changes_on_resume",
           "RESUMABLE_CHANGES"]

# Closed choices: the loader refuses any other value, naming the key and these.
EncoderName = Literal[tuple(ENCODERS)]
SourceName = Literal[SOURCES]


@dataclass
class ModelConfig:
    name: EncoderName = "vit_base"  # encoder preset, see models/registry.py
    img_size: int = 224
    patch_size: Optional[int] = None  # None: the preset's patch size
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    # Activation checkpointing of encoder and decoder blocks (non-reentrant; training passes with grad only):
    # 0 off; k >= 1: blocks with index % k == 0 keep only their input and are recomputed in the backward
    # (1: every block). Same losses and gradients; less activation memory for one more forward of those blocks
    grad_ckpt: int = 0
    # Encoder recipe options (off by default: MAE's encoder). SimMIM's recipe (its authors' runs and the
    # AMT authors' SimMIM code): drop_path 0.1, layer_scale 0.1, pos_embed learned (simmim_vit_base.yaml)
    drop_path: float = 0.0  # stochastic depth of the last encoder block, linear from 0 at the first
    layer_scale: Optional[float] = None  # > 0: a learned gain on each block's MLP branch, initialised to this; null: none
    pos_embed: Literal["sincos", "learned"] = "sincos"  # fixed 2-D sin-cos (MAE) or a learned absolute embedding (SimMIM)


# masking.<section> for each method that has one: the sections come from the method registry.
MaskingConfig = dataclasses.make_dataclass("MaskingConfig", [
    ("method", MethodName, field(default="random")),  # one of the registry's names (mimscale/methods/)
    # random masking, AMT's before its first refresh, AutoMAE's, block-wise; R-MAE / C-MAE: the
    # share of the patches in the second view (the first view keeps the rest)
    ("mask_ratio", float, field(default=0.75)),
    *methods.section_fields(),
])


@dataclass
class DataConfig:
    source: SourceName = "synthetic"
    # folder: ImageNet-layout root (holding train/) or a class-folder directory;
    # wds: the shard directory holding <split>-manifest.json; ffcv: the .beton file
    path: str = ""
    split: str = "train"
    num_workers: int = 8
    scale_min: float = 0.2  # RandomResizedCrop area range
    scale_max: float = 1.0
    hflip: float = 0.5
    synthetic_count: int = 50_000  # images in the synthetic set
    synthetic_size: int = 256  # side of synthetic images before the crop
    max_bad_in_a_row: int = 64  # consecutive unreadable files before the loader gives up
    shuffle_buffer: int = 2000  # wds: samples read and permuted together (about 110 KB each at full ImageNet size)
    stall_seconds: float = 600.0  # no batch for this long ends the run naming the source and rank (0: never)
    # JPEG IDCT of training crops: fast (libjpeg's integer IDCT: FFCV's, and TensorFlow's default; ~4-8% less
    # decode time, pixels within a few levels of the accurate one) or accurate (libjpeg's default, PIL's).
    # AMT's whole-image pass always uses fast; FFCV without the crop decoder extension too (its imdecode)
    jpeg_idct: Literal["fast", "accurate"] = "fast"
    # A resume whose data differs from the checkpoint's (the folder's listing, the shards' manifest, the .beton:
    # another count or fingerprint, e.g. files added or removed at the same data.path): refuse stops it (exit 2)
    # naming both counts; allow warns and continues on the new data (the sampler's order and exact resume are lost)
    resume_changes: Literal["refuse", "allow"] = "refuse"
    # Where training JPEGs are decoded (folder and wds): cpu (the loader workers) or nvjpeg (workers read bytes and
    # plan the crops, the training device decodes, crops and resizes batched: torchvision's nvJPEG on a GPU, its
    # libjpeg on a CPU device). Same samples, boxes and flips; pixels within ~1.3 levels (mimscale/data/device_decode.py)
    decode: Literal["cpu", "nvjpeg"] = "cpu"


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # total optimizer steps; overrides epochs when set
    epochs: float = 800
    stop_after: Optional[int] = None  # end this invocation (with a checkpoint) after this step; resume continues
    warmup_epochs: float = 40
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    # Samples per optimizer step, whatever the hardware: accumulation = global_batch / (micro x world),
    # the micro batch from the ds_config. null: the ds_config's micro x accumulation x world (grows with the world).
    global_batch: Optional[int] = None
    # Samples per device per micro step, instead of the ds_config's train_micro_batch_size_per_gpu (null: the
    # JSON's): e.g. --set train.micro_batch=64 on 64 GPUs for a global batch of 4096 from a JSON that says 128.
    micro_batch: Optional[int] = None
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 0.0  # the cosine's floor, an absolute lr (not scaled by global_batch / 256 like base_lr)
    # Gradient clipping (max global L2 norm) is part of the recipe, so the YAML owns it: a number > 0 is
    # handed to DeepSpeed as the ds_config's gradient_clipping (a JSON that sets another non-zero value is
    # refused); 0: no clipping; null: whatever the JSON says (every shipped JSON: 0.0)
    clip_grad: Optional[float] = None
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    log_every: int = 20
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    # > 0: also a checkpoint when this many minutes passed since the last one (rank 0's clock, agreed
    # through the stop-request reduction so every rank saves at the same step); 0: steps only.
    # Minutes keep the cost of saving the same share of the run on any number of GPUs.
    ckpt_every_minutes: float = 0.0
    keep_checkpoints: int = 2  # complete checkpoints kept on disk (older ones are deleted)
    # true: a save stalls training only while this rank's state is copied to host memory; a thread
    # writes and fsyncs the files while training goes on, and the COMPLETE marker follows once every
    # rank's files are on disk (checkpoint/background.py). false: every rank waits for the write.
    ckpt_background: bool = True
    compile: bool = False  # torch.compile the engine's module (pays on GPU)
    compile_backend: str = "inductor"  # any torch.compile backend (aot_eager: checks graphs without codegen)
    seed: int = 0
    threads: int = 0  # torch intra-op threads per rank; 0 = cores / local ranks


@dataclass
class DistConfig:
    # How long a collective may wait for the slowest rank before the process group fails (then
    # every rank exits and the job restarts from its last checkpoint). Long enough for the
    # slowest legitimate wait: rank 0's checkpoint write, an AMT refresh, a first torch.compile.
    timeout_minutes: float = 30.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "mimscale"
    run_name: Optional[str] = None  # None: "<preset>-<time>"
    mask_grid_every: int = 1000  # steps between mask grids (original | masked | reconstruction | + visible | weights); 0: never
    mask_grid_rows: int = 8  # samples per grid
    # MLflow's system/* metrics of rank 0's node (CPU, memory, disk, network; NVIDIA GPUs via nvidia-ml-py),
    # one point a minute (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _SAMPLES_BEFORE_LOGGING change it)
    system_metrics: bool = True
    log_encoder: bool = True  # at the end of a finished run: the final encoder exported for timm, logged as the MLflow model "encoder"
    # CKA occlusion-invariance health check (mimscale/health.py): epochs between checks (0: never)
    # and the fixed whole images it runs on
    cka_every_epochs: float = 10.0
    cka_images: int = 64


@dataclass
class Config:
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto | never | <checkpoint path>
    # refuse: a resume whose config differs from the checkpoint's outside RESUMABLE_CHANGES stops (exit 2)
    # naming each change; allow: the changes take effect (a new base_lr too) and are tagged in MLflow
    resume_changes: Literal["refuse", "allow"] = "refuse"
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preset: str = ""  # file name of the YAML the config came from (set by the loader)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, (dict, list, bool)) or str(value) not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed; allowed values: {', '.join(allowed)}")
        return str(value)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return int(f)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        if not math.isfinite(f):  # a NaN passes every range check below; inf runs forever
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return f
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {hint}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; allowed keys here: {', '.join(names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=40"`` -> (["train", "steps"], 40) with the value parsed as YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value of '{key.strip()}' is not a YAML value ({problem}); "
                          "quote it for a string with brackets or braces") from None
    return key.strip().split("."), value


def read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; a file that is not valid YAML (a tab, a bad indent, an
    unclosed bracket) or not UTF-8 is a ConfigError naming the file, line and column, with the
    offending line and a caret under the column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        lines = text.splitlines()
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if mark is not None and mark.line >= len(lines):
            where += " (the end of the file)"
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context_mark is not None:
            what += f" ({e.context} that starts at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        if "\\t" in what:
            what += "; YAML indents with spaces, not tabs"
        # the offending line, or for a problem at the end of the file the line where the unclosed part starts
        shown_mark = mark if mark is not None and mark.line < len(lines) else e.context_mark
        shown = ""
        if shown_mark is not None and shown_mark.line < len(lines):
            shown = f"\n    {lines[shown_mark.line].replace(chr(9), ' ')}\n    {' ' * shown_mark.column}^"
        raise ConfigError(f"config file {path}{where}: {what}{shown}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def load_config(path: Optional[str | Path] = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a Config from an optional YAML preset and ``key.sub=value`` overrides, then validate."""
    cfg = Config()
    if path is not None:
        path = shipped.resolve_preset(path)  # a file, or a shipped preset's name (mae_vit_base)
        data = read_yaml(path) or {}
        _apply(cfg, data)
        cfg.preset = path.stem
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> None:
    """Range and choice checks that need more than a type; each error names its key."""
    for key in ("model.img_size", "model.decoder_dim", "model.decoder_heads"):
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)} must be > 0")
    if cfg.model.patch_size is not None and cfg.model.patch_size <= 0:
        raise ConfigError(f"config key 'model.patch_size' = {cfg.model.patch_size} must be > 0 (or null for the preset's)")
    patch = cfg.model.patch_size or ENCODERS[cfg.model.name].patch_size
    if cfg.model.img_size % patch:
        raise ConfigError(f"config key 'model.img_size' = {cfg.model.img_size} must be a multiple of the patch size {patch}")
    if not 0.0 < cfg.masking.mask_ratio < 1.0:
        raise ConfigError(f"config key 'masking.mask_ratio' = {cfg.masking.mask_ratio} must be in (0, 1)")
    methods.check_all(cfg)  # each method's own section
    if not 0.0 < cfg.data.scale_min <= cfg.data.scale_max <= 1.0:
        raise ConfigError("config keys 'data.scale_min'/'data.scale_max' must satisfy 0 < min <= max <= 1")
    if not 0.0 <= cfg.data.hflip <= 1.0:
        raise ConfigError(f"config key 'data.hflip' = {cfg.data.hflip} must be in [0, 1]")
    if cfg.data.decode == "nvjpeg" and cfg.data.source not in ("folder", "wds"):
        raise ConfigError(f"config key 'data.decode' = nvjpeg decodes JPEG files: data.source must be folder or wds, not "
                          f"{cfg.data.source!r} (ffcv decodes in its own pipeline, synthetic has no files)")
    if cfg.data.source == "folder" and not cfg.data.path:
        raise ConfigError("config key 'data.path' must name a folder when data.source is 'folder'")
    if cfg.train.ckpt_every_minutes < 0:
        raise ConfigError(f"config key 'train.ckpt_every_minutes' = {cfg.train.ckpt_every_minutes} must be >= 0 (0: steps only)")
    if cfg.dist.timeout_minutes <= 0:
        raise ConfigError(f"config key 'dist.timeout_minutes' = {cfg.dist.timeout_minutes} must be > 0")
    for key in ("train.beta1", "train.beta2"):
        if not 0.0 <= get_key(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)} must be in [0, 1)")
    if cfg.model.grad_ckpt < 0:
        raise ConfigError(f"config key 'model.grad_ckpt' = {cfg.model.grad_ckpt} must be >= 0 (0: off, k: every k-th block)")
    if not 0.0 <= cfg.model.drop_path < 1.0:
        raise ConfigError(f"config key 'model.drop_path' = {cfg.model.drop_path} must be in [0, 1)")
    if cfg.model.layer_scale is not None and cfg.model.layer_scale <= 0:
        raise ConfigError(f"config key 'model.layer_scale' = {cfg.model.layer_scale} must be > 0 (or null: no layer scale)")
    if cfg.train.clip_grad is not None and cfg.train.clip_grad < 0:
        raise ConfigError(f"config key 'train.clip_grad' = {cfg.train.clip_grad} must be >= 0 (0: no clipping; null: the ds_config's)")
    if cfg.model.decoder_dim % 4:
        raise ConfigError(f"config key 'model.decoder_dim' = {cfg.model.decoder_dim} must be divisible by 4 (2-D sin-cos position embedding)")
    if cfg.train.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.train.compile_backend not in backends:
            raise ConfigError(f"config key 'train.compile_backend' = {cfg.train.compile_backend!r} is not allowed; "
                              f"allowed values: {', '.join(sorted(backends))}")
    positive = {
        "train.log_every": cfg.train.log_every,
        "train.ckpt_every": cfg.train.ckpt_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "data.synthetic_count": cfg.data.synthetic_count,
        "data.synthetic_size": cfg.data.synthetic_size,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "model.decoder_depth": cfg.model.decoder_depth,
    }
    if cfg.train.steps is not None:
        positive["train.steps"] = cfg.train.steps
    for key in ("global_batch", "micro_batch"):
        if getattr(cfg.train, key) is not None:
            positive[f"train.{key}"] = getattr(cfg.train, key)
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{key}' = {v} must be > 0")
    if cfg.train.stop_after is not None and cfg.train.stop_after <= 0:
        raise ConfigError(f"config key 'train.stop_after' = {cfg.train.stop_after} must be > 0 (or null)")
    if cfg.train.warmup_steps is not None and cfg.train.warmup_steps < 0:
        raise ConfigError(f"config key 'train.warmup_steps' = {cfg.train.warmup_steps} must be >= 0 (or null)")
    for key in ("data.num_workers", "data.max_bad_in_a_row", "data.stall_seconds", "train.threads", "train.epochs", "train.warmup_epochs",
                "train.base_lr", "train.min_lr", "train.weight_decay"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)} must be >= 0")
    if cfg.train.steps is None and cfg.train.epochs <= 0:
        raise ConfigError("config key 'train.epochs' must be > 0 when 'train.steps' is not set")
    if cfg.model.decoder_dim % cfg.model.decoder_heads:
        raise ConfigError("config key 'model.decoder_dim' must be divisible by 'model.decoder_heads'")
    r = cfg.resume
    if r not in ("auto", "never") and not Path(r).exists():
        raise ConfigError(f"config key 'resume' = {r!r}: allowed values are auto, never, or an existing checkpoint path")
    if cfg.tracking.cka_every_epochs < 0:
        raise ConfigError(f"config key 'tracking.cka_every_epochs' = {cfg.tracking.cka_every_epochs} must be >= 0 (0: never)")
    if cfg.tracking.cka_images < 2:
        raise ConfigError(f"config key 'tracking.cka_images' = {cfg.tracking.cka_images} must be >= 2 (CKA compares images)")
    for key in ("tracking.mask_grid_every", "tracking.mask_grid_rows"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)} must be >= 0")


def ffcv_installed() -> bool:
    """Whether the optional [ffcv] extra is installed (looked up, not imported: numba starts slowly)."""
    return importlib.util.find_spec("ffcv") is not None


def check_paths(cfg: Config) -> None:
    """Checks against this machine's files (kept out of validate() so presets load anywhere)."""
    where = f"(relative paths start at the working directory {Path.cwd()})"
    if cfg.data.source == "ffcv" and not ffcv_installed():
        raise ConfigError(f"config key 'data.source' = 'ffcv': {shipped.FFCV_EXTRA}")
    path = Path(cfg.data.path)
    if cfg.data.source == "folder" and not path.is_dir():
        raise ConfigError(f"config key 'data.path' = {cfg.data.path!r} is not a folder {where}")
    if cfg.data.source == "wds" and not (path / f"{cfg.data.split}-manifest.json").is_file():
        raise ConfigError(f"config key 'data.path' = {cfg.data.path!r} holds no {cfg.data.split}-manifest.json {where}; "
                          f"write shards with: python -m data_prep.wds --src <ImageNet root> --split {cfg.data.split} --out {cfg.data.path}")
    if cfg.data.source == "ffcv" and not path.is_file():
        raise ConfigError(f"config key 'data.path' = {cfg.data.path!r} is not an FFCV .beton file {where}; "
                          f"write one with: python -m data_prep.ffcv --src <ImageNet root> --split {cfg.data.split} --out {cfg.data.path}")
    if cfg.data.decode != "cpu":  # the decoder on this rank's training device (DS_ACCELERATOR=cpu: the CPU)
        check_decode(cfg.data.decode, cfg.data.source, dist.device())


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys a resume may change without resume_changes=allow: the run's length and cadence, the micro batch (hardware), workers,
# tracking, and where things are; anything else changes what is trained (a key ending in "." is a
# whole section).
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.stop_after", "train.log_every", "train.ckpt_every", "train.ckpt_every_minutes",
                     "train.ckpt_background", "train.micro_batch", "train.keep_checkpoints", "train.threads", "data.num_workers",
                     "data.jpeg_idct", "data.resume_changes", "data.decode", "tracking.", "dist.", "output_dir", "resume", "resume_changes",
                     "preset")


def changes_on_resume(saved: dict, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, this run's)} for every key that differs outside RESUMABLE_CHANGES.
    A key the checkpoint's config lacks in a section it has (written by a mimscale before the key
    existed) had its default's behaviour, so it is compared against the default (a preset that now
    sets model.pos_embed: learned is a change). A whole section it lacks (a method's, added later)
    and a key only the checkpoint has (since removed) are not changes."""
    new = flatten(to_dict(cfg))
    old = flatten(saved)
    sections = {k.rsplit(".", 1)[0] for k in old if "." in k}
    defaults = flatten(to_dict(Config()))
    old.update({k: v for k, v in defaults.items() if k not in old and "." in k and k.rsplit(".", 1)[0] in sections})
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE_CHANGES)}
