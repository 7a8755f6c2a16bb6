"""MLflow on rank 0 only; a no-op elsewhere; never fatal to training.

Default store: ``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` points runs at a team server instead. Any tracking error prints one
warning and turns tracking off for the rest of the run.

Besides params and metrics a run gets: MLflow's system metrics (``system/*``: CPU, memory, disk,
network, and NVIDIA GPUs through nvidia-ml-py, of rank 0's node), its config files under
``config/``, ``summary.json``, and at the end of a finished run the exported encoder under
``encoder/`` (see mimscale/export.py).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from mimscale.config import flatten, to_dict
from mimscale.export import export_checkpoint

# System metrics: a sample every 15 s, logged as the mean of 4 samples: one point a minute per
# metric (MLflow's default, every 10 s, adds ~9k points a day per metric to a weeks-long run's
# store). MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _SAMPLES_BEFORE_LOGGING in the environment win.
SYSTEM_METRICS_ENV = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "15", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "4"}
RESOLVED_CONFIG = "config.yaml"


def write_resolved_config(output_dir: str | Path, config: dict) -> Path:
    """``<output_dir>/config.yaml``: the run's resolved config (``to_dict(cfg)``), preset and --set applied."""
    path = Path(output_dir) / RESOLVED_CONFIG
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Tracker:
    def __init__(self, enabled: bool, output_dir: str | Path, experiment: str, run_name: str, run_id: Optional[str] = None,
                 system_metrics: bool = False):
        self.active = False
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
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
            user_uri = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports it
            self.uri = user_uri or f"sqlite:///{out / 'mlflow.db'}"
            mlflow.set_tracking_uri(self.uri)
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

    def _fail(self, what: str, e: Exception) -> None:
        print(f"[mimscale] WARNING: MLflow {what} failed ({type(e).__name__}: {e}); training continues without tracking",
              file=sys.stderr, flush=True)
        self.active = False

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        try:
            existing = self._mlflow.get_run(self.run_id).data.params
            fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
            if fresh:
                self._mlflow.log_params(fresh)
        except Exception as e:
            self._fail("log_params", e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        try:
            # Asynchronous: rank 0 must not hold every other rank at the next collective
            # while a remote server answers.
            self._mlflow.log_metrics(metrics, step=step, timestamp=int(time.time() * 1000), synchronous=False)
        except Exception as e:
            self._fail("log_metrics", e)

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

    def log_encoder(self, checkpoint: str | Path, export_dir: str | Path) -> Optional[Path]:
        """Export ``checkpoint``'s encoder (timm safetensors + config.json, no decoder) to ``export_dir``
        and log it as the artifacts ``encoder/``. Every rank's shards must be on disk (after the
        save's barrier). Any failure is a warning: the run's weights are in the checkpoint anyway."""
        if not self.active:
            return None
        try:
            export_checkpoint(checkpoint, export_dir, decoder=False, force=True)
        except Exception as e:
            print(f"[mimscale] WARNING: could not export the encoder of {checkpoint} ({type(e).__name__}: {e}); "
                  "export it later with python -m mimscale.export", file=sys.stderr, flush=True)
            return None
        logged = " and logged as MLflow artifacts encoder/" if self.log_artifacts(export_dir, "encoder") else ""
        print(f"[mimscale] final encoder exported to {export_dir} (timm format){logged}", file=sys.stderr, flush=True)
        return Path(export_dir)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        try:
            self._mlflow.set_tags(tags)
        except Exception as e:
            self._fail("set_tags", e)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        try:
            self._mlflow.flush_async_logging()
            self._mlflow.end_run(status=status)
        except Exception as e:
            self._fail("end_run", e)
        self.active = False


def open_run(cfg, output_dir: Path, run_id: Optional[str], derived: dict, ds_raw: dict, preset: Optional[str],
             ds_config: Optional[str], tags: dict) -> "Tracker":
    """Rank 0's MLflow run for a training run (``run_id``: the one a resumed run continues), with
    its params (the flattened config, ``ds.*`` and ``derived.*``), ``tags`` and config files: the
    resolved config (also ``<output_dir>/config.yaml``, for export/eval of any tag), the ds_config
    and the preset as given."""
    name = cfg.tracking.run_name or f"{cfg.preset or 'mimscale'}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker(cfg.tracking.enabled, output_dir, cfg.tracking.experiment, name, run_id,
                      system_metrics=cfg.tracking.system_metrics)
    params = flatten(to_dict(cfg))
    params.update(flatten(ds_raw, "ds."))
    params.update({f"derived.{k}": v for k, v in derived.items()})
    tracker.log_params(params)
    if tags:
        tracker.set_tags(tags)
    resolved = write_resolved_config(output_dir, to_dict(cfg))
    tracker.log_run_config(resolved, preset, ds_config)
    return tracker
