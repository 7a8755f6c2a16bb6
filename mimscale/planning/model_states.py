"""Model states and buffers per GPU under each ZeRO stage.

DeepSpeed's own estimators give the model states (``estimate_zero2_model_states_mem_needs`` in
deepspeed/runtime/zero/stage_1_and_2.py and ``estimate_zero3_model_states_mem_needs`` in stage3.py,
the functions behind the ``..._all_cold`` printers, without offload). They assume 16-bit
parameters and Adam, for P trainable parameters on N GPUs:

    ZeRO-2  2P + 18P / N       16-bit parameters whole on every GPU; 16-bit gradients, fp32 gradients,
                               fp32 master weights and Adam's two moments (2 + 4 + 4 + 8) partitioned
    ZeRO-3  4 Lmax + 18P / N   all partitioned; Lmax: the most parameters one module holds directly,
                               gathered whole for its forward and backward

What they leave out is added as named adjustments (each in the planner's JSON):

    zero1_whole_gradients   DeepSpeed has no ZeRO-1 estimator. ZeRO-1 partitions the optimizer
                            states only: each GPU keeps every gradient, so ZeRO-2's estimate with
                            the 16-bit gradients whole: + 2P (1 - 1/N) (= ZeRO-2's at N = 1)
    fp32_parameters         fp32 engines (the CPU configs): parameters in 4 bytes, not 2
    gradients               gradients in 4 bytes (fp32 engines, or data_types.grad_accum_dtype fp32:
                            ZeRO-1 then keeps the 16-bit gradient and an fp32 accumulator whole)
    frozen_parameters       parameters without gradient (C-MAE's EMA target, AutoMAE's EMA or frozen
                            extractor): their copy only, no gradient or optimizer state
    zero3_persistent        ZeRO-3 keeps parameters of at most stage3_param_persistence_threshold
                            elements whole on every GPU (biases, norms)

Buffers: the model's own (fp32: DeepSpeed casts parameters only) and DeepSpeed's communication
buckets as the ds_config sets them (DeepSpeed's defaults otherwise): ZeRO-1/2 with
contiguous_gradients hold one reduce bucket of reduce_bucket_size gradient elements, two with
overlap_comm; ZeRO-3 one reduce bucket and a prefetch bucket of stage3_prefetch_bucket_size
parameters. The CUDA context, NCCL and the allocator's fragmentation are the planner's (plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from pydantic import ValidationError
from torch import nn

from mimscale.errors import ConfigError

STAGES = (1, 2, 3)
PARAM_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class ParamCounts:
    """What model states depend on, counted on a model (the meta one will do: sizes only)."""

    trainable: int  # parameters with requires_grad: gradients and optimizer states
    frozen: int  # parameters without
    largest_layer: int  # DeepSpeed's model_to_params (stage 3): the most parameters one module holds directly
    numels: tuple[int, ...]  # each parameter's size (ZeRO-3's persistence threshold is per parameter)
    buffer_bytes: int  # the model's buffers (position embeddings, normalizer, spectral-norm vectors), fp32

    def persistent(self, threshold: int) -> int:
        """Elements of the parameters ZeRO-3 keeps whole (at most ``threshold`` elements each)."""
        return sum(n for n in self.numels if n <= threshold)


def count_params(model: nn.Module) -> ParamCounts:
    params = list(model.parameters())  # parameters() yields each shared parameter once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamCounts(trainable=sum(p.numel() for p in params if p.requires_grad),
                       frozen=sum(p.numel() for p in params if not p.requires_grad), largest_layer=largest,
                       numels=tuple(p.numel() for p in params),
                       buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()))


def zero_config(raw: dict, stage: int, name: str = "ds_config") -> DeepSpeedZeroConfig:
    """The ds_config's zero_optimization section with ``stage`` in place of its own, DeepSpeed's
    defaults filled in (its validator: overlap_comm defaults to on at stage 3 only)."""
    section = raw.get("zero_optimization") or {}
    try:
        return DeepSpeedZeroConfig(**{**section, "stage": stage})
    except ValidationError as e:
        raise ConfigError(f"{name}: 'zero_optimization' is not valid for DeepSpeed: {e}") from None


def grad_accum_fp32(raw: dict) -> bool:
    """Whether the ds_config accumulates gradients in fp32 (``data_types.grad_accum_dtype``)."""
    return str((raw.get("data_types") or {}).get("grad_accum_dtype", "")).lower() in ("fp32", "float32", "float")


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU: DeepSpeed's estimate and the adjustments, by name."""

    deepspeed: int  # what DeepSpeed's estimator returns for the trainable parameters
    adjustments: dict

    @property
    def total(self) -> float:
        return self.deepspeed + sum(self.adjustments.values())


def model_states(counts: ParamCounts, stage: int, gpus: int, precision: str, zero: DeepSpeedZeroConfig,
                 accum_fp32: bool = False) -> ModelStates:
    """Parameters, gradients and AdamW states on one of ``gpus`` GPUs at ZeRO ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage {stage}: the planner covers stages {STAGES}")
    P, N, pb = counts.trainable, gpus, PARAM_BYTES[precision]
    if stage < 3:
        _, ds = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=N, num_nodes=1, cpu_offload=False)
    else:
        _, ds, _ = estimate_zero3_model_states_mem_needs(P, counts.largest_layer, num_gpus_per_node=N, num_nodes=1,
                                                         cpu_offload=False, cpu_offload_params=False, zero_init=True)
    share = 1.0 if stage < 3 else 1.0 / N  # of a parameter copy each GPU holds
    adj = {}
    if stage == 1:
        adj["zero1_whole_gradients"] = 2 * P * (1 - 1 / N)
    if pb != 2:
        adj["fp32_parameters"] = (pb - 2) * P * share
    if stage == 1:  # whole gradients: the engine's dtype, and an fp32 accumulator beside 16-bit ones
        extra = (pb - 2) + (4 if accum_fp32 and pb == 2 else 0)
        if extra:
            adj["gradients"] = extra * P
    else:  # partitioned gradients, 4 bytes with fp32 accumulation or an fp32 engine
        extra = (4 if accum_fp32 else pb) - 2
        if extra:
            adj["gradients"] = extra * P / N
    if counts.frozen:
        adj["frozen_parameters"] = pb * counts.frozen * share
    if stage == 3:
        adj["zero3_persistent"] = pb * counts.persistent(zero.param_persistence_threshold) * (1 - 1 / N)
    return ModelStates(int(ds), adj)


def buffers(counts: ParamCounts, stage: int, precision: str, zero: DeepSpeedZeroConfig, accum_fp32: bool = False) -> dict:
    """Bytes per GPU beside model states and activations: the model's buffers and DeepSpeed's
    buckets (see the module docstring), by name."""
    pb = PARAM_BYTES[precision]
    grad_el = 4 if accum_fp32 else pb
    out = {"model_buffers": counts.buffer_bytes}
    if zero.contiguous_gradients:
        copies = 2 if zero.overlap_comm and stage < 3 else 1  # ZeRO-1/2 double-buffer under overlap_comm
        out["reduce_buckets"] = copies * zero.reduce_bucket_size * grad_el
    if stage == 3:
        out["prefetch_bucket"] = zero.prefetch_bucket_size * pb
    return out
