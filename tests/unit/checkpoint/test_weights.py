"""mimscale.checkpoint.weights: every accepted input kind reads to the same encoder; one check names bad keys.

The DeepSpeed checkpoint is written here in zero_to_fp32's ZeRO-2 layout by 2 ranks (no launch):
one model-states file with the parameter shapes, one optimizer shard per rank holding its slice of
the flat fp32 master weights, the COMPLETE marker and config.yaml that mimscale saves beside them.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from mimscale import export
from mimscale.checkpoint import weights
from mimscale.models.decoder import MAEDecoder
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder

MODEL = {"name": "vit_tiny", "img_size": 32, "patch_size": 8}
RUN_MODEL = dict(MODEL, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
WORLD = 2


@pytest.fixture(scope="module")
def trained():
    """A tiny encoder and decoder with non-init weights (every tensor perturbed)."""
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8).eval()
    dec = MAEDecoder(192, 4, 8, dim=32, depth=1, heads=2).eval()
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    return enc, dec


def write_zero2(tag, params: dict, step: int = 5, config: bool = True) -> None:
    """``params`` {MIMModel key: tensor} as a 2-rank ZeRO-2 checkpoint in ``tag`` (what
    get_fp32_state_dict_from_zero_checkpoint reads): the flat fp32 vector [N] padded to a multiple
    of 2 x world, split into equal rank slices."""
    tag.mkdir(parents=True)
    flat = torch.cat([v.detach().float().reshape(-1) for v in params.values()])
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % (2 * WORLD))])
    torch.save({"module": {}, "buffer_names": [], "shared_params": {}, "ds_version": "0.19.8",
                "param_shapes": [OrderedDict((k, v.shape) for k, v in params.items())]}, tag / "mp_rank_00_model_states.pt")
    for r, part in enumerate(flat.chunk(WORLD)):
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": WORLD,
                                             "single_partition_of_fp32_groups": [part.clone()]}},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    if config:
        (tag / "config.yaml").write_text(yaml.safe_dump({"model": RUN_MODEL}))
    (tag / "COMPLETE").write_text(json.dumps({"step": step, "world_size": WORLD}))


@pytest.fixture(scope="module")
def run(trained, tmp_path_factory):
    """A run's output_dir holding one checkpoint of the whole MIMModel (encoder, decoder, a masker)."""
    enc, dec = trained
    out = tmp_path_factory.mktemp("run")
    params = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
              **{f"decoder.{k}": v for k, v in dec.state_dict().items()}, "masker.proj.weight": torch.ones(3, 5)}
    write_zero2(out / "checkpoints" / "step00000005", params)
    return out


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_locate_tells_checkpoints_exports_and_files(run, trained, tmp_path):
    tag = run / "checkpoints" / "step00000005"
    for path in (tag, tag.parent, run):  # a tag, a checkpoints folder, an output_dir: the newest complete tag
        src = weights.locate(path)
        assert (src.kind, src.path, src.config, src.stamp) == ("checkpoint", tag, tag / "config.yaml", tag / "COMPLETE")
    assert weights.model_section(weights.locate(run)) == MODEL
    assert weights.run_model(weights.locate(run)) == RUN_MODEL

    exp = tmp_path / "exp"
    export.write_export(exp, RUN_MODEL, trained[0].state_dict())
    for path in (exp, exp / "mimscale.json", exp / "config.json", exp / "model.safetensors"):  # config.json: timm's
        src = weights.locate(path)
        assert (src.kind, src.path, src.config, src.stamp) == ("export", exp / "model.safetensors", exp / "mimscale.json",
                                                               exp / "model.safetensors")
        assert weights.model_section(src) == MODEL

    plain = tmp_path / "plain.pt"
    torch.save(trained[0].state_dict(), plain)
    assert weights.locate(plain) == weights.Weights("file", plain, None)
    with pytest.raises(FileNotFoundError, match="has no mimscale.json beside it"):
        weights.model_section(weights.locate(plain))
    with pytest.raises(FileNotFoundError, match=r"--checkpoint '.*nowhere' does not exist \(no such file"):
        weights.locate(tmp_path / "nowhere", "--checkpoint")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint: expected a checkpoints/stepNNNNNNNN"):
        weights.locate(tmp_path)


def _encoder_tensors(path):
    """What AutoMAE's frozen extractor reads, less the position embedding (ViTEncoder has none to compare)."""
    state, _ = weights.extractor_state(path)
    return {k: v for k, v in state.items() if k != "pos_embed"}


def test_every_kind_reads_to_the_encoders_own_state(run, trained, tmp_path):
    """timm's file (learned pos_embed, head: dropped), wrapped and prefixed pickles, an export and a
    checkpoint (consolidated, the decoder and masker left out) give the same encoder tensors."""
    enc, dec = trained
    want = enc.state_dict()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    vit.load_state_dict({**vit.state_dict(), **want})
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    torch.save({"model": {f"module.encoder.{k}": v for k, v in want.items()} | {"module.decoder.norm.weight": torch.ones(32)},
                "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({"state_dict": {"module": {f"model.{k}": v for k, v in want.items()}}}, tmp_path / "nested.pth")
    torch.save({k: v.half() for k, v in want.items()}, tmp_path / "half.bin")  # read back in fp32
    export.write_export(tmp_path / "exp", RUN_MODEL, want)
    for path in ("timm.safetensors", "wrapped.pt", "nested.pth", "exp", "exp/model.safetensors", run):
        got = _encoder_tensors(tmp_path / path)
        assert _same(got, want), path
        assert {v.dtype for v in got.values()} == {torch.float32}
    learned, section = weights.extractor_state(tmp_path / "timm.safetensors")
    torch.testing.assert_close(learned["pos_embed"], vit.pos_embed.detach())  # the extractor keeps timm's own
    assert section is None and weights.extractor_state(tmp_path / "exp")[1]["name"] == RUN_MODEL["name"]
    half = _encoder_tensors(tmp_path / "half.bin")
    assert all(torch.equal(half[k], v.half().float()) for k, v in want.items())
    assert not torch.distributed.is_initialized()  # consolidation is file reading: no process group
    with pytest.raises(FileNotFoundError, match=r"masking.automae.extractor_checkpoint '.*gone.pt' does not exist"):
        _encoder_tensors(tmp_path / "gone.pt")


def test_export_round_trip_from_a_checkpoint(run, trained, tmp_path):
    enc, dec = trained
    cfg = export.export_checkpoint(run, tmp_path / "exp")
    tag = run / "checkpoints" / "step00000005"
    assert cfg["mimscale"] == {"model": MODEL, "source_checkpoint": str(tag.resolve()), "step": 5}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = enc(x)  # [2, 1 + 16, 192]
        for path in (run, tmp_path / "exp"):
            encoder, model = weights.load_encoder(path)
            assert model == MODEL and not encoder.training
            assert torch.equal(encoder(x), want), path
    decoder, section = weights.load_decoder(tmp_path / "exp")
    assert section == cfg["decoder"] and _same(decoder.state_dict(), dec.state_dict())
    assert not export.export_checkpoint(run, tmp_path / "enc", decoder=False).get("decoder")
    with pytest.raises(FileNotFoundError, match="holds no decoder"):
        weights.load_decoder(tmp_path / "enc")
    with pytest.raises(ValueError, match="is not a mimscale checkpoint directory"):
        export.export_checkpoint(tmp_path / "exp", tmp_path / "again")


def test_checked_state_names_missing_and_misshapen_keys(trained):
    enc, _ = trained
    state = dict(enc.state_dict())
    assert list(weights.checked_state({**state, "extra": torch.ones(1)}, enc, "encoder")) == list(state)
    del state["norm.weight"], state["cls_token"]
    with pytest.raises(ValueError, match=r"the encoder weights in /x lack 2 of \d+ tensors, e.g. \['cls_token', 'norm.weight'\]"):
        weights.checked_state(state, enc, "encoder", "/x")
    with torch.device("meta"):  # a reference without memory, as export uses
        small = weights.build_encoder(dict(MODEL, patch_size=16))
    with pytest.raises(ValueError, match=r"do not fit the model in the config: patch_embed.proj.weight \(192, 3, 8, 8\) "
                                         r"!= \(192, 3, 16, 16\)"):
        weights.checked_state(enc.state_dict(), small, "encoder")


def test_load_encoder_refuses_what_does_not_fit_by_name(run, trained, tmp_path):
    enc, _ = trained
    exp = tmp_path / "exp"
    export.write_export(exp, RUN_MODEL, enc.state_dict())
    save_file({k: v for k, v in enc.state_dict().items() if k != "norm.bias"}, str(exp / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder weights in .*model.safetensors lack 1 of .*\['norm.bias'\]"):
        weights.load_encoder(exp)
    save_file(enc.state_dict(), str(exp / "model.safetensors"))
    cfg = json.loads((exp / "mimscale.json").read_text())
    cfg["mimscale"]["model"] = dict(MODEL, patch_size=4)
    (exp / "mimscale.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not fit the model in the config: .*\(192, 3, 8, 8\) != \(192, 3, 4, 4\)"):
        weights.load_encoder(exp)
    cfg["mimscale"]["model"] = dict(MODEL, name="vit_nope")
    (exp / "mimscale.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mimscale.json: model.name 'vit_nope' is not one of vit_tiny"):
        weights.load_encoder(exp)


def test_broken_checkpoints_are_named(run, trained, tmp_path):
    params = {f"encoder.{k}": v for k, v in trained[0].state_dict().items()}
    write_zero2(tmp_path / "bare" / "checkpoints" / "step00000001", params, config=False)
    with pytest.raises(FileNotFoundError, match=r"has no config.yaml \(nor has its run folder"):
        weights.load_encoder(tmp_path / "bare")
    assert _same(_encoder_tensors(tmp_path / "bare"), trained[0].state_dict())  # no model needed
    lost = tmp_path / "lost" / "step00000001"
    write_zero2(lost, params)
    (lost / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"written by 2 ranks\) is incomplete: missing \*zero_pp_rank_1_"):
        weights.load_encoder(lost)
    cut = tmp_path / "cut" / "step00000001"
    write_zero2(cut, params)
    (cut / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"checkpoint .*step00000001 could not be consolidated"):
        _encoder_tensors(cut)
