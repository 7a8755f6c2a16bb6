"""MLflow tracking never stops training (mimscale/tracking.py); dataset records and eval results for it."""
import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once we return


def _run_tracker(tmp_path, env_extra):
    code = textwrap.dedent(f"""
        from mimscale.tracking.tracker import Tracker
        t = Tracker({str(tmp_path)!r}, experiment="exp", run_name="run-a")
        t.log_params({{"a.b": 1}})
        t.log_metrics({{"loss": 1.5}}, step=1)
        t.log_metrics({{"loss": 1.0}}, step=2)
        print("ACTIVE", t.active, t.run_id, t.uri)
        t.end()
    """)
    env = {**os.environ, **env_extra}
    env.pop("MLFLOW_TRACKING_URI", None) if "MLFLOW_TRACKING_URI" not in env_extra else None
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_local_store_under_output_dir(tmp_path):
    r = _run_tracker(tmp_path, {})
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("ACTIVE")][0]
    _, active, run_id, uri = line.split()
    assert active == "True" and uri == f"sqlite:///{tmp_path}/mlflow.db"
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["a.b"] == "1"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.5, 1.0]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_server_down_warns_once_and_continues(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    r = _run_tracker(tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr
    assert "ACTIVE False None" in r.stdout
    assert r.stderr.count("WARNING: MLflow") == 1
    assert "training continues without tracking" in r.stderr


def _tracker_script(tmp_path, body: str, env_extra: dict) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``body`` after ``from mimscale.tracking.tracker import *`` in a fresh process (MLflow keeps its
    active run and URI in globals); its ``print("OUT", json)`` line comes back as a dict."""
    code = "import json, os, time\nfrom mimscale.tracking.tracker import Tracker, write_resolved_config\n" + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [x for x in r.stdout.splitlines() if x.startswith("OUT ")]
    return r, json.loads(out[0][4:])


def test_system_metrics_sampled_and_the_users_interval_wins(tmp_path):
    r, out = _tracker_script(tmp_path, f"""
        t = Tracker({str(tmp_path)!r}, experiment="exp", run_name="run-sys", system_metrics=True)
        time.sleep(3)  # 4 samples 0.25 s apart per logged point: several points
        print("OUT", json.dumps({{"run": t.run_id, "uri": t.uri,
                                  "interval": os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"],
                                  "samples": os.environ["MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"]}}))
        t.end()
    """, {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.25"})
    assert out["interval"] == "0.25" and out["samples"] == "4"  # the user's interval, our default averaging
    import mlflow

    client = mlflow.tracking.MlflowClient(out["uri"])
    keys = {k for k in client.get_run(out["run"]).data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    assert len(client.get_metric_history(out["run"], "system/cpu_utilization_percentage")) >= 1


def test_config_artifacts_no_system_metrics_and_a_failed_encoder_export_only_warns(tmp_path):
    preset = tmp_path / "presets" / "config.yaml"  # named like the resolved config: kept apart under config/preset/
    preset.parent.mkdir()
    preset.write_text("model:\n  name: vit_tiny\n")
    ds = tmp_path / "zero3.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 4}')
    r, out = _tracker_script(tmp_path, f"""
        t = Tracker({str(tmp_path)!r}, experiment="exp", run_name="run-cfg", system_metrics=False)
        resolved = write_resolved_config({str(tmp_path)!r}, {{"model": {{"name": "vit_tiny", "img_size": 32}}}})
        t.log_run_config(resolved, {str(preset)!r}, {str(ds)!r})
        exported = t.log_encoder({str(tmp_path / "no-such-run")!r}, {str(tmp_path / "export")!r})
        t.log_metrics({{"loss": 1.0}}, step=1)  # tracking goes on after the failed export
        print("OUT", json.dumps({{"run": t.run_id, "uri": t.uri, "active": t.active, "exported": exported,
                                  "interval": os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}}))
        t.end()
    """, {})
    assert out["active"] and out["exported"] is None and out["interval"] is None
    assert "WARNING: could not export the encoder" in r.stderr and "no-such-run" in r.stderr
    assert not (tmp_path / "export").exists()
    import mlflow
    import yaml

    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"model": {"name": "vit_tiny", "img_size": 32}}
    client = mlflow.tracking.MlflowClient(out["uri"])
    run = client.get_run(out["run"])
    assert not [k for k in run.data.metrics if k.startswith("system/")] and run.data.metrics["loss"] == 1.0
    listed = {a.path for a in client.list_artifacts(out["run"], "config")}
    assert listed == {"config/config.yaml", "config/zero3.json", "config/preset"}
    assert [a.path for a in client.list_artifacts(out["run"], "config/preset")] == ["config/preset/config.yaml"]


def test_run_tags_name_method_model_preset_code_and_job(monkeypatch, tmp_path):
    from mimscale.tracking import tracker as tracking
    from tests.conftest import tiny_config

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = tracking.run_tags(tiny_config("amt"))
    assert (tags["mimscale.method"], tags["mimscale.model"], tags["mimscale.job_id"]) == ("amt", "vit_tiny", "slurm_job_id=4242")
    assert "mimscale.preset" in tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.dirname(tracking.__file__)),
                          capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: its commit
        assert tags["mimscale.git_commit"].split("-")[0] == head.stdout.strip()
    # in an image without git: the version make docker built in
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("MIMSCALE_VERSION", "0.3.1-4-gabc")
    assert tracking.code_version() == "0.3.1-4-gabc"


def test_a_transient_outage_is_retried_and_only_a_persistent_one_turns_tracking_off(monkeypatch, capsys):
    from mlflow.entities import Metric

    from mimscale.tracking import tracker as tracking

    class FlakyClient:
        """log_batch fails ``failures`` times, then stores what it is sent."""

        def __init__(self, failures):
            self.failures, self.stored = failures, []

        def log_batch(self, run_id, metrics, synchronous):
            if self.failures:
                self.failures -= 1
                raise ConnectionError("503 from the proxy")
            self.stored.extend((m.step, m.value) for m in metrics)

    monkeypatch.setattr(tracking, "BACKOFF_S", 0.0)
    monkeypatch.setattr(tracking, "MAX_FAILURES", 4)

    def tracker(failures):
        t = tracking.Tracker.disabled()
        t.active, t.run_id, t._client, t._Metric = True, "r", FlakyClient(failures), Metric
        return t

    def log(t, step):
        t.log_metrics({"loss": float(step)}, step)
        t.flush(timeout=5)  # the send in flight (this test's steps are each sent once)

    t = tracker(failures=3)  # three failed sends in a row, then the server answers: nothing is lost
    for step in range(1, 7):
        t.log_metrics({"loss": float(step)}, step)  # never waits: failed sends are re-sent with the next
    assert t.flush(timeout=5) and t.active and t.failures == 0
    assert t._client.stored == [(s, float(s)) for s in range(1, 7)]  # every step, in order, once
    err = capsys.readouterr().err
    assert err.count("retrying in") == 3 and "answers again after 3 failed calls" in err

    t = tracker(failures=100)  # down for good: off after MAX_FAILURES sends in a row, said once
    for step in range(1, 10):
        log(t, step)
    assert not t.active and t._client.stored == []
    assert capsys.readouterr().err.count("training continues without tracking") == 1

    monkeypatch.setattr(tracking, "BACKOFF_S", 60.0)  # inside a back-off, metrics wait in the outbox
    t = tracker(failures=1)
    log(t, 1)
    t.log_metrics({"loss": 2.0}, 2)
    assert t.active and t._client.failures == 0 and t._client.stored == []
    assert [(m.step, m.value) for m in t._outbox] == [(1, 1.0), (2, 2.0)]
    t.retry_at = 0.0  # the back-off is over: the next log sends all three, oldest first
    log(t, 3)
    assert t._client.stored == [(1, 1.0), (2, 2.0), (3, 3.0)] and not t._outbox


def test_dataset_records_name_digest_source_and_counts(tmp_path):
    from data_prep.manifest import dump_json
    from mimscale.config import DataConfig
    from mimscale.data.describe import describe
    from mimscale.data.imagenet import list_split
    from mimscale.data.sources import FfcvFile, FolderSource, SyntheticSource
    from tests.unit.eval.test_eval import write_folder

    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"format": "mimscale-wds/1", "split": "train", "num_samples": 7, "num_files": 8, "classes": ["a", "b", "c"],
                "shards": [{"name": "train-000000.tar", "count": 4}, {"name": "train-000001.tar", "count": 3},
                           {"name": "train-000002.tar", "count": 0}], "skipped": [{"index": 5}], "converted": []}
    (shards / "train-manifest.json").write_bytes(dump_json(manifest))
    rec = describe(DataConfig(source="wds", path=str(shards)), None)
    sha = hashlib.sha256((shards / "train-manifest.json").read_bytes()).hexdigest()
    assert (rec.name, rec.sha256, rec.digest, rec.source_type, rec.source) == ("shards/train", sha, sha[:16], "local",
                                                                               {"uri": str(shards.resolve())})
    assert {k: rec.profile[k] for k in ("num_samples", "num_shards", "num_classes", "num_files", "skipped")} == \
        {"num_samples": 7, "num_shards": 2, "num_classes": 3, "num_files": 8, "skipped": 1}
    manifest["shards"][0]["sha256"] = "changed"  # other shard bytes: another digest
    (shards / "train-manifest.json").write_bytes(dump_json(manifest))
    assert describe(DataConfig(source="wds", path=str(shards)), None).digest != rec.digest

    root = write_folder(tmp_path / "imagenet", {"train": 2}, classes=3)
    cfg = DataConfig(source="folder", path=str(root))
    rec = describe(cfg, FolderSource(root, "train"))
    assert (rec.name, rec.source) == ("imagenet/train", {"uri": str((root / "train").resolve())})
    assert rec.sha256 == list_split(root, "train").fingerprint()  # what data_prep's manifests record as listing_sha256
    assert (rec.profile["num_samples"], rec.profile["num_classes"]) == (6, 3)

    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x" * 10)
    rec = describe(DataConfig(source="ffcv", path=str(beton)), FfcvFile(beton, 5))
    assert rec.name == "train" and rec.profile["num_samples"] == 5 and "no .beton.json" in rec.profile["digest_of"]
    (tmp_path / "train.beton.json").write_bytes(dump_json({"format": "mimscale-ffcv/1", "sha256": "ab", "classes": ["a"]}))
    rec = describe(DataConfig(source="ffcv", path=str(beton)), FfcvFile(beton, 5))
    assert rec.profile["file_sha256"] == "ab" and rec.profile["num_classes"] == 1

    syn = DataConfig(source="synthetic", synthetic_count=64)
    rec = describe(syn, SyntheticSource(64, seed=1234))
    assert (rec.source_type, rec.profile["num_samples"]) == ("code", 64)
    assert rec.digest != describe(syn, SyntheticSource(64, seed=1235)).digest


def test_eval_results_become_metrics_and_the_target_run_is_resolved(tmp_path, monkeypatch, capsys):
    from mimscale.eval import mlflow_run

    probe = {"pool": "mean", "probe_top1": 0.5, "probe_top5": 0.75, "probe_train_top1": 1.0, "n_train": 48, "classes": 4}
    assert mlflow_run.metrics_of("probe", probe) == {"eval/mean/probe_top1": 0.5, "eval/mean/probe_top5": 0.75,
                                                     "eval/mean/probe_train_top1": 1.0}
    cka = mlflow_run.metrics_of("cka", {"cka": {0.25: [0.9, 0.7], 0.5: [0.8, 0.4]}, "tokens": "kept"})
    assert cka == pytest.approx({"eval/cka_kept/r0.25/mean": 0.8, "eval/cka_kept/r0.25/last": 0.7,
                                 "eval/cka_kept/r0.50/mean": 0.6, "eval/cka_kept/r0.50/last": 0.4})

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clients = []
    summary = {"mlflow_run_id": "abc", "mlflow_tracking_uri": "sqlite:///x.db"}
    assert mlflow_run._resolve("run", summary, clients.append) == (None, "abc") and clients == ["sqlite:///x.db"]
    assert mlflow_run._resolve("none", summary, clients.append) == (None, None)
    assert mlflow_run._resolve("run", None, clients.append) == (None, None)  # random: or a foreign file: a note
    assert "results not logged to MLflow" in capsys.readouterr().err
    with pytest.raises(mlflow_run.TargetError, match="--mlflow-run new: no tracking store"):
        mlflow_run._resolve("new", None, clients.append)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")  # the environment's store wins
    assert mlflow_run._resolve("run", summary, clients.append) == (None, "abc") and clients[-1] == "http://team:5000"
    assert mlflow_run.run_target("0a1b2c") == "0a1b2c"
    with pytest.raises(argparse.ArgumentTypeError, match="expected run, new, none or an MLflow run id"):
        mlflow_run.run_target("latest")
