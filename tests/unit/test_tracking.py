"""MLflow tracking never stops training (mimscale/tracking.py)."""
import json
import os
import socket
import subprocess
import sys
import textwrap


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once we return


def _run_tracker(tmp_path, env_extra):
    code = textwrap.dedent(f"""
        from mimscale.tracking import Tracker
        t = Tracker(True, {str(tmp_path)!r}, "exp", "run-a")
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
    """Run ``body`` after ``from mimscale.tracking import *`` in a fresh process (MLflow keeps its
    active run and URI in globals); its ``print("OUT", json)`` line comes back as a dict."""
    code = "import json, os, time\nfrom mimscale.tracking import Tracker, write_resolved_config\n" + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [x for x in r.stdout.splitlines() if x.startswith("OUT ")]
    return r, json.loads(out[0][4:])


def test_system_metrics_sampled_and_the_users_interval_wins(tmp_path):
    r, out = _tracker_script(tmp_path, f"""
        t = Tracker(True, {str(tmp_path)!r}, "exp", "run-sys", system_metrics=True)
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
        t = Tracker(True, {str(tmp_path)!r}, "exp", "run-cfg", system_metrics=False)
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
    from mimscale import tracking
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
    from mimscale import tracking

    class FlakyMLflow:
        def __init__(self, failures):
            self.failures, self.logged = failures, []

        def log_metrics(self, metrics, step, timestamp, synchronous):
            if self.failures:
                self.failures -= 1
                raise ConnectionError("503 from the proxy")
            self.logged.append(step)

    monkeypatch.setattr(tracking, "BACKOFF_S", 0.0)
    monkeypatch.setattr(tracking, "MAX_FAILURES", 4)

    def tracker(failures):
        t = tracking.Tracker(False, ".", "exp", "run")
        t.active, t.run_id, t._mlflow = True, "r", FlakyMLflow(failures)
        return t

    t = tracker(failures=3)  # three failures in a row, then the server answers
    for step in range(1, 7):
        t.log_metrics({"loss": 1.0}, step)
    assert t.active and t._mlflow.logged == [4, 5, 6] and t.failures == 0
    err = capsys.readouterr().err
    assert err.count("retrying in") == 3 and "answers again after 3 failed calls" in err

    t = tracker(failures=100)  # down for good: off after MAX_FAILURES calls in a row, said once
    for step in range(1, 10):
        t.log_metrics({"loss": 1.0}, step)
    assert not t.active and t._mlflow.logged == []
    assert capsys.readouterr().err.count("training continues without tracking") == 1

    monkeypatch.setattr(tracking, "BACKOFF_S", 60.0)  # inside a back-off, calls are skipped, not sent
    t = tracker(failures=1)
    t.log_metrics({"loss": 1.0}, 1)
    t.log_metrics({"loss": 1.0}, 2)
    assert t.active and t._mlflow.failures == 0 and t._mlflow.logged == []
