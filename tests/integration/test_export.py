"""One tracked 2-rank ZeRO-3 CPU run, then: its MLflow run (name, config files, summary, system
metrics, dataset input, encoder model) and `python -m mimscale.export` of its checkpoint (timm reproduces the
encoder, the decoder round-trips, bad inputs are refused by name)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.launch import REPO, TINY, command, env, run_group, summary, write_ds_config

STEPS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The one launch: 3 steps, a checkpoint at the end, MLflow on with system metrics sampled
    every 0.5 s (the default, 15 s x 4, would log nothing in a run this short)."""
    root = tmp_path_factory.mktemp("export")
    ds = write_ds_config(root / "z3.json", 3)
    out = root / "run"
    # 32 steps per epoch here (512 images / 2 ranks / micro 4 / accumulation 2): a CKA health check at step 3
    sets = [f"train.steps={STEPS}", f"train.ckpt_every={STEPS}", "tracking.enabled=true", "resume=never",
            f"tracking.cka_every_epochs={STEPS / 32}", "tracking.cka_images=8"]
    r = run_group(command(ds, out, sets), env={**env(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
                                               "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = summary(out)
    tag = out / "checkpoints" / f"step{STEPS:08d}"
    assert s["steps"] == STEPS and s["zero_stage"] == 3 and s["checkpoint"] == str(tag)
    return {"root": root, "out": out, "tag": tag, "summary": s, "ds": ds}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mimscale.export", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(trained):
    """The CLI export of the run directory (its newest tag), decoder included by default."""
    exp = trained["root"] / "exp"
    r = _cli("--checkpoint", str(trained["out"]), "--out", str(exp), "--dtype", "fp32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return exp, r.stdout


def test_mlflow_run_has_name_configs_summary_system_metrics_dataset_and_encoder(trained):
    import mlflow
    import yaml

    s = trained["summary"]
    client = mlflow.tracking.MlflowClient(s["mlflow_tracking_uri"])
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert re.fullmatch(rf"{TINY.stem}-\d{{8}}-\d{{6}}", run.info.run_name), run.info.run_name
    tags = run.data.tags
    assert (tags["mimscale.method"], tags["mimscale.model"], tags["mimscale.preset"]) == ("random", "vit_tiny", TINY.stem)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", tags["mimscale.git_commit"]) and "mimscale.job_id" in tags

    def listing(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"config", "summary.json"} <= listing()
    assert listing("config") == {"config/config.yaml", "config/z3.json", "config/preset"}
    assert listing("config/preset") == {f"config/preset/{TINY.name}"}

    # the resolved config: written to output_dir and logged, the same as the checkpoint's copy
    resolved = yaml.safe_load((trained["out"] / "config.yaml").read_text())
    assert resolved == yaml.safe_load((trained["tag"] / "config.yaml").read_text())
    assert resolved["model"]["img_size"] == 32 and resolved["tracking"]["system_metrics"] is True
    logged = client.download_artifacts(run.info.run_id, "config/config.yaml", str(trained["root"]))
    assert yaml.safe_load(open(logged)) == resolved

    # the in-training CKA health check ran once, at step 3, on every rank; rank 0 logged it
    cka = {k: v for k, v in run.data.metrics.items() if k.startswith("cka/")}
    assert set(cka) == {f"cka/r{r}/{w}" for r in ("0.25", "0.50", "0.75") for w in ("last", "mean")}
    assert all(0.0 < v <= 1.0 + 1e-6 for v in cka.values()) and s["cka"] == cka
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cka/r0.50/mean")] == [STEPS]

    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, sorted(run.data.metrics)

    # the training data (synthetic here) as the run's dataset input
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.source_type) == ("synthetic", "code")
    assert json.loads(inp.dataset.profile)["num_samples"] == 512

    # the encoder model is the final checkpoint's encoder: its export (no decoder) is the model's artifact
    import mlflow

    from mimscale.checkpoint.weights import load_encoder

    model_uri = tags["mimscale.encoder_model"]
    mlflow.set_tracking_uri(client.tracking_uri)  # a models:/ URI resolves in the global store
    try:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(trained["root"] / "model"))
        model = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    art = os.path.join(local, "artifacts", "export")
    assert set(os.listdir(art)) == {"config.json", "mimscale.json", "model.safetensors"}  # no decoder
    cfg = json.loads(open(os.path.join(art, "mimscale.json")).read())
    assert cfg["mimscale"]["step"] == STEPS and cfg["mimscale"]["source_checkpoint"] == str(trained["tag"].resolve())
    weights = load_file(os.path.join(art, "model.safetensors"))
    encoder, _ = load_encoder(trained["tag"])
    assert all(torch.equal(weights[k], v) for k, v in encoder.state_dict().items())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = encoder(x)[:, 0].numpy()
    assert abs(model.predict(x.numpy()) - want).max() <= 1e-5


def test_timm_reproduces_the_checkpoints_encoder(trained, exported):
    import timm

    from mimscale.checkpoint.weights import load_encoder

    exp, stdout = exported
    hub = json.loads((exp / "config.json").read_text())  # timm's Hub config
    assert hub["architecture"] == "vit_tiny_patch16_224" and hub["num_features"] == 192
    assert {k: hub["model_args"][k] for k in ("patch_size", "embed_dim", "depth", "num_heads")} == \
        {"patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 3}
    # stdout is the summary alone (DeepSpeed's progress goes to stderr), with the line to copy
    assert stdout.startswith(f"exported {trained['tag'].resolve()} (step {STEPS}, vit_tiny 32px/8)")
    assert f"model = timm.create_model('local-dir:{exp.resolve()}', pretrained=True)" in stdout
    encoder, _ = load_encoder(trained["tag"])  # consolidated from the checkpoint, not from the export
    model = timm.create_model(f"local-dir:{exp}", pretrained=True).eval()  # as the summary says
    saved = load_file(str(exp / "model.safetensors"))
    assert set(model.state_dict()) == set(saved)  # nothing missing, nothing unexpected
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = encoder(x)  # [3, 1 + 16, 192]
        got = model.forward_features(x)
        assert got.shape == want.shape == (3, 17, 192)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        again, _ = load_encoder(exp)
        assert torch.allclose(again(x), want, atol=1e-5, rtol=0)


def test_decoder_round_trip(trained, exported):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mimscale.checkpoint.weights import load_decoder

    exp, _ = exported
    tag = trained["tag"]
    full = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    want = {k[len("decoder."):]: v for k, v in full.items() if k.startswith("decoder.")}
    saved = load_file(str(exp / "decoder.safetensors"))
    assert saved.pop("pos_embed").shape == (1, 1 + 16, 128)
    assert set(saved) == set(want) and all(torch.equal(saved[k], v) for k, v in want.items())
    decoder, section = load_decoder(exp)
    assert section == {"encoder_dim": 192, "decoder_dim": 128, "depth": 2, "heads": 4, "mlp_ratio": 4.0,
                       "patch_size": 8, "grid": 4, "norm_pix_loss": True}
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in want.items())


def test_bad_inputs_are_refused_by_name(trained, exported):
    from mimscale.export import export_checkpoint

    root, tag = trained["root"], trained["tag"]
    bad = root / "bad"

    def copy_tag(name: str):
        dst = bad / name / "checkpoints" / tag.name
        shutil.copytree(tag, dst, copy_function=os.link)  # hard links: no copy of the shards
        return dst

    with pytest.raises(FileNotFoundError, match="no such file"):
        export_checkpoint(root / "nowhere", root / "o1")
    cut = copy_tag("cut")
    (cut / "COMPLETE").unlink()  # a save that was cut off
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        export_checkpoint(cut, root / "o2")
    bare = copy_tag("bare")
    (bare / "config.yaml").unlink()  # and no run-level config.yaml beside it either
    (bare / "COMPLETE").unlink()  # a hard link to the source tag's marker: replaced, not written through
    (bare / "COMPLETE").write_text(json.dumps({"step": int(bare.name[4:]), "world_size": 2}))  # as before markers listed files
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        export_checkpoint(bare.parent.parent, root / "o3")
    lost = copy_tag("lost")
    for f in lost.glob("*zero_pp_rank_1_*optim_states.pt"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"damaged checkpoint: .*zero_pp_rank_1_mp_rank_\d+_optim_states.pt is missing"):
        export_checkpoint(lost, root / "o4")
    assert not [p for p in root.iterdir() if p.name.startswith(("o1", "o2", "o3", "o4", ".o"))]  # nothing half-written

    exp, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in exp.iterdir()}
    r = _cli("--checkpoint", str(tag), "--out", str(exp))
    assert r.returncode == 2 and "exists and is not empty: pass --force" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in exp.iterdir()} == before
    cfg = export_checkpoint(tag, exp, decoder=False, force=True)
    assert "decoder" not in cfg and sorted(p.name for p in exp.iterdir()) == ["config.json", "mimscale.json", "model.safetensors"]
