"""MLflow on rank 0 only; a no-op elsewhere; never fatal to training.

Default store: ``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` points runs at a team server instead. Any tracking error prints one
warning and turns tracking off for the rest of the run.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional


class Tracker:
    def __init__(self, enabled: bool, output_dir: str | Path, experiment: str, run_name: str, run_id: Optional[str] = None):
        self.active = False
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        if not enabled:
            return
        out = Path(output_dir).resolve()
        # A server that is down must cost seconds, not the client's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
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
                    run = mlflow.start_run(run_id=run_id)
                except Exception as e:  # e.g. the run lives in another store: continue in a new run
                    print(f"[mimscale] MLflow run {run_id} not found here ({type(e).__name__}); starting a new run",
                          file=sys.stderr, flush=True)
            if run is None:
                tags = {"mimscale.resumed_from_run": run_id} if run_id else None
                run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags)
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
