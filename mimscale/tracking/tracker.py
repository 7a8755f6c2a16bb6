"""MLflow on rank 0 only; a no-op elsewhere; never fatal to training.

Default store: ``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` points runs at a team server instead. A failed call is retried with a
back-off; only MAX_FAILURES failures in a row turn tracking off (see Tracker._fail).

Besides params and metrics a run gets: MLflow's system metrics (``system/*``: CPU, memory, disk,
network, and NVIDIA GPUs through nvidia-ml-py, of rank 0's node), its config files under
``config/``, ``summary.json``, the training data as a dataset input (``log_dataset``: name,
digest, path, counts), and at the end of a finished run the exported encoder as an MLflow model
named ``encoder`` (``log_encoder``: a pyfunc returning features, see mimscale/tracking/encoder_model.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

import mimscale
from mimscale import methods
from mimscale.checkpoint.weights import EXPORT_CONFIG
from mimscale.config import flatten, to_dict
from mimscale.data.describe import DatasetRecord, describe
from mimscale.export import export_checkpoint
from mimscale.models.registry import ENCODERS
from mimscale.runtime.output_dir import job_id

# System metrics: a sample every 15 s, logged as the mean of 4 samples: one point a minute per
# metric (MLflow's default, every 10 s, adds ~9k points a day per metric to a weeks-long run's
# store). MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _SAMPLES_BEFORE_LOGGING in the environment win.
SYSTEM_METRICS_ENV = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "15", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "4"}
RESOLVED_CONFIG = "config.yaml"
# Failed calls in a row before tracking is turned off, and the back-off between tries (doubling).
MAX_FAILURES = int(os.environ.get("MIMSCALE_MLFLOW_MAX_FAILURES", 8))
BACKOFF_S, BACKOFF_MAX_S = 5.0, 300.0
BATCH_LIMIT = 1000  # metrics per log_batch request (MLflow's server refuses more)
# At the end of a run, queued metrics wait this long for a server that is away: within a
# preemption's grace period (the checkpoint is saved before), not a whole back-off.
END_FLUSH_S = 30.0
OUTBOX_LIMIT = 200_000  # metrics kept for a retry during an outage; older ones are dropped (metrics.jsonl has them)
# The encoder's MLflow model: this file is its code, the export its artifact, the mimscale package
# its code_paths (a self-contained model: it loads where mimscale is not installed, e.g. under
# `mlflow models serve`), and these packages (at the installed versions) its requirements:
# what mimscale.checkpoint.weights and the model file import. Named, not inferred: MLflow's inference loads
# the model in a subprocess, which costs a ViT-H run's end minutes.
ENCODER_MODEL_CODE = Path(__file__).with_name("encoder_model.py")
ENCODER_MODEL_NAME = "encoder"
MODEL_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy", "pyyaml", "pillow")


def write_resolved_config(output_dir: str | Path, config: dict) -> Path:
    """``<output_dir>/config.yaml``: the run's resolved config (``to_dict(cfg)``), preset and --set applied."""
    path = Path(output_dir) / RESOLVED_CONFIG
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Tracker:
    """Rank 0's MLflow run: params, tags, metrics (sent from one thread), artifacts, the encoder
    model. Every call is a no-op on an inactive tracker (``Tracker.disabled()``, or MLflow failed
    to start), so callers never ask whether tracking is on."""

    def __init__(self, output_dir: str | Path, *, experiment: str, run_name: str, run_id: Optional[str] = None,
                 system_metrics: bool = False, enabled: bool = True):
        self.active = False
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.failures = 0  # failed calls in a row
        self.retry_at = 0.0  # no call before this time (a back-off after a failure)
        # Metrics go out from one sender thread (rank 0 must not hold every other rank at the next
        # collective while a remote server answers) in the order they were logged; a failed send
        # is kept and sent again after the back-off, so an outage loses no point.
        self._outbox: list = []  # mlflow Metric entities not yet stored
        self._sending: Optional[tuple[Future, list]] = None  # (the send in flight, the metrics it still has to store)
        self._sender: Optional[ThreadPoolExecutor] = None
        self._dropped = 0
        if not enabled:
            return
        out = Path(output_dir).resolve()
        # A server that is down must cost seconds, not the client's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if system_metrics:
            for k, v in SYSTEM_METRICS_ENV.items():
                os.environ.setdefault(k, v)  # read by the monitor when the run starts
        try:
            import mlflow

            self._mlflow = mlflow
            from mlflow.entities import Metric

            self._Metric = Metric
            user_uri = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports it
            self.uri = user_uri or f"sqlite:///{out / 'mlflow.db'}"
            mlflow.set_tracking_uri(self.uri)
            self._client = mlflow.MlflowClient(self.uri)
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = None if user_uri else (out / "mlartifacts").as_uri()
                exp_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            run = None
            if run_id:
                try:
                    # a resumed run's system metrics continue after its last system step
                    run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
                except Exception as e:  # e.g. the run lives in another store: continue in a new run
                    print(f"[mimscale] MLflow run {run_id} not found here ({type(e).__name__}); starting a new run",
                          file=sys.stderr, flush=True)
            if run is None:
                tags = {"mimscale.resumed_from_run": run_id} if run_id else None
                run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags, log_system_metrics=system_metrics)
            self.run_id = run.info.run_id
            self.active = True
        except Exception as e:  # tracking must never stop training
            self._fail("start", e)


    @classmethod
    def disabled(cls) -> "Tracker":
        """A tracker that records nothing: ranks other than 0, and rank 0 before its run opens."""
        return cls(".", experiment="", run_name="", enabled=False)
    def _fail(self, what: str, e: Exception) -> None:
        """A failed call. One transient error (a server restart, a proxy timeout) must not end
        tracking for a days-long run: the next calls try again, spaced by a back-off that doubles
        (BACKOFF_S .. BACKOFF_MAX_S), and only MAX_FAILURES failures in a row turn tracking off.
        metrics.jsonl holds every logged step either way. Failing to start is final at once."""
        self.failures += 1
        if what == "start" or self.failures >= MAX_FAILURES:
            print(f"[mimscale] WARNING: MLflow {what} failed ({type(e).__name__}: {e})"
                  + (f", {self.failures} times in a row" if self.failures > 1 else "")
                  + "; training continues without tracking (metrics.jsonl has every step)", file=sys.stderr, flush=True)
            self.active = False
            return
        wait = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (self.failures - 1))
        self.retry_at = time.time() + wait
        print(f"[mimscale] WARNING: MLflow {what} failed ({type(e).__name__}: {e}); retrying in {wait:.0f} s "
              f"({self.failures} of {MAX_FAILURES} failures in a row before tracking is turned off)", file=sys.stderr, flush=True)

    def _ready(self) -> bool:
        """Active, and not inside a back-off after a failure (params and tags logged in it are
        skipped; metrics wait in the outbox)."""
        return self.active and time.time() >= self.retry_at

    def _ok(self) -> None:
        if self.failures:
            print(f"[mimscale] MLflow answers again after {self.failures} failed calls", file=sys.stderr, flush=True)
        self.failures = 0

    def log_params(self, params: dict[str, Any]) -> None:
        if not self._ready():
            return
        try:
            existing = self._mlflow.get_run(self.run_id).data.params
            fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
            if fresh:
                self._mlflow.log_params(fresh)
            self._ok()
        except Exception as e:
            self._fail("log_params", e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (timestamped now) and hand the queue to the sender thread
        when it is idle and no back-off is running. Never waits for the server."""
        if not self.active:
            return
        ts = int(time.time() * 1000)
        self._outbox.extend(self._Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._outbox) > OUTBOX_LIMIT:  # a long outage: keep the newest
            self._dropped += len(self._outbox) - OUTBOX_LIMIT
            del self._outbox[:len(self._outbox) - OUTBOX_LIMIT]
        self._pump()

    def _send(self, pending: list) -> None:
        """Sender thread: store ``pending`` in order, BATCH_LIMIT metrics a request, removing each
        stored batch from it (so after a failure it holds exactly what is left to send)."""
        while pending:
            self._client.log_batch(self.run_id, metrics=pending[:BATCH_LIMIT], synchronous=True)
            del pending[:BATCH_LIMIT]

    def _collect(self) -> bool:
        """The outcome of a finished send: a failure puts its unsent metrics back at the head of the
        outbox and counts (back-off). False while a send is still in flight."""
        if self._sending is None:
            return True
        future, pending = self._sending
        if not future.done():
            return False
        self._sending = None
        error = future.exception()
        if error is None:
            self._ok()
        else:
            self._outbox[:0] = pending
            self._fail("log_metrics", error)
        return True

    def _pump(self) -> None:
        if not self._collect() or not self._outbox or not self._ready():
            return
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="mimscale-mlflow")
        pending, self._outbox = self._outbox, []
        self._sending = (self._sender.submit(self._send, pending), pending)

    def flush(self, timeout: float = 120.0) -> bool:
        """Wait (at most ``timeout`` s, back-offs included) until every queued metric is stored;
        False when some are not (tracking went off, or the server stayed away)."""
        deadline = time.time() + timeout
        while self.active and (self._outbox or self._sending is not None) and time.time() < deadline:
            if self._sending is not None:
                try:
                    self._sending[0].result(timeout=max(0.0, deadline - time.time()))
                except Exception:  # collected below
                    pass
            self._collect()
            if self._outbox and self.active:
                time.sleep(max(0.0, min(self.retry_at, deadline) - time.time()))
                self._pump()
        return not (self._outbox or self._sending is not None)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Copy a file into the run's artifacts (under ``artifact_path`` when given)."""
        if not self.active:
            return
        try:
            self._mlflow.log_artifact(str(path), artifact_path)
        except Exception as e:  # an artifact store problem (credentials, disk) keeps metrics going
            print(f"[mimscale] WARNING: MLflow could not store artifact {path} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)

    def log_artifacts(self, local_dir: str | Path, artifact_path: Optional[str] = None) -> bool:
        """Copy a directory's files into the run's artifacts (under ``artifact_path`` when given);
        False when tracking is off or the artifact store failed (with a warning)."""
        if not self.active:
            return False
        try:
            self._mlflow.log_artifacts(str(local_dir), artifact_path)
            return True
        except Exception as e:
            print(f"[mimscale] WARNING: MLflow could not store artifacts {local_dir} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
            return False

    def log_run_config(self, resolved: str | Path, preset: Optional[str | Path], ds_config: Optional[str | Path]) -> None:
        """The run's config files under ``config/``: the resolved config.yaml, the ds_config, and the
        YAML preset as given under ``config/preset/`` (its own name, which may also be config.yaml)."""
        self.log_artifact(resolved, "config")
        if ds_config:
            self.log_artifact(ds_config, "config")
        if preset:
            self.log_artifact(preset, "config/preset")

    def log_encoder(self, checkpoint: str | Path, export_dir: str | Path) -> Optional[str]:
        """Export ``checkpoint``'s encoder (timm's Hub layout: config.json + model.safetensors, no
        decoder) to ``export_dir`` and log it as the MLflow model ``encoder`` (log_encoder_model).
        Every rank's shards must be on disk (after the save's barrier). Returns the model's URI;
        None when nothing was logged. Any failure is a warning: the weights are in the checkpoint."""
        if not self.active:
            return None
        try:
            export_checkpoint(checkpoint, export_dir, decoder=False, force=True)
        except Exception as e:
            print(f"[mimscale] WARNING: could not export the encoder of {checkpoint} ({type(e).__name__}: {e}); "
                  "export it later with python -m mimscale.export", file=sys.stderr, flush=True)
            return None
        uri = self.log_encoder_model(export_dir)
        logged = f" and logged as the MLflow model {uri}" if uri else ""
        print(f"[mimscale] final encoder exported to {export_dir} (timm format){logged}", file=sys.stderr, flush=True)
        return uri

    def log_encoder_model(self, export_dir: str | Path) -> Optional[str]:
        """Log an export as the pyfunc model ``encoder`` of this run (mimscale/tracking/encoder_model.py:
        float32 images [N, 3, S, S], normalized, -> features [N, D]), with a signature (a ``pool``
        param, "cls" or "mean"), an input example (one image of zeros: the normalized mean image)
        and the export as its artifact. Tags the run ``mimscale.encoder_model`` with the model's
        URI and returns it; None (with a warning) when the store failed."""
        if not self.active:
            return None
        try:
            import mlflow.pyfunc
            from mlflow.models import infer_signature

            config = json.loads((Path(export_dir) / EXPORT_CONFIG).read_text())
            model = config["mimscale"]["model"]
            size, dim = int(model["img_size"]), ENCODERS[model["name"]].dim
            example = np.zeros((1, 3, size, size), np.float32)
            signature = infer_signature(example, np.zeros((1, dim), np.float32), params={"pool": "cls"})
            overlay = config.get("pretrained_cfg_overlay", {})
            metadata = {"mimscale": config["mimscale"], "input": f"float32 [N, 3, {size}, {size}], (x - mean) / std of RGB in [0, 1]",
                        "output": f"float32 [N, {dim}]: the CLS token (params pool=cls) or the mean patch token (pool=mean)",
                        "mean": overlay.get("mean"), "std": overlay.get("std")}
            info = mlflow.pyfunc.log_model(
                name=ENCODER_MODEL_NAME, python_model=str(ENCODER_MODEL_CODE), artifacts={"encoder": str(export_dir)},
                code_paths=[str(Path(mimscale.__file__).parent)], signature=signature, input_example=example,
                pip_requirements=[f"{p}=={importlib.metadata.version(p)}" for p in MODEL_REQUIREMENTS], metadata=metadata)
            self._client.set_tag(self.run_id, "mimscale.encoder_model", info.model_uri)
            return info.model_uri
        except Exception as e:  # an artifact store problem: the export is on disk, the weights in the checkpoint
            print(f"[mimscale] WARNING: MLflow could not store the encoder model from {export_dir} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
            return None

    def log_dataset(self, record: DatasetRecord, context: str = "training") -> None:
        """The data as an MLflow dataset input of the run (mimscale.data.describe): its name, digest,
        source (a local path, or "code" for generated images) and counts as its profile."""
        if not self._ready():
            return
        try:
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            dataset = Dataset(name=record.name, digest=record.digest, source_type=record.source_type,
                              source=json.dumps(record.source), profile=json.dumps(record.profile))
            self._client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
            self._ok()
        except Exception as e:
            self._fail("log_input", e)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self._ready():
            return
        try:
            self._mlflow.set_tags(tags)
            self._ok()
        except Exception as e:
            self._fail("set_tags", e)

    def end(self, status: str = "FINISHED") -> None:
        """Store the queued metrics (waiting out back-offs, at most END_FLUSH_S) and end the run."""
        if not self.active:
            return
        if not self.flush(END_FLUSH_S):
            if not self.active:  # the outage outlasted the retries: tracking is off, said once
                return
            print(f"[mimscale] WARNING: {len(self._outbox) + len(self._sending[1] if self._sending else [])} metrics "
                  "could not be stored in MLflow (metrics.jsonl has them)", file=sys.stderr, flush=True)
        if self._dropped:
            print(f"[mimscale] WARNING: {self._dropped} metrics logged during an MLflow outage were dropped from the retry "
                  "queue (metrics.jsonl has them)", file=sys.stderr, flush=True)
        try:
            self._mlflow.flush_async_logging()
            self._mlflow.end_run(status=status)
        except Exception as e:
            self._fail("end_run", e)
        self.active = False
        if self._sender is not None:
            self._sender.shutdown(wait=False)


def code_version() -> str:
    """The code a run trains with: the git commit of this checkout ("-dirty" with uncommitted
    changes), else the image's MIMSCALE_VERSION (``make docker`` builds it in), else "unknown"."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git in the image
        pass
    return os.environ.get("MIMSCALE_VERSION") or "unknown"


def run_tags(cfg) -> dict[str, str]:
    """What a run is, as MLflow tags to search and group by: method, model, preset, code, scheduler job."""
    return {"mimscale.method": methods.of(cfg).name, "mimscale.model": cfg.model.name, "mimscale.preset": cfg.preset or "",
            "mimscale.git_commit": code_version(), "mimscale.job_id": job_id()}


def open_run(cfg, output_dir: Path, *, run_id: Optional[str], derived: dict, ds_raw: dict, preset: Optional[str],
             ds_config: Optional[str], tags: dict, data_source=None) -> "Tracker":
    """Rank 0's MLflow run for a training run (``run_id``: the one a resumed run continues), with
    its params (the flattened config, ``ds.*`` and ``derived.*``), ``run_tags`` and ``tags``, config files (the
    resolved config, also ``<output_dir>/config.yaml`` for export/eval of any tag, the ds_config
    and the preset as given) and the data as its training input (``data_source``: what
    ``streams.build_source(cfg.data)`` built; None: none logged)."""
    name = cfg.tracking.run_name or f"{cfg.preset or 'mimscale'}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker(output_dir, experiment=cfg.tracking.experiment, run_name=name, run_id=run_id,
                      system_metrics=cfg.tracking.system_metrics, enabled=cfg.tracking.enabled)
    params = flatten(to_dict(cfg))
    params.update(flatten(ds_raw, "ds."))
    params.update({f"derived.{k}": v for k, v in derived.items()})
    tracker.log_params(params)
    tracker.set_tags({**run_tags(cfg), **tags})
    resolved = write_resolved_config(output_dir, to_dict(cfg))
    tracker.log_run_config(resolved, preset, ds_config)
    if data_source is not None and tracker.active:
        try:
            record = describe(cfg.data, data_source)
        except (OSError, ValueError, KeyError) as e:  # e.g. a manifest edited by hand: the record is not worth a run
            print(f"[mimscale] WARNING: no MLflow dataset input for data.path {cfg.data.path!r} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
        else:
            tracker.log_dataset(record, "training")
    return tracker
