"""Tracking against a real MLflow server (`mlflow server`, started here on a free port), not only a
file store: run tags, metrics, the training data as a dataset input, the encoder as a pyfunc model
that loads back and returns the encoder's features, `python -m mimscale.eval` results in the run
that produced the checkpoint, and metrics that survive a server outage.

One server per module (its start-up is most of this module's time). The outage is a cut TCP proxy
in front of it: new connections are refused and open ones dropped, as when the server goes away,
without paying for a second server start."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from mimscale.checkpoint.weights import build_encoder
from mimscale.data.streams import build_source
from mimscale.eval.__main__ import main as eval_main
from mimscale.export import write_export
from mimscale.tracking import tracker as tracking
from tests.conftest import tiny_config
from tests.unit.eval.test_eval import write_folder

MODEL = {"name": "vit_tiny", "img_size": 32, "patch_size": 8}  # 16 patches
STEP = 3  # the checkpoint step the export names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cli() -> str | None:
    beside = Path(sys.executable).with_name("mlflow")  # the venv's, when pytest runs from it
    return str(beside) if beside.is_file() else shutil.which("mlflow")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free port with a SQLite store and proxied artifacts; its URL."""
    cli = _mlflow_cli()
    if cli is None:
        pytest.skip("the mlflow CLI is not installed (pip install mlflow): no server to test against")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process to start
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([cli, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # a loaded 2-core machine takes a minute to import the server
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"mlflow server not healthy after 240 s: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the uvicorn worker goes too
        try:
            proc.wait(timeout=5)  # else SIGKILL: a graceful stop waits on idle keep-alive clients
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def mlflow_env(monkeypatch):
    """The client settings the Tracker would set, restored afterwards, and MLflow's globals reset."""
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    yield monkeypatch
    if mlflow.active_run() is not None:  # a test that failed half-way
        try:
            mlflow.end_run("FAILED")
        except Exception:  # its server is out of reach (a cut proxy): the failure is reported already
            pass
    mlflow.set_tracking_uri(None)


class CuttableProxy:
    """127.0.0.1:<port> forwarded to ``target``; ``cut()`` closes the listener and every open
    connection (the server is gone), ``restore()`` listens on the same port again."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = _free_port()
        self.conns: list[socket.socket] = []
        self.listener = None
        self.restore()

    def restore(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not, and it would go on accepting)
        except OSError:
            pass
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_run_against_the_server(server, mlflow_env, tmp_path, capsys):
    """Tags, metrics and the dataset input at the start; the encoder model at the end, loaded back
    and compared with the encoder; eval results logged into the run by ``python -m mimscale.eval``."""
    import mlflow

    mlflow_env.setenv("MLFLOW_TRACKING_URI", server)
    data = write_folder(tmp_path / "images", {"train": 3, "val": 2})
    out = tmp_path / "run"
    out.mkdir()
    cfg = tiny_config(None, f"output_dir={out}", "data.source=folder", f"data.path={data}", "tracking.enabled=true")
    tracker = tracking.open_run(cfg, out, run_id=None, derived={"lr": 1e-3}, ds_raw={"train_micro_batch_size_per_gpu": 4},
                                 preset=None, ds_config=None, tags={"mimscale.extra": "x"}, data_source=build_source(cfg.data))
    assert tracker.active and tracker.uri == server
    for step in (1, 2, STEP):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)

    # the end of the run: the encoder (here an export of a seeded random one) as a pyfunc model
    torch.manual_seed(0)
    encoder = build_encoder(MODEL).eval()
    tag = out / "checkpoints" / f"step{STEP:08d}"  # the checkpoint the export says it came from
    export = out / "export"
    write_export(export, MODEL, encoder.state_dict(), source=str(tag), step=STEP)
    model_uri = tracker.log_encoder_model(export)
    tracker.end()
    assert model_uri and model_uri.startswith("models:/")
    (out / "summary.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.uri}))

    client = mlflow.MlflowClient(server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["mimscale.method"], tags["mimscale.model"], tags["mimscale.extra"]) == ("random", "vit_tiny", "x")
    assert {"mimscale.git_commit", "mimscale.job_id", "mimscale.preset"} <= set(tags) and tags["mimscale.encoder_model"] == model_uri
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert run.data.params["derived.lr"] == "0.001" and run.data.params["ds.train_micro_batch_size_per_gpu"] == "4"

    (inp,) = run.inputs.dataset_inputs
    ds = inp.dataset
    assert (ds.name, ds.source_type, json.loads(ds.source)) == ("images/train", "local", {"uri": str((data / "train").resolve())})
    profile = json.loads(ds.profile)
    assert (profile["num_samples"], profile["num_classes"]) == (12, 4) and ds.digest == profile["listing_sha256"][:16]
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}

    model = mlflow.pyfunc.load_model(model_uri)
    sig = model.metadata.signature
    assert sig.inputs.inputs[0].shape == (-1, 3, 32, 32) and sig.outputs.inputs[0].shape == (-1, 192)
    assert model.metadata.metadata["mimscale"]["step"] == STEP
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = encoder(images)  # [4, 1 + 16, 192]
    cls = model.predict(images.numpy())
    mean = model.predict(images.numpy(), params={"pool": "mean"})
    assert cls.shape == (4, 192) and cls.dtype == np.float32
    np.testing.assert_allclose(cls, tokens[:, 0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(1).numpy(), atol=1e-5, rtol=0)
    example = model.input_example  # the normalized mean image: zeros
    assert example.shape == (1, 3, 32, 32) and not example.any()

    # the evaluation of that export: into the run that produced it (its summary.json), at the checkpoint's step
    capsys.readouterr()
    common = ["--checkpoint", str(export), "--data", str(data), "--workers", "0", "--threads", "1", "--cache", str(tmp_path / "cache")]
    assert eval_main(["knn", *common, "--k", "3"]) == 0, capsys.readouterr().err
    assert eval_main(["cka", "--checkpoint", str(export), "--data", str(data), "--images", "4", "--ratios", "0.5",
                      "--threads", "1"]) == 0, capsys.readouterr().err
    assert f"to MLflow run {tracker.run_id}" in capsys.readouterr().err
    run = client.get_run(tracker.run_id)
    knn = [m for m in client.get_metric_history(run.info.run_id, "eval/cls/knn_top1")]
    assert [m.step for m in knn] == [STEP] and 0.0 <= knn[0].value <= 1.0
    assert {"eval/cka_kept/r0.50/mean", "eval/cka_kept/r0.50/last"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED"  # left as it was
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert logged == {f"eval/knn-cls-step{STEP}.json", f"eval/cka-kept-step{STEP}.json"}

    # --mlflow-run new: a run of its own in the same experiment, pointing at the producing run
    assert eval_main(["knn", *common, "--k", "3", "--mlflow-run", "new"]) == 0, capsys.readouterr().err
    (new,) = client.search_runs([run.info.experiment_id], f"tags.`mimscale.evaluates_run` = '{tracker.run_id}'")
    assert "eval/cls/knn_top1" in new.data.metrics and new.info.status == "FINISHED"
    # a run id that is not there: refused by name, after the results were printed
    capsys.readouterr()
    assert eval_main(["knn", *common, "--k", "3", "--mlflow-run", "0" * 32]) == 2
    captured = capsys.readouterr()
    assert "--mlflow-run 00000000000000000000000000000000: no such run" in captured.err and "knn" in captured.out


def test_a_server_outage_is_retried_and_no_metric_is_lost(server, mlflow_env, tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.setattr(tracking, "BACKOFF_S", 0.2)  # 0.2, 0.4, 0.8 s ...: the outage below outlasts a few
    proxy = CuttableProxy(int(server.rsplit(":", 1)[1]))
    mlflow_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
    try:
        t = tracking.Tracker(tmp_path, experiment="outage", run_name="run-outage")
        assert t.active
        for step in (1, 2):
            t.log_metrics({"loss": float(step)}, step)
        assert t.flush(timeout=30)

        proxy.cut()  # the server goes away mid-run
        for step in (3, 4, 5):
            t.log_metrics({"loss": float(step)}, step)
            time.sleep(0.3)
        t.flush(timeout=1.5)  # sends fail; the metrics wait
        assert t.active and t.failures >= 1 and t._outbox
        t.set_tags({"during": "outage"})  # skipped or failed: never raises

        proxy.restore()  # back on the same port
        t.log_metrics({"loss": 6.0}, 6)
        assert t.flush(timeout=30) and t.failures == 0
        t.end()
    finally:
        proxy.cut()
    err = capsys.readouterr().err
    assert "retrying in" in err and "MLflow answers again after" in err and "training continues without tracking" not in err
    client = mlflow.MlflowClient(server)
    history = client.get_metric_history(t.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 7)]  # every step, once
    assert client.get_run(t.run_id).info.status == "FINISHED"
