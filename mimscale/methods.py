"""THE method registry: every masking method is one ``Method`` entry here, and nothing else in
mimscale names a method. config (the ``masking.method`` choices and each method's section),
the model builder, the loop (hooks), metrics (FLOPs), bench and eval all ask this module.

Adding a method = its module (a ``Masker`` in masking/, optionally an objective in objectives/ or
hooks in hooks/) + one entry in ``METHODS`` below; see the README's "Adding a method".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from torch import nn

from mimscale.errors import ConfigError
from mimscale.flops import block_flops, mim_flops_per_image, simmim_flops_per_image
from mimscale.hooks.amt_refresh import NORMALIZE_MODES, AMTRefresh
from mimscale.hooks.base import LoopContext, LoopHooks
from mimscale.hooks.ema import EMAHooks
from mimscale.masking import extractor as frozen_extractor
from mimscale.masking.amt import AMTMasking
from mimscale.masking.automae import EXTRACTORS, AutoMAEMasking
from mimscale.masking.base import Masker, plan_sizes
from mimscale.masking.blockwise import BlockwiseMasking
from mimscale.masking.coarse import CoarseMasking
from mimscale.masking.extractor import ATTENTION
from mimscale.masking.random import RandomMasking
from mimscale.models.decoder import MAEDecoder
from mimscale.models.mim import MIMModel
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder
from mimscale.objectives.cmae import POOLS, VIEWS, CMAEObjective
from mimscale.objectives.rmae import RMAEObjective
from mimscale.objectives.simmim import SimMIMObjective
from mimscale.weights import extractor_state


# ---------------------------------------------------------------- the methods' config sections
@dataclass
class AMTConfig:
    # amt and amt_simmim both read these keys (one AMT, one refresh schedule, whichever the base).
    # The defaults are the paper's MAE setting; its SimMIM setting is r = 0.44, t = 0.26, which
    # amt_simmim's presets set (amt_simmim_vit_base.yaml).
    mask_ratio: float = 0.45  # r: first rL of the attention-weighted order are masked
    throw_ratio: float = 0.40  # t: the next tL are thrown (in no encoder, decoder or loss)
    # When to refresh the attention store: epochs ("40") or a share of the run ("10%").
    # Before the first refresh: random masking at masking.mask_ratio.
    first_refresh: str = "40"
    refresh_every: str = "40"
    refresh_batch: int = 0  # images per attention forward; 0: 4 x the micro batch
    # mean_then_minmax: the paper's Algorithm 1 (heads' CLS attention averaged, then scaled to
    # [0, 1]); minmax_then_mean: each head scaled first (up to 0.49 apart per patch)
    normalize: Literal[tuple(NORMALIZE_MODES)] = "mean_then_minmax"


Extractor = Literal[EXTRACTORS]


@dataclass
class AutoMAEConfig:
    extractor: Extractor = "online"  # online | ema | frozen | stored (AMT's store, on masking.amt's schedule)
    # frozen: a local weights file (.safetensors/.pt; timm's or mimscale's keys), a mimscale
    # checkpoint or export; never downloaded
    extractor_checkpoint: str = ""
    # frozen: the checkpoint's timm model name (e.g. vit_small_patch16_224 for DINO-S); empty: the
    # architecture of the checkpoint's own model section, else of model.name
    extractor_model: str = ""
    extractor_img_size: int = 0  # frozen: the extractor's input size; 0: the timm model's own (else the encoder's)
    attention: Literal[tuple(ATTENTION)] = "raw"  # raw: softmax rows (the paper's); stretched: per-head min-max
    ema_decay: float = 0.999  # ema: per optimizer step
    lam: float = 0.2  # weight of the generator's adversarial loss
    throw_ratio: float = 0.0  # > 0: the generator's order also picks thrown patches (as AMT)


@dataclass
class RMAEConfig:
    lam: float = 1.0  # weight of the auto-encoding (constraint) term on the second view


@dataclass
class CMAEConfig:
    temperature: float = 0.2  # InfoNCE softmax temperature (the paper's)
    momentum: float = 0.996  # EMA of the target encoder, projector and mask token, per optimizer step
    proj_hidden: int = 2048  # projector and predictor: 2-layer MLPs with GELU (the paper's appendix)
    proj_dim: int = 768
    color_jitter: bool = True  # SimSiam's colour augmentation, drawn per view
    # independent: T2's mask drawn on its own (complementary masks identify the pair by position
    # alone, see objectives/cmae.py); complementary: T2 = not T1 (the paper's Eq. 6)
    views: Literal[VIEWS] = "independent"
    mask_token: bool = True  # masked positions enter the encoder as a learned token (the paper's default)
    pool: Literal[POOLS] = "cls"  # the view's code: the CLS token (MoCo v3) or the mean patch token


@dataclass
class SimMIMConfig:
    # Side of SimMIM's square mask unit in pixels (the paper's 32: 2 x 2 patches of a ViT-B/16). A
    # multiple of the patch size that divides model.img_size; simmim masks masking.mask_ratio of
    # the units at random, amt_simmim plans AMT on this unit grid.
    mask_patch_size: int = 32


@dataclass
class BlockwiseConfig:
    min_block: int = 4  # patches in the smallest block (BEiT: 16 at 14 x 14)
    max_aspect: float = 3.0  # blocks' aspect ratio in [1/a, a]


# ---------------------------------------------------------------- the entry
@dataclass(frozen=True)
class Method:
    """One masking method. ``cfg`` is the run's Config; ``encoder`` a ViTEncoder.

    masker(cfg, encoder) -> Masker             which patches are visible / masked / thrown
    objective(cfg, encoder, decoder) -> Module  a loss other than MAE's pixel loss (None: MAE's)
    hooks(cfg, ctx) -> LoopHooks                what the method needs from the loop (None: nothing)
    flops(cfg, visible, masked) -> float        training FLOPs per image at those plan sizes
    section: (name, dataclass)                  its keys under ``masking.<name>``
    check(cfg)                                  raises ConfigError naming the key (runs for every
                                                entry, so a preset's unused sections stay valid)
    needs_decoder                               False: no pixel decoder is built (it would hold
                                                parameters that never get a gradient)
    uses_store(cfg)                             the masker reads AMT's attention maps (meta ``attn``)
    preset                                      the ViT-B preset bench uses (None: not benchmarked)
    alias                                       another name bench and the README use (random: mae)
    """

    name: str
    masker: Callable[..., Masker]
    objective: Optional[Callable[..., nn.Module]] = None
    hooks: Optional[Callable[..., LoopHooks]] = None
    flops: Optional[Callable[..., float]] = None
    section: Optional[tuple[str, type]] = None
    check: Optional[Callable[..., None]] = None
    needs_decoder: bool = True
    uses_store: Callable[..., bool] = lambda cfg: False
    preset: Optional[str] = None
    alias: Optional[str] = None


def _spec(cfg):
    spec = ENCODERS[cfg.model.name]
    return spec, cfg.model.patch_size or spec.patch_size


def reconstruction_flops(cfg, visible: int, masked: int) -> float:
    """MAE's step: encoder on the visible tokens, decoder on visible + masked (flops.py)."""
    spec, patch = _spec(cfg)
    m = cfg.model
    return mim_flops_per_image(spec.dim, spec.depth, m.img_size, patch, visible, masked, m.decoder_dim, m.decoder_depth,
                               spec.mlp_ratio)


def _rmae_flops(cfg, visible: int, masked: int) -> float:
    """Each view through encoder and decoder; the second also decodes its own tokens."""
    _, patch = _spec(cfg)
    second = reconstruction_flops(cfg, masked, visible)
    return reconstruction_flops(cfg, visible, masked) + second + 3.0 * 2.0 * masked * cfg.model.decoder_dim * patch * patch * 3


def _simmim_flops(cfg, visible: int, masked: int) -> float:
    """SimMIM (and AMT on it): the encoder on visible + masked (mask) tokens, the linear head."""
    spec, patch = _spec(cfg)
    return simmim_flops_per_image(spec.dim, spec.depth, cfg.model.img_size, patch, visible, masked, spec.mlp_ratio)


def _cmae_flops(cfg, visible: int, masked: int) -> float:
    """Two online views (forward + backward) and two target views (forward), each on all L tokens
    (V without mask tokens); projector and predictor on one code per view."""
    spec, patch = _spec(cfg)
    L = visible + masked
    c = cfg.masking.cmae
    tokens = L if c.mask_token else visible
    enc = 2.0 * L * patch * patch * 3 * spec.dim + spec.depth * block_flops(1 + tokens, spec.dim, spec.mlp_ratio)
    heads = 2.0 * (spec.dim * c.proj_hidden + c.proj_hidden * c.proj_dim)  # projector
    online = enc + heads + 2.0 * 2 * c.proj_hidden * c.proj_dim  # + predictor
    return 2 * (3.0 * online + enc + heads)


# ---------------------------------------------------------------- checks
def _when(key: str, text: str, allow_zero: bool) -> None:
    """A refresh time: a number of epochs or a percentage of the run."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) if s.endswith("%") else float(s)
    except ValueError:
        raise ConfigError(f"config key '{key}' = {text!r}: expected epochs (e.g. 40 or 0.5) or a share of the run (e.g. 10%)") from None
    if v < 0 or (v == 0 and not allow_zero) or (s.endswith("%") and v > 100):
        raise ConfigError(f"config key '{key}' = {text!r} must be {'>= 0' if allow_zero else '> 0'} (percentages at most 100%)")


def _check_amt(cfg) -> None:
    a = cfg.masking.amt
    for key, v in (("masking.amt.mask_ratio", a.mask_ratio), ("masking.amt.throw_ratio", a.throw_ratio)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key '{key}' = {v} must be in [0, 1)")
    if a.mask_ratio <= 0 or a.mask_ratio + a.throw_ratio >= 1.0:
        raise ConfigError(f"config keys 'masking.amt.mask_ratio' + 'masking.amt.throw_ratio' = {a.mask_ratio} + {a.throw_ratio} "
                          "must leave some patches masked and some visible (mask_ratio > 0, sum < 1)")
    _when("masking.amt.first_refresh", a.first_refresh, allow_zero=True)
    _when("masking.amt.refresh_every", a.refresh_every, allow_zero=False)
    if a.refresh_batch < 0:
        raise ConfigError(f"config key 'masking.amt.refresh_batch' = {a.refresh_batch} must be >= 0 (0: 4 x micro batch)")


def _check_automae(cfg) -> None:
    u = cfg.masking.automae
    if cfg.masking.method == "automae":
        if u.extractor == "frozen" and not u.extractor_checkpoint:
            raise ConfigError("config key 'masking.automae.extractor_checkpoint' must name a checkpoint when "
                              "masking.automae.extractor is 'frozen'")
        if not 0.0 <= u.throw_ratio < 1.0 or cfg.masking.mask_ratio + u.throw_ratio >= 1.0:
            raise ConfigError(f"config keys 'masking.mask_ratio' + 'masking.automae.throw_ratio' = {cfg.masking.mask_ratio} + "
                              f"{u.throw_ratio} must leave some patches visible (throw_ratio in [0, 1), sum < 1)")
    if not 0.0 <= u.ema_decay < 1.0:
        raise ConfigError(f"config key 'masking.automae.ema_decay' = {u.ema_decay} must be in [0, 1)")
    if u.lam < 0:
        raise ConfigError(f"config key 'masking.automae.lam' = {u.lam} must be >= 0")
    if u.extractor_img_size < 0:
        raise ConfigError(f"config key 'masking.automae.extractor_img_size' = {u.extractor_img_size} must be >= 0 (0: the model's own)")


def _check_rmae(cfg) -> None:
    if cfg.masking.rmae.lam < 0:
        raise ConfigError(f"config key 'masking.rmae.lam' = {cfg.masking.rmae.lam} must be >= 0")


def _check_cmae(cfg) -> None:
    c = cfg.masking.cmae
    if c.temperature <= 0:
        raise ConfigError(f"config key 'masking.cmae.temperature' = {c.temperature} must be > 0")
    if not 0.0 <= c.momentum < 1.0:
        raise ConfigError(f"config key 'masking.cmae.momentum' = {c.momentum} must be in [0, 1)")
    for key, v in (("masking.cmae.proj_hidden", c.proj_hidden), ("masking.cmae.proj_dim", c.proj_dim)):
        if v <= 0:
            raise ConfigError(f"config key '{key}' = {v} must be > 0")


def _check_simmim(cfg) -> None:
    """masking.simmim (read by simmim and amt_simmim): a mask unit that tiles the image in whole
    patches, and unit-grid plans that keep some units visible and some masked."""
    mps = cfg.masking.simmim.mask_patch_size
    key = "masking.simmim.mask_patch_size"
    if mps <= 0:
        raise ConfigError(f"config key '{key}' = {mps} must be > 0")
    name = of(cfg).name
    if name not in ("simmim", "amt_simmim"):
        return  # another method: the unit is unused, so any positive size stays valid
    _, patch = _spec(cfg)
    img = cfg.model.img_size
    if mps % patch or img % mps:
        raise ConfigError(f"config key '{key}' = {mps} must be a multiple of the patch size {patch} and divide "
                          f"model.img_size {img} (e.g. {2 * patch} when {img} is a multiple of it)")
    units = (img // mps) ** 2
    try:
        plan_sizes(units, cfg.masking.mask_ratio)
    except ValueError:
        raise ConfigError(f"config keys 'masking.mask_ratio' = {cfg.masking.mask_ratio} and '{key}' = {mps}: "
                          f"random masking of {units} units leaves none visible or none masked (a smaller unit gives more units)") from None
    if name == "amt_simmim":
        a = cfg.masking.amt
        try:
            plan_sizes(units, a.mask_ratio, a.throw_ratio)
        except ValueError:
            raise ConfigError(f"config keys 'masking.amt.mask_ratio' + 'masking.amt.throw_ratio' = {a.mask_ratio} + "
                              f"{a.throw_ratio} and '{key}' = {mps}: AMT's plan over {units} units leaves none "
                              "visible or none masked") from None


def _check_blockwise(cfg) -> None:
    b = cfg.masking.blockwise
    if b.min_block < 1:
        raise ConfigError(f"config key 'masking.blockwise.min_block' = {b.min_block} must be >= 1")
    if b.max_aspect < 1:
        raise ConfigError(f"config key 'masking.blockwise.max_aspect' = {b.max_aspect} must be >= 1")


# ---------------------------------------------------------------- builders
def _cmae_objective(cfg, encoder) -> nn.Module:
    c = cfg.masking.cmae
    return CMAEObjective(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.color_jitter, views=c.views,
                         mask_token=c.mask_token, pool=c.pool, mask_ratio=cfg.masking.mask_ratio)


def _frozen_extractor(cfg, encoder) -> nn.Module:
    """AutoMAE's frozen extractor: a timm ViT with the checkpoint's weights (masking/extractor.py).
    Without a timm name its architecture is the checkpoint's own model section, else model.name's."""
    a = cfg.masking.automae
    state, section = extractor_state(a.extractor_checkpoint)
    section = section or {"name": cfg.model.name, "img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size}
    spec = ENCODERS[section["name"]]
    return frozen_extractor.build(state, a.extractor_checkpoint, a.extractor_model, spec, section["patch_size"] or spec.patch_size,
                                  section["img_size"], encoder.grid, encoder.patch_size, a.attention, a.extractor_img_size)


def _automae_masker(cfg, encoder) -> Masker:
    m, a = cfg.masking, cfg.masking.automae
    frozen = _frozen_extractor(cfg, encoder) if a.extractor == "frozen" else None
    return AutoMAEMasking(encoder, m.mask_ratio, a.throw_ratio, a.lam, a.extractor, frozen, a.attention)


def _unit_grid(cfg, encoder) -> tuple[int, int]:
    """(unit grid side, patches per unit side) of SimMIM's masking.simmim.mask_patch_size units."""
    k = cfg.masking.simmim.mask_patch_size // encoder.patch_size
    return encoder.grid // k, k


def _simmim_masker(cfg, encoder) -> Masker:
    """SimMIM's random masking of masking.mask_ratio of the units (as its MaskGenerator)."""
    g, k = _unit_grid(cfg, encoder)
    return CoarseMasking(RandomMasking(g * g, cfg.masking.mask_ratio), encoder.grid, k)


def _amt_simmim_masker(cfg, encoder) -> Masker:
    """AMT planned on SimMIM's unit grid, as the AMT authors' SimMIM code (each unit's weight is
    the mean of the attention map over it; whole units are masked, thrown or visible); random
    unit masking at masking.mask_ratio until the first refresh (plain SimMIM)."""
    g, k = _unit_grid(cfg, encoder)
    a = cfg.masking.amt
    return CoarseMasking(AMTMasking(g * g, a.mask_ratio, a.throw_ratio, warmup_ratio=cfg.masking.mask_ratio), encoder.grid, k)


def _automae_hooks(cfg, ctx: LoopContext) -> Optional[LoopHooks]:
    a = cfg.masking.automae
    if a.extractor == "stored":
        return AMTRefresh(ctx)
    if a.extractor == "ema":
        module = ctx.engine.module
        return EMAHooks(list(zip(module.encoder.parameters(), module.masker.ema.parameters())), a.ema_decay)
    return None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("random", alias="mae", preset="mae_vit_base.yaml",
           masker=lambda cfg, enc: RandomMasking(enc.num_patches, cfg.masking.mask_ratio)),
    Method("amt", preset="amt_vit_base.yaml", section=("amt", AMTConfig), check=_check_amt, uses_store=lambda cfg: True,
           masker=lambda cfg, enc: AMTMasking(enc.num_patches, cfg.masking.amt.mask_ratio, cfg.masking.amt.throw_ratio,
                                              warmup_ratio=cfg.masking.mask_ratio),
           hooks=lambda cfg, ctx: AMTRefresh(ctx)),
    Method("automae", preset="automae_vit_base.yaml", section=("automae", AutoMAEConfig), check=_check_automae,
           masker=_automae_masker, hooks=_automae_hooks,
           uses_store=lambda cfg: cfg.masking.automae.extractor == "stored"),
    # R-MAE / C-MAE: random masking's two sets are the two complementary views
    Method("rmae", section=("rmae", RMAEConfig), check=_check_rmae, flops=_rmae_flops,
           masker=lambda cfg, enc: RandomMasking(enc.num_patches, cfg.masking.mask_ratio),
           objective=lambda cfg, enc, dec: RMAEObjective(enc, dec, lam=cfg.masking.rmae.lam, norm_pix=cfg.model.norm_pix_loss)),
    Method("cmae", section=("cmae", CMAEConfig), check=_check_cmae, flops=_cmae_flops, needs_decoder=False,
           masker=lambda cfg, enc: RandomMasking(enc.num_patches, cfg.masking.mask_ratio),
           objective=lambda cfg, enc, dec: _cmae_objective(cfg, enc),
           hooks=lambda cfg, ctx: EMAHooks(ctx.engine.module.objective.ema_pairs(), cfg.masking.cmae.momentum)),
    # BEiT's block-wise masking: the README's example of adding a method
    Method("blockwise", section=("blockwise", BlockwiseConfig), check=_check_blockwise,
           masker=lambda cfg, enc: BlockwiseMasking(enc.grid, cfg.masking.mask_ratio, cfg.masking.blockwise.min_block,
                                                    cfg.masking.blockwise.max_aspect)),
    # SimMIM: mask tokens in the encoder, a linear head, L1 on masked pixels; masking.simmim's units
    Method("simmim", preset="simmim_vit_base.yaml", section=("simmim", SimMIMConfig), check=_check_simmim,
           flops=_simmim_flops, needs_decoder=False, masker=_simmim_masker,
           objective=lambda cfg, enc, dec: SimMIMObjective(enc)),
    # AMT on SimMIM: masking.amt's ratios and refresh schedule (presets: r 0.44, t 0.26), thrown
    # units in neither the encoder nor the loss
    Method("amt_simmim", preset="amt_simmim_vit_base.yaml", flops=_simmim_flops, needs_decoder=False,
           uses_store=lambda cfg: True, masker=_amt_simmim_masker,
           objective=lambda cfg, enc, dec: SimMIMObjective(enc), hooks=lambda cfg, ctx: AMTRefresh(ctx)),
)}

MethodName = Literal[tuple(METHODS)]


def of(cfg) -> Method:
    """The entry of the run's method (``masking.method``): the one place that key is read."""
    return get(cfg.masking.method)


def select(name: str) -> str:
    """The ``--set`` override that selects method ``name`` (or its alias)."""
    return f"masking.method={get(name).name}"


def get(name: str) -> Method:
    """The entry for ``masking.method`` = ``name`` (or its alias)."""
    for m in METHODS.values():
        if name in (m.name, m.alias):
            return m
    allowed = ", ".join(n for m in METHODS.values() for n in (m.name, m.alias) if n)
    raise ConfigError(f"config key 'masking.method' = {name!r} is not allowed; allowed values: {allowed}")


def sections() -> list[tuple[str, type]]:
    """Every method's config section (name, dataclass), in registry order."""
    return [m.section for m in METHODS.values() if m.section is not None]


def check_all(cfg) -> None:
    for m in METHODS.values():
        if m.check is not None:
            m.check(cfg)


def model_flops(cfg, visible: int, masked: int) -> float:
    """Training FLOPs per image of ``cfg``'s method at plan sizes (visible, masked)."""
    m = of(cfg)
    return (m.flops or reconstruction_flops)(cfg, visible, masked)


def build_hooks(cfg, ctx: LoopContext) -> LoopHooks:
    """The method's loop hooks; ``LoopHooks()`` (which does nothing) when it has none."""
    m = of(cfg)
    return (m.hooks(cfg, ctx) if m.hooks is not None else None) or LoopHooks()


def build_model(cfg) -> MIMModel:
    """Encoder, decoder (if the method needs one), masker and objective from a Config."""
    method = of(cfg)
    spec = ENCODERS[cfg.model.name]
    encoder = ViTEncoder(spec, img_size=cfg.model.img_size, patch_size=cfg.model.patch_size)
    m = cfg.model
    decoder = MAEDecoder(spec.dim, encoder.grid, encoder.patch_size, dim=m.decoder_dim, depth=m.decoder_depth,
                         heads=m.decoder_heads) if method.needs_decoder else None
    masker = method.masker(cfg, encoder)
    objective = method.objective(cfg, encoder, decoder) if method.objective is not None else None
    return MIMModel(encoder, decoder, masker, norm_pix=m.norm_pix_loss, objective=objective)


def section_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """The sections as dataclass fields (for config.MaskingConfig)."""
    return [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections()]
