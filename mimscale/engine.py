"""Trainer: owns the DeepSpeed engine and the loop (step, log/checkpoint cadence, SIGTERM, summary).

Inside a step there is no host sync: loss terms accumulate in a device tensor, and only on a log
step do the ranks meet in ONE packed all-reduce (terms, non-finite count, samples, data wait,
skipped files, stop request), after which rank 0 logs.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import deepspeed
import deepspeed.comm as ds_comm
import torch
from tqdm import tqdm

from mimscale import checkpoint, dist
from mimscale.config import Config, flatten, to_dict
from mimscale.data.streams import StreamPosition, build_source, open_stream
from mimscale.ds_config import EngineSettings
from mimscale.health import CKAHealth
from mimscale.masking import build_runtime
from mimscale.masking.base import MaskPlan
from mimscale.metrics import model_flops_per_image, peak_flops
from mimscale.models.mim import build_model
from mimscale.optim import build_optimizer, build_scheduler
from mimscale.preempt import StopRequest
from mimscale.tracking import Tracker, write_resolved_config

META_KEYS = ("box", "flip", "index")


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops without saving, keeping the last good checkpoint."""


@dataclass
class Window:
    """Host-side timing of the steps since the last log step."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0


class Trainer:
    def __init__(self, cfg: Config, ds_args, eng: EngineSettings, ds_config_path: str = "",
                 stop_request: Optional[StopRequest] = None):
        self.cfg = cfg
        self.stop_request = stop_request or StopRequest()
        self.eng = eng
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.device()
        self.out = Path(cfg.output_dir)
        if dist.is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
        self.threads = dist.set_threads(cfg.train.threads)

        # Same seed on every rank while building, so all ranks start from identical weights.
        dist.seed_all(cfg.train.seed)
        model = build_model(cfg)
        self.num_patches = model.encoder.num_patches
        self.visible, self.masked, self.thrown = model.masker.initial_sizes()

        self.source = build_source(cfg.data, cfg.train.seed)
        n_samples = len(self.source)
        self.micro_per_epoch = (n_samples // self.world) // eng.micro_batch
        if self.micro_per_epoch < 1:
            raise ValueError(f"{n_samples} samples cannot fill one micro batch of {eng.micro_batch} on {self.world} ranks")
        self.steps_per_epoch = max(1, self.micro_per_epoch // eng.grad_accum)
        t = cfg.train
        self.total_steps = t.steps if t.steps is not None else max(1, int(round(t.epochs * self.steps_per_epoch)))
        self.warmup_steps = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_epochs * self.steps_per_epoch))
        self.lr = t.base_lr * eng.global_batch / 256
        optimizer = build_optimizer(model, self.lr, t.weight_decay, (t.beta1, t.beta2))
        scheduler = build_scheduler(optimizer, self.warmup_steps, self.total_steps, t.min_lr / self.lr if self.lr else 0.0)
        self.engine, _, _, self.scheduler = deepspeed.initialize(args=ds_args, model=model, optimizer=optimizer, lr_scheduler=scheduler)
        if t.compile:
            # DeepSpeed's own compile wraps the module so ZeRO hooks stay outside the graphs.
            self.engine.compile(backend=t.compile_backend)

        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.converted = 0
        self.run_id: Optional[str] = None
        self.tracker = Tracker(False, self.out, "", "")
        self.windows: list[dict] = []
        self.runtime = build_runtime(cfg, self)  # method-specific loop hooks (AMT's attention store), or None
        self.health = CKAHealth(cfg, self.source, self.steps_per_epoch)
        self.resumed_from: Optional[Path] = checkpoint.resolve_resume(cfg.resume, cfg.output_dir)
        self.data_position = StreamPosition(cfg.data.num_workers)
        if self.resumed_from is None:
            dist.seed_all(cfg.train.seed + 1 + self.rank)  # per-rank masking streams
        else:
            if dist.is_rank0():
                checkpoint.abandon_newer(self.out, int(json.loads((self.resumed_from / checkpoint.MARKER).read_text())["step"]))
            client, rank_state = checkpoint.load(self.engine, self.resumed_from)  # restores this rank's RNG too
            self.data_position, warning = StreamPosition.restore(rank_state.get("data"), cfg.data.num_workers)
            if warning:
                dist.log0(f"[mimscale] {warning}")
            self.step = int(client["mim_step"])
            self.samples_seen = int(client["mim_samples_seen"])
            self.skipped = int(client.get("mim_skipped_images", 0))
            self.converted = int(client.get("mim_converted_images", 0))
            self.run_id = client.get("mim_mlflow_run_id")
            if self.runtime is not None:
                self.runtime.restore(client, rank_state.get("method", {}))
            dist.log0(f"[mimscale] resumed from {self.resumed_from} at step {self.step}")
        self.last_checkpoint: Optional[str] = str(self.resumed_from) if self.resumed_from else None

        self.flops_per_img = model_flops_per_image(cfg, self.visible, self.masked)
        self.peak, self.peak_source = peak_flops(self.device)
        if dist.is_rank0():
            name = cfg.tracking.run_name or f"{cfg.preset or 'mimscale'}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.tracker = Tracker(cfg.tracking.enabled, self.out, cfg.tracking.experiment, name, self.run_id,
                                   system_metrics=cfg.tracking.system_metrics)
            self.run_id = self.tracker.run_id or self.run_id
            params = flatten(to_dict(cfg))
            params.update(flatten(eng.raw, "ds."))
            params.update({"derived.lr": self.lr, "derived.total_steps": self.total_steps, "derived.warmup_steps": self.warmup_steps,
                           "derived.world_size": self.world, "derived.global_batch": eng.global_batch})
            self.tracker.log_params(params)
            # The config files as artifacts: the resolved config (also <output_dir>/config.yaml, for
            # export/eval of any tag), the ds_config and the preset as given (pretrain.py's --config).
            resolved = write_resolved_config(self.out, to_dict(cfg))
            self.tracker.log_run_config(resolved, getattr(ds_args, "config", None), ds_config_path)

        self._term_names: Optional[list[str]] = None
        self.loss_history: list[dict] = []
        if dist.is_rank0():
            self._trim_metrics_file()
        self.last_metrics: dict = {}

    def _trim_metrics_file(self) -> None:
        """Drop metrics.jsonl lines past the step we start from (steps a crash made us redo)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ one step
    def to_device(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["image"].to(self.device, non_blocking=True)
        extra = self.runtime.host_inputs(batch) if self.runtime is not None else {}
        meta = {k: v.to(self.device, non_blocking=True) for k, v in [*((k, batch[k]) for k in META_KEYS), *extra.items()]}
        return images, meta

    def micro_step(self, images: torch.Tensor, meta: dict) -> tuple[torch.Tensor, dict]:
        """Forward, backward and engine.step() for one micro batch (the engine applies the
        optimizer, clipping and LR step at accumulation boundaries)."""
        loss, terms = self.engine(images, meta)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()  # asked before step() advances the count
        self.engine.step()
        if boundary and self.runtime is not None:
            self.runtime.after_optimizer_step()
        return loss, terms

    # ------------------------------------------------------------------ the loop
    def _client_state(self) -> dict:
        return {
            **(self.runtime.client_state() if self.runtime is not None else {}),
            "mim_step": self.step,
            "mim_samples_seen": self.samples_seen,
            "mim_skipped_images": self.skipped,
            "mim_converted_images": self.converted,
            "mim_mlflow_run_id": self.run_id,
            "mim_data_micro_batch": self.samples_seen // (self.eng.micro_batch * self.world),  # per-rank stream position
            "mim_world_size": self.world,
        }

    def save(self) -> None:
        path = checkpoint.save(self.engine, self.out, self.step, self._client_state(), self.cfg.train.keep_checkpoints,
                               rank_state={"data": self.data_position.state(),
                                           "method": self.runtime.rank_state() if self.runtime is not None else {}},
                               marker_extra=self.runtime.marker_extra() if self.runtime is not None else None,
                               config=to_dict(self.cfg))
        self.last_checkpoint = str(path)
        if self.runtime is not None:
            self.runtime.after_save()

    def mean_step_seconds(self) -> Optional[float]:
        """Seconds per optimizer step over the windows logged so far (None before the first)."""
        w = self.windows[1:] if len(self.windows) > 1 else self.windows
        steps = sum(x["steps"] for x in w)
        return sum(x["seconds"] for x in w) / steps if steps else None

    def fit(self) -> dict:
        cfg, eng = self.cfg, self.eng
        end = min(self.total_steps, cfg.train.stop_after or self.total_steps)
        if self.step >= end:  # e.g. a requeued job that had already finished: keep its summary
            dist.log0(f"[mimscale] nothing to do: the checkpoint is at step {self.step} and the run ends at step {end}")
            previous = self.out / "summary.json"
            if dist.is_rank0():
                self.tracker.end("FINISHED")
            return json.loads(previous.read_text()) if previous.is_file() else self.finish()
        self.stop_request.attach()
        # Position in the data stream from samples seen (= step x accumulation x micro batch).
        start = self.samples_seen // (eng.micro_batch * self.world)
        loader = open_stream(cfg.data, self.source, cfg.model.img_size, eng.micro_batch, self.rank, self.world, cfg.train.seed,
                             start_micro_batch=start, position=self.data_position, pin_memory=self.device.type == "cuda")
        it = iter(loader)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_rank0(), unit="step", dynamic_ncols=True, mininterval=1.0)
        acc: Optional[torch.Tensor] = None  # [1 + n_terms] summed over micro steps
        bad = torch.zeros((), device=self.device)  # non-finite losses seen
        first_bad = torch.full((), float("inf"), device=self.device)
        # The optimizer step being taken, kept on the device so recording a bad step needs no
        # host-to-device copy (a synchronous cudaMemcpy would stall the queue every micro step).
        step_dev = torch.full((), float(self.step + 1), device=self.device)
        win = Window()
        micro_in_window = 0
        files = [0, 0]  # skipped, converted files in this window (host ints from CPU tensors)
        stopped = None
        while self.step < end:
            if self.runtime is not None:
                win.t0 += self.runtime.before_step(self.step)  # a refresh is not billed to the training steps
            for _ in range(eng.grad_accum):
                t = time.perf_counter()
                batch = next(it)
                win.wait += time.perf_counter() - t
                self.data_position.observe(batch)
                files[0] += int(batch["skipped"])  # CPU tensors: no device sync
                files[1] += int(batch["converted"])
                images, meta = self.to_device(batch)
                loss, terms = self.micro_step(images, meta)
                if self._term_names is None:
                    self._term_names = sorted(terms)
                vals = torch.stack([loss.detach().float()] + [terms[k].float() for k in self._term_names])
                acc = vals if acc is None else acc + vals
                nonfinite = ~torch.isfinite(vals[0])
                bad = bad + nonfinite.float()
                first_bad = torch.where(nonfinite, torch.minimum(first_bad, step_dev), first_bad)
                micro_in_window += 1
            self.step += 1
            step_dev += 1
            self.samples_seen += eng.global_batch
            win.steps += 1
            bar.update(1)
            if self.health.due(self.step):  # every rank: the encoder's forwards are collective under ZeRO-3
                t = time.perf_counter()
                cka = self.health.run(self.engine.module.encoder)
                win.t0 += time.perf_counter() - t  # not billed to the training steps
                if cka and dist.is_rank0():
                    self.tracker.log_metrics(cka, self.step)
            grid_every = cfg.tracking.mask_grid_every
            if grid_every and self.step % grid_every == 0 and dist.is_rank0():
                self._log_mask_grid(images)
            stop = self.stop_request.poll()  # the same answer on every rank
            ckpt_now = self.step % cfg.train.ckpt_every == 0 or self.step == end
            # Every rank takes the same branch (the all-reduce in _log): decided on the step
            # count and the agreed stop request only.
            if self.step % cfg.train.log_every == 0 or ckpt_now or stop:
                self._log(acc, micro_in_window, bad, first_bad, win, files, bar)
                acc, micro_in_window, files = None, 0, [0, 0]
                if stop:
                    stopped = self.stop_request.signal_name or "SIGTERM"
                    break
                if ckpt_now:
                    self.save()
                win = Window()  # after the save: checkpoint time is not billed to training steps
        bar.close()
        self.stop_request.drain()
        if stopped:
            dist.log0(f"[mimscale] {stopped} received: saving a checkpoint at step {self.step} and exiting")
            self.save()
        return self.finish(stopped)

    def _log(self, acc, micro, bad, first_bad, win: Window, files: list[int], bar) -> None:
        """The log step's one packed all-reduce, then rank-0 logging. Raises TrainingDiverged."""
        self._update_plan_sizes()
        n_terms = len(self._term_names or [])
        extras = torch.tensor([micro, win.wait, files[0], files[1]], dtype=torch.float32, device=self.device)
        packed = torch.cat([acc.float(), bad.reshape(1), extras])
        ds_comm.all_reduce(packed)
        v = packed.tolist()  # the one host sync of this window
        elapsed = time.perf_counter() - win.t0  # after the sync: all queued work is counted
        sums, n_bad = v[: 1 + n_terms], v[1 + n_terms]
        micro_all, wait_all, skipped_all, converted_all = v[2 + n_terms:]
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if n_bad > 0 or (grad_norm is not None and not math.isfinite(grad_norm)):
            if n_bad > 0:
                ds_comm.all_reduce(first_bad, op=ds_comm.ReduceOp.MIN)
                what = f"non-finite loss at step {int(first_bad.item())}"
            else:
                what = f"non-finite gradient norm at step {self.step}"
            ckpt = self.last_checkpoint or "none yet"
            raise TrainingDiverged(f"{what} (detected at log step {self.step}); stopping without saving. "
                                   f"Last good checkpoint: {ckpt}")
        self.skipped += int(skipped_all)
        self.converted += int(converted_all)
        loss = sums[0] / micro_all
        step_s = elapsed / win.steps
        img_s = self.eng.global_batch / step_s
        mfu = self.flops_per_img * img_s / self.world / self.peak if self.peak else None
        metrics = {
            "loss": loss,
            **{k: s / micro_all for k, s in zip(self._term_names or [], sums[1:])},
            "lr": float(self.engine.get_lr()[0]),
            "img_per_s": img_s,
            "step_s": step_s,
            "data_wait_pct": 100.0 * wait_all / self.world / max(elapsed, 1e-9),
            "skipped_images": float(self.skipped),
            "converted_images": float(self.converted),
            "epoch": self.step / self.steps_per_epoch,
            "gflop_per_img": self.flops_per_img / 1e9,  # follows the plan (AMT: drops at the first refresh)
        }
        if mfu is not None:
            metrics["mfu"] = mfu
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self.last_metrics = metrics
        self.windows.append({"steps": win.steps, "seconds": elapsed, "img_per_s": img_s, "flops_per_img": self.flops_per_img})
        if dist.is_rank0():
            self.loss_history.append({"step": self.step, "loss": loss})
            self.tracker.log_metrics(metrics, self.step)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.1f}", refresh=False)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def _update_plan_sizes(self) -> None:
        """FLOPs per image follow the plan actually used (AMT switches from random masking to
        masking-and-throwing at its first refresh); shapes only, no device sync."""
        plan: Optional[MaskPlan] = self.engine.module.last_plan
        if plan is None:
            return
        sizes = (plan.visible.shape[1], plan.masked.shape[1], plan.thrown.shape[1])
        if sizes != (self.visible, self.masked, self.thrown):
            self.visible, self.masked, self.thrown = sizes
            self.flops_per_img = model_flops_per_image(self.cfg, self.visible, self.masked)

    def _log_mask_grid(self, images: torch.Tensor) -> None:
        """Rank 0: image | masker weights (if any) | plan, for the first samples of the last
        micro batch, as a PNG artifact under mask_grids/."""
        from mimscale.masking.viz import save_plan_grid

        model = self.engine.module
        plan = model.last_plan
        if plan is None:
            return
        path = self.out / "mask_grids" / f"step{self.step:08d}.png"
        weights = getattr(model.masker, "last_weights", None)
        try:
            save_plan_grid(path, images, plan, weights, model.patch_size, rows=self.cfg.tracking.mask_grid_rows)
        except OSError as e:  # a full disk must not stop training
            dist.log0(f"[mimscale] could not write {path}: {e}")
            return
        self.tracker.log_artifact(path, "mask_grids")

    def throughput(self) -> float:
        """Images/s over this invocation, leaving out the first window (warm-up, compilation)
        when there is more than one."""
        w = self.windows[1:] if len(self.windows) > 1 else self.windows
        secs = sum(x["seconds"] for x in w)
        return sum(x["steps"] for x in w) * self.eng.global_batch / secs if secs else 0.0

    def finish(self, stopped: Optional[str] = None) -> dict:
        img_s = self.throughput()
        w = self.windows[1:] if len(self.windows) > 1 else self.windows
        secs = sum(x["seconds"] for x in w)
        # model FLOP/s over the windows, each at the plan sizes it ran with
        flop_s = sum(x["steps"] * self.eng.global_batch * x["flops_per_img"] for x in w) / secs if secs else 0.0
        plan: Optional[MaskPlan] = self.engine.module.last_plan
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "samples_seen": self.samples_seen,
            "loss_history": self.loss_history,
            "final_loss": self.loss_history[-1]["loss"] if self.loss_history else None,
            "img_per_s": img_s,
            "mfu": flop_s / self.world / self.peak if self.peak and flop_s else None,  # None: unknown peak
            "gflop_per_img": self.flops_per_img / 1e9,
            "peak_gflops_per_rank": self.peak / 1e9 if self.peak else None,
            "peak_source": self.peak_source,
            "data_wait_pct": self.last_metrics.get("data_wait_pct"),
            "skipped_images": self.skipped,
            "converted_images": self.converted,
            "checkpoint": self.last_checkpoint,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "stopped_by": stopped,
            "world_size": self.world,
            "global_batch": self.eng.global_batch,
            "precision": self.eng.precision,
            "zero_stage": self.eng.zero_stage,
            "mlflow_tracking_uri": self.tracker.uri,
            "mlflow_run_id": self.run_id,
            "masking": self.cfg.masking.method,
            # fractions of the patches in the last batch's plan
            "mask_fractions": plan.fractions() if plan is not None else None,
            # the last log window's loss terms (loss_rec; AutoMAE: loss_g, loss_d, d_real, d_fake)
            **{k: self.last_metrics.get(k) for k in self._term_names or []},
            **(self.runtime.summary() if self.runtime is not None else {}),
            "cka": self.health.last or None,  # the last health check (cka/r<ratio>/last|mean), if one ran
        }
        if dist.is_rank0():
            path = self.out / "summary.json"
            path.write_text(json.dumps(summary, indent=2))
            final = {f"final_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            self.tracker.log_metrics(final, self.step)
            self.tracker.log_artifact(path)
            # The final encoder, timm-loadable, once the whole run is done (not at a preemption or a
            # stop_after, which resume later); the last save's barrier put every rank's shards on disk.
            if not stopped and self.cfg.tracking.log_encoder and self.step >= self.total_steps and self.last_checkpoint:
                self.tracker.log_encoder(self.last_checkpoint, self.out / "export")
            self.tracker.end("KILLED" if stopped else "FINISHED")
        return summary
