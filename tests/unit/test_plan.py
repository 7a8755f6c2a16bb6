"""python -m mimscale.plan and its parts (mimscale/planning/): the meta-device activation trace on
the tiny model against real CPU tensors for every method, its linearity in the batch, precision,
attention kernel and checkpointing as inputs, model states against DeepSpeed's own estimators, and
the command (table, JSON, recommendation, errors). The ViT-L / ViT-H validation is in
test_plan_validation.py."""
from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from mimscale import methods, plan
from mimscale.methods import METHODS
from mimscale.planning.activations import estimate_activations, meta_batch, meta_model, trace_saved
from mimscale.planning.model_states import buffers, count_params, model_states, zero_config
from tests.conftest import make_batch, tiny_config

REPO = Path(__file__).resolve().parents[2]
HUGE = "mimscale/configs/mae_vit_huge.yaml"
BF16_Z1 = "ds_configs/gpu_bf16_zero1.json"
# The tiny model's 4 x 4 grid: SimMIM's units of 2 x 2 patches, and AMT's ratios that leave a unit of each kind
ENTRY_SETS = {
    "simmim": ["masking.simmim.mask_patch_size=16"],
    "amt_simmim": ["masking.simmim.mask_patch_size=16", "masking.mask_ratio=0.5", "masking.amt.mask_ratio=0.5",
                   "masking.amt.throw_ratio=0.25"],
}


def _cfg(method, *sets):
    return tiny_config(method, *ENTRY_SETS.get(method, []), *sets)


def real_saved(model, images, meta) -> int:
    """Bytes of the distinct storages autograd keeps after a real forward (not parameters or
    buffers), keyed by data pointer; a storage freed during the forward (its tensors dead) and
    its address reused counts once, as the new one."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, tuple[int, list]] = {}

    def pack(t):
        t = t.detach()  # an output kept with its grad_fn would hold its own node: a cycle gc cannot free
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in skip and s.nbytes():
            entry = kept.get(ptr)
            if entry is None or all(r() is None for r in entry[1]):
                kept[ptr] = entry = (s.nbytes(), [])
            entry[1].append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images, meta)
    total = sum(n for n, refs in kept.values() if any(r() is not None for r in refs))
    del out
    return total


@pytest.mark.parametrize("name", list(METHODS))
def test_the_meta_trace_keeps_what_a_real_forward_keeps(name):
    """Every method on the tiny model, fp32 on the CPU (its flash SDPA): the estimate at batch 2
    (from meta traces at 1 and 2) equals the bytes real tensors keep."""
    cfg = _cfg(name)
    est = estimate_activations(cfg, "fp32", "fused", 0)
    torch.manual_seed(0)
    model = methods.build_model(cfg).train()
    images, meta = make_batch(2, 32)
    if est.store_phase:
        meta["attn"] = torch.rand(2, model.encoder.num_patches).half()
    measured = real_saved(model, images, meta)
    assert est.saved(2) == pytest.approx(measured, rel=0.01), name
    if methods.of(cfg).uses_store(cfg):  # the other phase too: with AMT's stored maps, thrown patches
        meta["attn"] = torch.rand(2, model.encoder.num_patches).half()
        m = meta_model(cfg, "fp32", 0)
        assert trace_saved(m, *meta_batch(m, 2, store=True)).saved == pytest.approx(real_saved(model, images, meta), rel=0.01)


def test_the_estimate_is_linear_in_the_batch_and_follows_checkpointing():
    cfg = _cfg("random")
    est = estimate_activations(cfg, "fp32", "fused", 0)
    m = meta_model(cfg, "fp32", 0)
    assert est.saved(16) == pytest.approx(trace_saved(m, *meta_batch(m, 16)).saved, rel=1e-6)
    ck = estimate_activations(cfg, "fp32", "fused", 1)
    assert ck.saved_per_image < 0.5 * est.saved_per_image  # every block keeps its input only
    assert ck.transient_per_image > est.transient_per_image  # plus one recomputed block in the backward
    with pytest.raises(ValueError, match="precision 'fp16'"):
        estimate_activations(cfg, "fp16")


def test_precision_and_attention_kernel_are_inputs():
    cfg = tiny_config("random", "model.img_size=64")  # 8 x 8 patches: 65 decoder tokens
    fp32 = estimate_activations(cfg, "fp32", "fused", 0)
    bf16 = estimate_activations(cfg, "bf16", "fused", 0)
    math = estimate_activations(cfg, "fp32", "math", 0)
    # bf16 halves what the blocks keep; LayerNorm statistics, logsumexp and the fp32 loss stay 4 bytes
    assert 0.5 < bf16.saved_per_image / fp32.saved_per_image < 0.6
    # math keeps each block's softmax [H, N, N] instead of the fused kernel's logsumexp [H, N] (q, k, v
    # copies there, the qkv output the views are of here: 3 N D either way); vit_tiny: 12 blocks x 3
    # heads on 1 + 16 tokens, the decoder 1 block x 4 heads on 1 + 64
    heads_tokens = [(3, 17)] * 12 + [(4, 65)]
    assert math.saved_per_image - fp32.saved_per_image == sum(4 * h * (n * n - n) for h, n in heads_tokens)


def test_model_states_are_deepspeeds_estimators_with_the_stated_adjustments():
    cfg = _cfg("cmae")  # a frozen EMA target beside the trained parameters
    counts = count_params(meta_model(cfg))
    P, N = counts.trainable, 8
    raw = json.loads((REPO / BF16_Z1).read_text())
    z = {s: zero_config(raw, s) for s in (1, 2, 3)}
    s2 = model_states(counts, 2, N, "bf16", z[2])
    assert s2.deepspeed == estimate_zero2_model_states_mem_needs(P, N, 1, cpu_offload=False)[1] == 2 * P + 18 * P // N
    assert s2.adjustments == {"frozen_parameters": 2 * counts.frozen} and counts.frozen > 0
    s1 = model_states(counts, 1, N, "bf16", z[1])
    assert s1.total == pytest.approx(s2.total + 2 * P * (1 - 1 / N))  # ZeRO-1 keeps every gradient
    assert model_states(counts, 1, 1, "bf16", z[1]).total == model_states(counts, 2, 1, "bf16", z[2]).total
    s3 = model_states(counts, 3, N, "bf16", z[3])
    assert s3.deepspeed == estimate_zero3_model_states_mem_needs(P, counts.largest_layer, N, 1, False, False, True)[1]
    assert s3.adjustments["zero3_persistent"] == 2 * counts.persistent(100_000) * (1 - 1 / N)
    f2 = model_states(counts, 2, N, "fp32", z[2])  # 4-byte parameters whole, 4-byte gradient partitions
    assert f2.total - s2.total == pytest.approx(2 * P + 2 * P / N + 2 * counts.frozen)


def test_buffers_follow_the_ds_config():
    counts = count_params(meta_model(_cfg("random")))
    gpu = json.loads((REPO / BF16_Z1).read_text())
    assert buffers(counts, 1, "bf16", zero_config(gpu, 1))["reduce_buckets"] == 2 * 50_000_000 * 2  # overlap_comm: two
    z3 = buffers(counts, 3, "bf16", zero_config(gpu, 3))
    assert z3["reduce_buckets"] == 50_000_000 * 2 and z3["prefetch_bucket"] == 50_000_000 * 2
    cpu = json.loads((REPO / "ds_configs/cpu_fp32_zero1.json").read_text())
    assert "reduce_buckets" not in buffers(counts, 1, "fp32", zero_config(cpu, 1))  # contiguous_gradients off
    assert counts.buffer_bytes > 0


@pytest.fixture(scope="module")
def huge_plan():
    """The issue's command, as a user runs it: stdout is the JSON alone (DeepSpeed's log lines go to stderr)."""
    out = subprocess.run([sys.executable, "-m", "mimscale.plan", "--config", HUGE, "--deepspeed_config", BF16_Z1, "--gpus", "64",
                          "--gpu-mem-gib", "80", "--json"], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout)


def test_the_huge_plan_recommends_zero1_without_checkpointing(huge_plan):
    p = huge_plan
    assert (p["precision"], p["attention"], p["micro_batch"], p["global_batch"]) == ("bf16", "fused", 128, 4096)
    assert [(r["zero_stage"], r["grad_ckpt"]) for r in p["rows"]] == [(s, k) for s in (1, 2, 3) for k in (0, 1)]
    rec = p["recommendation"]
    assert (rec["zero_stage"], rec["grad_ckpt"]) == (1, 0)
    assert rec["micro_batch"] * rec["grad_accum"] * rec["gpus"] == 4096 and rec["micro_batch"] == 64
    assert rec["deepspeed_config"] == BF16_Z1 and "--set train.micro_batch=64" in rec["args"]
    for r in p["rows"]:
        parts = r["model_states_gib"] + r["buffers_gib"] + r["activations_gib"] + r["margin_gib"]
        assert r["total_gib"] == pytest.approx(parts, abs=0.01)
        assert r["fits"] == (r["total_gib"] <= 80)
    z1 = p["rows"][0]
    assert z1["model_states_gib"] > p["rows"][2]["model_states_gib"] > p["rows"][4]["model_states_gib"]  # ZeRO 1 > 2 > 3
    assert p["rows"][1]["max_micro_batch"] > 5 * z1["max_micro_batch"]  # checkpointing


def test_max_micro_batch_is_the_boundary():
    cfg = _cfg("random")
    counts = count_params(meta_model(cfg))
    raw = json.loads((REPO / BF16_Z1).read_text())
    act = estimate_activations(cfg, "bf16", "fused", 0)
    row = plan.Row(2, 0, model_states(counts, 2, 8, "bf16", zero_config(raw, 2)), buffers(counts, 2, "bf16", zero_config(raw, 2)),
                   act, 0.1, 2**30)
    mem = 1.5 * 2**30
    m = row.max_micro(mem)
    assert m > 0 and row.total(m) <= mem < row.total(m + 1)


def test_the_command_prints_the_table_and_json(capsys):
    argv = ["--config", "mimscale/configs/mae_vit_base.yaml", "--deepspeed_config", BF16_Z1, "--gpus", "8"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "ZeRO  grad_ckpt  model states  buffers  activations  margin   total  fits  max micro batch" in out
    assert "recommended for global batch 4096 on 8 GPUs: ZeRO-1, grad_ckpt 0" in out
    assert plan.main(argv + ["--json", "--precision", "fp32", "--attention", "math", "--micro-batch", "16"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["precision"], p["attention"], p["micro_batch"]) == ("fp32", "math", 16)


def test_what_must_change_when_the_preferred_choice_does_not_fit(capsys):
    base = ["--config", HUGE, "--deepspeed_config", BF16_Z1, "--json"]
    # 512 images per GPU: ZeRO-1 and 2 fit fewer than 32 at 8 GiB, ZeRO-3 more (its model states are smaller)
    assert plan.main(base + ["--gpus", "8", "--gpu-mem-gib", "8"]) == 0
    p = json.loads(capsys.readouterr().out)
    rec = p["recommendation"]
    assert (rec["zero_stage"], rec["grad_ckpt"], rec["micro_batch"]) == (3, 0, 32)
    assert "ZeRO-1 grad_ckpt 0: at most micro" in p["why"] and "ZeRO-2 grad_ckpt 0: at most micro" in p["why"]
    assert plan.main(base + ["--gpus", "8", "--gpu-mem-gib", "5"]) == 0  # no stage without checkpointing reaches 32
    p = json.loads(capsys.readouterr().out)
    assert (p["recommendation"]["zero_stage"], p["recommendation"]["grad_ckpt"]) == (2, 1)
    assert plan.main(base + ["--gpus", "8", "--gpu-mem-gib", "3"]) == 0  # below 32 everywhere: the most that fits
    p = json.loads(capsys.readouterr().out)
    assert (p["recommendation"]["zero_stage"], p["recommendation"]["grad_ckpt"]) == (3, 1) and "fits the most" in p["why"]
    assert plan.main(base + ["--gpus", "8", "--gpu-mem-gib", "2"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["recommendation"] is None and "nothing fits 2 GiB" in p["why"]
    assert plan.main(base + ["--gpus", "48"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["recommendation"] is None and "not divisible by 48 GPUs" in p["why"] and "32" in p["why"]


@pytest.mark.parametrize("argv, names", [
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "8", "--gpu-mem-gib", "0"], "--gpu-mem-gib"),
    (["--gpus", "8", "--margin", "1.5"], "--margin"),
    (["--gpus", "8", "--micro-batch", "0"], "--micro-batch"),
    (["--gpus", "8", "--precision", "fp16"], "--precision"),
    (["--gpus", "8", "--attention", "flash"], "--attention"),
    (["--gpus", "8", "--config", "nope.yaml"], "--config"),
    (["--gpus", "8", "--deepspeed_config", "nope.json"], "--deepspeed_config"),
])
def test_bad_options_exit_2_naming_the_option(argv, names, capsys):
    base = {"--config": HUGE, "--deepspeed_config": BF16_Z1}
    for flag, value in base.items():
        if flag not in argv:
            argv = argv + [flag, value]
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2 and names in capsys.readouterr().err


def test_a_bad_config_key_or_ds_config_exits_2(tmp_path, capsys):
    assert plan.main(["--config", HUGE, "--deepspeed_config", BF16_Z1, "--gpus", "8", "--set", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err
    bad = tmp_path / "fp16.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": True}}))
    assert plan.main(["--config", HUGE, "--deepspeed_config", str(bad), "--gpus", "8"]) == 2
    assert "fp16 is not supported" in capsys.readouterr().err


def test_sibling_ds_config():
    assert plan.sibling_ds_config(BF16_Z1, 3) == "ds_configs/gpu_bf16_zero3.json"
    assert plan.sibling_ds_config("elsewhere/my.json", 2) is None
