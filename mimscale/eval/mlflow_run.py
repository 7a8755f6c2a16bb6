"""``python -m mimscale.eval`` results into MLflow: by default into the run that trained the checkpoint.

``--mlflow-run``:
  - ``run`` (default): the producing run, named by ``mlflow_run_id`` in the ``summary.json`` of the
    run folder the checkpoint lives in (``<output_dir>/checkpoints/stepN``; an export names its
    source checkpoint in mimscale.json). Without one (``random:``, a foreign file, tracking off)
    the results are printed and not logged, with a note saying so;
  - ``new``: a new run in the producing run's experiment (``mimscale-eval`` without one), tagged
    ``mimscale.evaluates_run`` with the producing run's id;
  - ``none``: nothing is logged;
  - a run id: that run.
The store: ``MLFLOW_TRACKING_URI`` if set, else the producing run's own (summary.json's
``mlflow_tracking_uri``: the run's ``sqlite:///<output_dir>/mlflow.db`` unless it trained against a server).

What is logged, at the checkpoint's step (so evaluating several checkpoints draws a curve):
metrics ``eval/<pool>/<task>_top1`` (and ``_top5``, probe's ``_train_top1``) for probe and knn,
``eval/cka_<tokens>/r<ratio>/mean`` (over blocks) and ``.../last`` (the last block) for cka; the
whole result as ``eval/<task>-<pool or tokens>-step<N>.json``; cka's ``--plot`` under ``eval/``.
The producing run's status is left as it is (no start_run/end_run on it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from mimscale.checkpoint.checkpointer import DamagedCheckpoint
from mimscale.checkpoint.weights import locate, marker

CHOICES = ("run", "new", "none")  # or a run id
NEW_EXPERIMENT = "mimscale-eval"


def run_target(text: str) -> str:
    """argparse type of --mlflow-run: run, new, none or a run id (hex, as MLflow makes them)."""
    if text in CHOICES or (text and all(c in "0123456789abcdef" for c in text.lower())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected run, new, none or an MLflow run id")


class TargetError(ValueError):
    """A --mlflow-run that cannot be honoured (exit status 2, naming the option)."""


def _say(msg: str) -> None:
    print(f"[mimscale.eval] {msg}", file=sys.stderr, flush=True)


def producing_run(checkpoint: str) -> tuple[Optional[dict], Optional[int]]:
    """(the summary.json of the run that wrote ``checkpoint``, or None; the checkpoint's step, or None)."""
    if checkpoint.startswith("random:"):
        return None, None
    try:
        src = locate(checkpoint)
    except (FileNotFoundError, DamagedCheckpoint):
        return None, None
    if src.kind == "checkpoint":
        tag, step = src.path, marker(src.path).get("step")
    elif src.kind == "export":
        meta = json.loads(src.config.read_text()).get("mimscale", {})
        tag, step = (Path(meta["source_checkpoint"]) if meta.get("source_checkpoint") else None), meta.get("step")
    else:
        return None, None
    summary = tag.parent.parent / "summary.json" if tag is not None else None  # <output_dir>/checkpoints/stepN
    if summary is None or not summary.is_file():
        return None, step
    return json.loads(summary.read_text()), step


def metrics_of(task: str, result: dict) -> dict[str, float]:
    """The numbers to log from a task's result (see the module docstring for the names)."""
    if task == "cka":
        out = {}
        for ratio, per_block in result["cka"].items():
            key = f"eval/cka_{result.get('tokens', 'kept')}/r{float(ratio):.2f}"
            out[f"{key}/mean"] = float(sum(per_block) / len(per_block))
            out[f"{key}/last"] = float(per_block[-1])
        return out
    return {f"eval/{result['pool']}/{k}": float(v) for k, v in result.items()
            if k.startswith(f"{task}_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _resolve(target: str, summary: Optional[dict], client_for) -> tuple[Optional[object], Optional[str]]:
    """(client, run id) to log into; (None, None) when nothing is to be logged."""
    produced = (summary or {}).get("mlflow_run_id")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (summary or {}).get("mlflow_tracking_uri")
    if target == "none":
        return None, None
    if target == "run" and not produced:
        why = "no summary.json of a run beside the checkpoint" if summary is None else "its run was not tracked"
        _say(f"results not logged to MLflow: {why} (--mlflow-run new or <run id> logs them elsewhere)")
        return None, None
    if not uri:
        raise TargetError(f"--mlflow-run {target}: no tracking store known (the checkpoint names no MLflow run): "
                          "set MLFLOW_TRACKING_URI")
    client = client_for(uri)
    if target == "run":
        return client, produced
    if target == "new":
        return client, None
    try:
        client.get_run(target)
    except Exception as e:
        raise TargetError(f"--mlflow-run {target}: no such run in {uri} ({type(e).__name__})") from None
    return client, target


def _client(uri: str):
    import mlflow  # only when there is a store to log into (seconds to import)

    return mlflow.MlflowClient(uri)


def log_results(checkpoint: str, task: str, result: Optional[dict], target: str = "run", plot: Optional[str] = None) -> int:
    """Log ``result`` (a task's result dict; None: this rank has none) as ``target`` says.
    Returns an exit status: 0 (logged, or nothing to log), 2 (a bad --mlflow-run), 1 (the store failed)."""
    if result is None or target == "none":
        return 0
    summary, step = producing_run(checkpoint)
    try:
        client, run_id = _resolve(target, summary, _client)
    except TargetError as e:
        print(f"python -m mimscale.eval: error: {e}", file=sys.stderr)
        return 2
    if client is None:
        return 0
    try:
        if run_id is None:  # --mlflow-run new
            produced = (summary or {}).get("mlflow_run_id")
            try:  # the producing run's experiment, when it is in this store
                experiment = client.get_run(produced).info.experiment_id if produced else None
            except Exception:
                experiment = None
            if experiment is None:
                found = client.get_experiment_by_name(NEW_EXPERIMENT)
                experiment = found.experiment_id if found else client.create_experiment(NEW_EXPERIMENT)
            tags = {"mimscale.checkpoint": checkpoint, "mimscale.eval.task": task,
                    **({"mimscale.evaluates_run": produced} if produced else {})}
            run_id = client.create_run(experiment, tags=tags, run_name=f"eval-{task}-{Path(checkpoint).name}").info.run_id
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step or 0)) for k, v in metrics_of(task, result).items()]
        client.log_batch(run_id, metrics=metrics)
        variant = result.get("pool") or result.get("tokens", "")
        record = json.loads(json.dumps({"task": task, "checkpoint": checkpoint, "step": step, **result}, default=str))
        client.log_dict(run_id, record, f"eval/{task}-{variant}-step{step or 0}.json")
        if plot:
            client.log_artifact(run_id, plot, "eval")
        if target == "new":
            client.set_terminated(run_id)
    except Exception as e:
        print(f"python -m mimscale.eval: error: the results were not logged to MLflow run {run_id} "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    _say(f"logged {len(metrics)} metrics at step {step or 0} to MLflow run {run_id} ({client.tracking_uri})")
    return 0
