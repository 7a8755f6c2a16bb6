"""Trainer: owns the DeepSpeed engine and the cadence (step, log, checkpoint, stop, summary).

What happens at each point of the cadence belongs elsewhere: the method's parts and hooks come
from the registry (methods.py), the log window and its ONE packed all-reduce from metrics.py,
and saving/restoring every stateful part from checkpoint.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import deepspeed
import torch

from mimscale import methods
from mimscale.checkpoint.checkpointer import Checkpointer, TrackingState, TrainState
from mimscale.checkpoint.reshard import after_universal_load
from mimscale.config import Config, to_dict
from mimscale.data.device_decode import DeviceDecoder
from mimscale.data.streams import StreamPosition, build_source, open_stream
from mimscale.ds_config import EngineSettings
from mimscale.errors import ConfigError
from mimscale.hooks.base import LoopContext
from mimscale.masking.base import MaskPlan
from mimscale.masking.noise import SampleNoise
from mimscale.masking.viz import save_plan_grid
from mimscale.optim import build_optimizer, build_scheduler, rebase_scheduler, run_length
from mimscale.runtime import dist
from mimscale.runtime.failfast import DataStallWatch
from mimscale.runtime.preempt import StopRequest
from mimscale.tracking.console import Progress
from mimscale.tracking.health import CKAHealth
from mimscale.tracking.metrics import LogWindow, MetricsFile, PhaseClock, RunMeter
from mimscale.tracking.peak import peak_flops
from mimscale.tracking.reconstruct import plan_rows, reconstruct
from mimscale.tracking.tracker import Tracker, open_run

__all__ = ["Trainer"]
META_KEYS = ("box", "flip", "index")


def single_device_path(engine, zero_stage: int, world: int) -> bool:
    """ZeRO stage 0 (the ds_config's choice) on a world of one: turn off the engine's gradient
    all-reduce, which would otherwise flatten every gradient into a bucket, "average" it over one
    rank and copy it back each step (as long as the optimizer step itself on a CPU). DeepSpeed
    reads this flag at every backward and step (it clears it itself when there is no process
    group); ZeRO 1-3 and stage 0 on more ranks keep their reduction."""
    if zero_stage != 0 or world != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


class Trainer:
    def __init__(self, cfg: Config, ds_args, eng: EngineSettings, ds_config_path: str = "",
                 stop_request: Optional[StopRequest] = None, resume_from: Optional[Path] = None,
                 resume_changes: Optional[dict] = None, universal: Optional[Path] = None):
        """``resume_from``: the tag ``checkpoint.check_resume`` resolved (None: a fresh start);
        ``resume_changes``: {key: (old, new)} config changes allowed on this resume (tagged in MLflow);
        ``universal``: that tag converted for another world size or ZeRO stage (mimscale/elastic.py)."""
        if cfg.train.global_batch is not None and cfg.train.global_batch != eng.global_batch:
            raise ConfigError(f"train.global_batch {cfg.train.global_batch} but the engine settings give {eng.global_batch}: "
                              "resolve them with load_ds_config(path, world_size, cfg.train.global_batch)")
        if cfg.train.clip_grad is not None and (eng.clip != cfg.train.clip_grad or eng.raw.get("gradient_clipping") != eng.clip):
            raise ConfigError(f"train.clip_grad {cfg.train.clip_grad:g} but the engine settings clip at {eng.clip:g}: resolve them "
                              "with load_ds_config(path, world_size, ..., clip_grad=cfg.train.clip_grad)")
        self.cfg = cfg
        self.stop_request = stop_request or StopRequest()
        self.eng = eng
        self.method = methods.of(cfg)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.device()
        self.out = Path(cfg.output_dir)
        if dist.is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
        self.threads = dist.set_threads(cfg.train.threads)

        # Same seed on every rank while building, so all ranks start from identical weights.
        dist.seed_all(cfg.train.seed)
        # ZeRO-3: parameters are partitioned as each module is built, so no rank ever holds the
        # whole model (models/partitioned.py); a method whose parts copy built weights cannot.
        self.partitioned_build = eng.zero_stage == 3 and self.method.partitioned_build(cfg)
        with deepspeed.zero.Init(config_dict_or_path=eng.raw, enabled=self.partitioned_build):
            model = methods.build_model(cfg)
        build_note = self._build_note(model, eng)
        self.num_patches = model.encoder.num_patches
        self.plan_sizes = model.masker.initial_sizes()  # (visible, masked, thrown)

        self.source = build_source(cfg.data, cfg.train.seed)
        # data.decode=nvjpeg: batches hold JPEG bytes and crop plans; to_device decodes them here
        self.decoder = DeviceDecoder(cfg.model.img_size, self.device, cfg.data.max_bad_in_a_row) if cfg.data.decode == "nvjpeg" else None
        n_samples = len(self.source)
        # Global batches per epoch: the same on any world size (the sampler deals global batches;
        # WebDataset streams, per rank by design, count the same way).
        t = cfg.train
        length = run_length(t, eng.global_batch, n_samples)  # --print-config shows the same numbers
        self.steps_per_epoch, self.total_steps, self.warmup_steps, self.lr = (length.steps_per_epoch, length.total_steps,
                                                                              length.warmup_steps, length.lr)
        optimizer = build_optimizer(model, self.lr, t.weight_decay, (t.beta1, t.beta2))
        scheduler = build_scheduler(optimizer, self.warmup_steps, self.total_steps, t.min_lr / self.lr if self.lr else 0.0)
        # The resolved JSON (accumulation derived from the recipe's global batch), not the file.
        ds_args = SimpleNamespace(**{**vars(ds_args), "deepspeed_config": None})
        self.engine, _, _, self.scheduler = deepspeed.initialize(args=ds_args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                                 config=eng.raw)
        self.single_device = single_device_path(self.engine, eng.zero_stage, self.world)
        # rank 0's console and <output_dir>/train.log (plain lines unless the console is a terminal)
        self.progress = Progress(self.out, self.total_steps, 0, dist.is_rank0(), console=sys.stderr)
        self.progress.note(
            f"[mimscale] world size {self.world}: global batch {eng.global_batch} = micro batch {eng.micro_batch} x "
            f"accumulation {eng.grad_accum} x {self.world} ranks"
            + ("" if cfg.train.global_batch else " (train.global_batch unset: the ds_config's batch, which grows with the world size)")
            + f"; lr {self.lr:.3g} (base_lr {t.base_lr:g} x {eng.global_batch}/256); {eng.precision}; ZeRO stage {eng.zero_stage}"
            + (" on one rank: no gradient all-reduce, the client AdamW steps the parameters in place" if self.single_device else "")
            + f"; {self.total_steps} steps, {self.steps_per_epoch} per epoch" + build_note)
        if t.compile:
            # DeepSpeed's own compile wraps the module so ZeRO hooks stay outside the graphs.
            self.engine.compile(backend=t.compile_backend)

        self.tracker = Tracker.disabled()
        self.peak, self.peak_source = peak_flops(self.device)
        self.clock = PhaseClock(self.device)  # forward / backward / optimizer seconds, read at log steps
        self.meter = RunMeter(eng.global_batch, self.world, self.peak)
        ctx = LoopContext(cfg=cfg, engine=self.engine, micro_batch=eng.micro_batch, zero_stage=eng.zero_stage, source=self.source,
                          out=self.out, rank=self.rank, world=self.world, device=self.device, total_steps=self.total_steps,
                          steps_per_epoch=self.steps_per_epoch, num_patches=self.num_patches,
                          log_metrics=lambda m, step: self.tracker.log_metrics(m, step),
                          mean_step_seconds=self.meter.mean_step_seconds)
        self.hooks = methods.build_hooks(cfg, ctx)
        self.health = CKAHealth(cfg, self.source, self.steps_per_epoch)

        # Everything a checkpoint carries, registered once.
        self.state = TrainState()
        self.data = StreamPosition(cfg.data.num_workers)
        self.tracking = TrackingState()
        self.checkpointer = Checkpointer(self.engine, self.out, t.keep_checkpoints, config=to_dict(cfg),
                                         background=t.ckpt_background)
        self._pending_asked: Optional[int] = None  # the pending save's step at the previous stop-request poll
        for name, part in (("train", self.state), ("data", self.data), ("method", self.hooks), ("tracking", self.tracking)):
            self.checkpointer.register(name, part)
        self.resumed_from = resume_from
        if resume_from is None:
            dist.seed_all(cfg.train.seed + 1 + self.rank)  # per-rank masking streams
        else:
            self.checkpointer.restore(resume_from, universal)  # restores this rank's RNG too (same layout)
            if universal is not None:
                after_universal_load(self.engine, universal)
            if self.scheduler.base_lrs[0] != self.lr:  # an allowed change of base_lr or batch: the new peak
                rebase_scheduler(self.scheduler, self.lr)
            self.progress.note(f"[mimscale] resumed from {resume_from} at step {self.state.step}")
        self.last_checkpoint: Optional[str] = str(resume_from) if resume_from else None
        self.resume_changes = resume_changes or {}
        self.stopped: Optional[str] = None
        self.last_save_at = time.monotonic()  # the start counts as a save for train.ckpt_every_minutes

        self.flops_per_img = methods.flops(cfg, *self.plan_sizes[:2])
        # model.grad_ckpt's recomputed forwards: hardware work, not model FLOPs (MFU leaves them out)
        self.recompute_per_img = methods.recompute_flops(cfg, *self.plan_sizes[:2])
        self.metrics_file = MetricsFile(self.out / "metrics.jsonl")
        if dist.is_rank0():
            self._start_tracking(ds_args, ds_config_path)
        self.loss_history: list[dict] = []
        self.last_metrics: dict = {}
        self.term_names: list[str] = []  # the model's loss terms, known after the first log step

    def _build_note(self, model, eng: EngineSettings) -> str:
        """What the start-up line says about a ZeRO-3 build: this rank's share of the parameters."""
        if eng.zero_stage != 3:
            return ""
        if not self.partitioned_build:
            return (f"; ZeRO-3: method {self.method.name} builds the whole model on every rank before partitioning "
                    "(its parts copy built weights)")
        params = list(model.parameters())
        whole = sum(p.ds_numel * p.element_size() for p in params)
        mine = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        return f"; ZeRO-3: built under deepspeed.zero.Init, this rank holds {mine / 2**20:.1f} of {whole / 2**20:.1f} MiB of parameters"

    def _start_tracking(self, ds_args, ds_config_path: str) -> None:
        """Rank 0: the MLflow run (the resumed one, if any) and metrics.jsonl trimmed to the step
        we start from (steps a crash made us redo)."""
        derived = {"lr": self.lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "world_size": self.world,
                   "global_batch": self.eng.global_batch, "micro_batch": self.eng.micro_batch, "grad_accum": self.eng.grad_accum}
        tags = {f"mimscale.resume_change.{k}": f"{old!r} -> {new!r}" for k, (old, new) in self.resume_changes.items()}
        self.tracker = open_run(self.cfg, self.out, run_id=self.tracking.run_id, derived=derived, ds_raw=self.eng.raw,
                                preset=getattr(ds_args, "config", None), ds_config=ds_config_path, tags=tags, data_source=self.source)
        self.tracking.run_id = self.tracker.run_id or self.tracking.run_id
        self.metrics_file.trim(self.state.step)

    # ------------------------------------------------------------------ one step
    # The loop and ``python -m mimscale.bench step`` both train through these four calls:
    # to_device -> with_noise -> forward_backward -> optimizer_step (micro_step = the last two).
    def to_device(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """A loader batch on the device: images [B, 3, S, S] uint8 and the meta the model reads
        (box, flip, index, and what the method's hooks add, e.g. AMT's attention maps). A batch of
        JPEG bytes (data.decode=nvjpeg) is decoded, cropped and resized on the device first; a row
        the device cannot decode is replaced in ``batch`` (meta included) and counted in its skipped."""
        if "jpeg" in batch:
            images = self.decoder(batch)
        else:
            images = batch["image"].to(self.device, non_blocking=True)
        pairs = [*((k, batch[k]) for k in META_KEYS), *self.hooks.host_inputs(batch).items()]
        return images, {k: v.to(self.device, non_blocking=True) for k, v in pairs}

    def with_noise(self, meta: dict, step: int, micro: int) -> dict:
        """``meta`` plus the masks' keyed noise of micro batch ``micro`` of optimizer step ``step``:
        keyed by its place in the global batch (sampler.py's chunk order), so masks do not depend
        on the world size."""
        offset = (micro * self.world + self.rank) * self.eng.micro_batch
        return {**meta, "noise": SampleNoise(self.cfg.train.seed, step, offset, self.eng.global_batch)}

    def forward_backward(self, images: torch.Tensor, meta: dict) -> tuple[torch.Tensor, dict]:
        """The model's forward and the engine's backward for one micro batch (under ZeRO the
        backward includes the gradient reduction hooks). Returns (loss, loss terms) on the device."""
        self.clock.start()
        loss, terms = self.engine(images, meta)
        self.clock.mark("forward")
        self.engine.backward(loss)
        self.clock.mark("backward")
        return loss, terms

    def optimizer_step(self) -> bool:
        """The engine's step (optimizer, clipping, LR at accumulation boundaries) and, at a
        boundary, the method's after-step hooks (EMA copies). Returns whether it was a boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()  # asked before step() advances the count
        self.clock.start()
        self.engine.step()
        if boundary:
            self.hooks.after_optimizer_step()
        self.clock.mark("optimizer")
        return boundary

    def micro_step(self, images: torch.Tensor, meta: dict) -> tuple[torch.Tensor, dict]:
        """Forward, backward and the engine's step for one micro batch."""
        loss, terms = self.forward_backward(images, meta)
        self.optimizer_step()
        return loss, terms

    def prime_method(self) -> Optional[float]:
        """Bring the method's state to its steady form now (AMT: fill the attention store, so
        steps mask *and throw*), for a benchmark that times steady steps; seconds spent, or None
        for a method with nothing to prime."""
        return self.hooks.prime()

    # ------------------------------------------------------------------ the loop
    def save(self) -> None:
        """A checkpoint of this step on every rank. In the background mode (train.ckpt_background)
        it returns once staged; ``_published`` runs when its marker is out (``_agree_on_writes``,
        the next save, or the end of ``fit``)."""
        published = self.checkpointer.finish_pending()  # a save still writing: wait for it first
        if published is not None:
            self._published(published)
        path = self.checkpointer.save(self.state.step, marker_extra=self.hooks.marker_extra())
        self.last_save_at = time.monotonic()  # train.ckpt_every_minutes counts training time, from a save's end
        if self.checkpointer.pending_step() is None:
            self._published(path)

    def _published(self, path) -> None:
        """A checkpoint is complete on disk (its marker published)."""
        self.last_checkpoint = str(path)
        self.hooks.after_save()

    def finish_saves(self) -> None:
        """Every rank: the pending background save waited for and published (collective: call it
        where every rank is, the end of fit or an error every rank raised at the same step)."""
        published = self.checkpointer.finish_pending()
        if published is not None:
            self._published(published)

    def fit(self) -> dict:
        cfg, eng, state = self.cfg, self.eng, self.state
        end = min(self.total_steps, cfg.train.stop_after or self.total_steps)
        if state.step >= end:  # e.g. a requeued job that had already finished: keep its summary
            dist.log0(f"[mimscale] nothing to do: the checkpoint is at step {state.step} and the run ends at step {end}")
            previous = self.out / "summary.json"
            return json.loads(previous.read_text()) if previous.is_file() else self.finish()
        self.stop_request.attach()
        # Position in the data stream from samples seen: global batches done, each this rank's
        # `accumulation` micro batches (a resume on another world size continues at the same sample).
        start = state.samples_seen // eng.global_batch * eng.grad_accum
        loader = open_stream(cfg.data, self.source, img_size=cfg.model.img_size, micro_batch=eng.micro_batch,
                             rank=self.rank, world_size=self.world, seed=cfg.train.seed,
                             start_micro_batch=start, position=self.data, pin_memory=self.device.type == "cuda",
                             accumulation=eng.grad_accum)
        it = iter(loader)
        self.progress.advance(state.step)  # a resumed run's bar starts where it stopped
        win = LogWindow(self.device, state.step, self.clock)
        stall = DataStallWatch(cfg.data.stall_seconds, f"data.source={cfg.data.source} {cfg.data.path}".rstrip(), self.rank)
        with stall:
            stopped = self._loop(it, end, win, stall)
        self.stop_request.drain()
        if stopped:
            self.progress.note(f"[mimscale] {stopped} received: saving a checkpoint at step {state.step} and exiting")
            self.save()
        self.finish_saves()
        self.checkpointer.close()
        self.progress.close()
        self.stopped = stopped
        return self.finish(stopped)

    def _loop(self, it, end: int, win: LogWindow, stall: DataStallWatch) -> Optional[str]:
        """Optimizer steps until ``end`` or an agreed stop request (whose signal name it returns)."""
        cfg, eng, state = self.cfg, self.eng, self.state
        while state.step < end:
            win.exclude(self.hooks.before_step(state.step))  # a refresh is not billed to the training steps
            for micro in range(eng.grad_accum):
                t = time.perf_counter()
                stall.waiting()
                batch = next(it)
                stall.got(batch)
                self.data.observe(batch)
                images, meta = self.to_device(batch)  # decode=nvjpeg: the decode counts as data wait, its skips are counted
                wait = time.perf_counter() - t
                win.add_batch(batch, wait)
                win.add_micro(*self.micro_step(images, self.with_noise(meta, state.step, micro)))
            state.step += 1
            state.samples_seen += eng.global_batch
            win.end_step()
            self.progress.advance()
            if self.health.due(state.step):  # every rank: the encoder's forwards are collective under ZeRO-3
                t = time.perf_counter()
                cka = self.health.run(self.engine.module.encoder)
                win.exclude(time.perf_counter() - t)
                if cka and dist.is_rank0():
                    self.tracker.log_metrics(cka, state.step)
                    self.metrics_file.append(state.step, cka)  # a line of its own: the report's CKA curve
            grid_every = cfg.tracking.mask_grid_every
            if grid_every and state.step % grid_every == 0:  # every rank: the reconstruction's forward is collective under ZeRO-3
                t = time.perf_counter()
                self._log_mask_grid(images)
                win.exclude(time.perf_counter() - t)
            minutes = cfg.train.ckpt_every_minutes
            due = bool(minutes) and dist.is_rank0() and time.monotonic() - self.last_save_at >= 60.0 * minutes
            # the same answers on every rank; `busy`: this rank's files of a background save are still being written
            asked = self.checkpointer.pending_step()
            stop, timed_save, idle = self.stop_request.poll(save_due=due, busy=self.checkpointer.writing())
            if idle and self._pending_asked is not None and self._pending_asked == self.checkpointer.pending_step():
                self._published(self.checkpointer.publish_pending())  # every rank had written it at the last poll
            self._pending_asked = asked
            ckpt_now = state.step % cfg.train.ckpt_every == 0 or state.step == end or timed_save
            # Every rank takes the same branch (the all-reduce in _log): decided on the step
            # count and the agreed stop request only.
            if state.step % cfg.train.log_every == 0 or ckpt_now or stop:
                self._log(win)
                if stop:
                    return self.stop_request.signal_name or "SIGTERM"
                ckpt_s = 0.0
                if ckpt_now:
                    t = time.perf_counter()
                    self.save()
                    ckpt_s = time.perf_counter() - t
                win.reset()  # after the save: checkpoint time is not billed to training steps
                win.note_checkpoint(ckpt_s)  # but the next log line reports it
        return None

    def _log(self, win: LogWindow) -> None:
        """Close the log window (its one packed all-reduce), then rank-0 logging. Raises TrainingDiverged."""
        self.refresh_plan_flops()

        def grad_norm() -> Optional[float]:
            g = self.engine.get_global_grad_norm()
            return float(g) if g is not None else None

        w = win.close(self.state.step, self.world, grad_norm, self.last_checkpoint)
        self.term_names = win.term_names or []
        self.state.skipped += w["skipped"]
        self.state.converted += w["converted"]
        timed = self.meter.add(w["steps"], w["seconds"], self.flops_per_img)
        mfu = self.meter.mfu(timed.img_per_s, self.flops_per_img)
        metrics = {
            "loss": w["loss"],
            **w["terms"],
            "lr": float(self.engine.get_lr()[0]),
            "img_per_s": timed.img_per_s,
            "step_s": w["seconds"] / w["steps"],
            "data_wait_pct": w["data_wait_pct"],
            **{f"time/{k}": v for k, v in w["time"].items()},
            "skipped_images": float(self.state.skipped),
            "converted_images": float(self.state.converted),
            "epoch": self.state.step / self.steps_per_epoch,
            "gflop_per_img": self.flops_per_img / 1e9,  # follows the plan (AMT: drops at the first refresh)
        }
        if mfu is not None:
            metrics["mfu"] = mfu
            if self.recompute_per_img:  # hardware FLOP utilisation: the model's FLOPs plus the recomputation
                metrics["hfu"] = self.meter.mfu(timed.img_per_s, self.flops_per_img + self.recompute_per_img)
        if self.recompute_per_img:
            metrics["gflop_recompute_per_img"] = self.recompute_per_img / 1e9
        if w["grad_norm"] is not None:
            metrics["grad_norm"] = w["grad_norm"]
        self.last_metrics = metrics
        if dist.is_rank0():
            self.loss_history.append({"step": self.state.step, "loss": w["loss"]})
            self.tracker.log_metrics(metrics, self.state.step)
            per_step = self.meter.mean_step_seconds() or metrics["step_s"]
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            self.progress.step(self.state.step, metrics, per_step * (self.total_steps - self.state.step), mem)
            self.metrics_file.append(self.state.step, metrics)

    def refresh_plan_flops(self) -> None:
        """FLOPs per image follow the plan actually used (AMT switches from random masking to
        masking-and-throwing at its first refresh); shapes only, no device sync."""
        plan: Optional[MaskPlan] = self.engine.module.last_plan
        if plan is None:
            return
        sizes = (plan.visible.shape[1], plan.masked.shape[1], plan.thrown.shape[1])
        if sizes != self.plan_sizes:
            self.plan_sizes = sizes
            self.flops_per_img = methods.flops(self.cfg, *sizes[:2])
            self.recompute_per_img = methods.recompute_flops(self.cfg, *sizes[:2])

    def _log_mask_grid(self, images: torch.Tensor) -> None:
        """original | masked input | reconstruction | + visible pasted (| masker weights) for the
        first samples of the last micro batch (masking/viz.py), as a PNG artifact under mask_grids/.
        Every rank runs the reconstruction's forward (ZeRO-3 gathers parameters in it); rank 0 draws."""
        model = self.engine.module
        plan = model.last_plan
        if plan is None:
            return
        n = min(self.cfg.tracking.mask_grid_rows, images.shape[0])
        recon = reconstruct(model, images[:n], plan_rows(plan, n))
        if not dist.is_rank0():
            return
        path = self.out / "mask_grids" / f"step{self.state.step:08d}.png"
        weights = getattr(model.masker, "last_weights", None)
        try:
            save_plan_grid(path, images, plan, weights, model.patch_size, recon, rows=n)
        except OSError as e:  # a full disk must not stop training
            dist.log0(f"[mimscale] could not write {path}: {e}")
            return
        self.tracker.log_artifact(path, "mask_grids")

    def finish(self, stopped: Optional[str] = None) -> dict:
        plan: Optional[MaskPlan] = self.engine.module.last_plan
        summary = {
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "samples_seen": self.state.samples_seen,
            "loss_history": self.loss_history,
            "final_loss": self.loss_history[-1]["loss"] if self.loss_history else None,
            "img_per_s": self.meter.img_per_s(),
            "mfu": self.meter.run_mfu(),  # None: unknown peak
            "gflop_per_img": self.flops_per_img / 1e9,
            "peak_gflops_per_rank": self.peak / 1e9 if self.peak else None,
            "peak_source": self.peak_source,
            "data_wait_pct": self.last_metrics.get("data_wait_pct"),
            "skipped_images": self.state.skipped,
            "converted_images": self.state.converted,
            "checkpoint": self.last_checkpoint,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "stopped_by": stopped,
            "world_size": self.world,
            "global_batch": self.eng.global_batch,
            "precision": self.eng.precision,
            "zero_stage": self.eng.zero_stage,
            "mlflow_tracking_uri": self.tracker.uri,
            "mlflow_run_id": self.tracking.run_id,
            "masking": self.method.name,
            # fractions of the patches in the last batch's plan
            "mask_fractions": plan.fractions() if plan is not None else None,
            # the last log window's loss terms (loss_rec; AutoMAE: loss_g, loss_d, d_real, d_fake)
            **{k: self.last_metrics.get(k) for k in self.term_names},
            **self.hooks.summary(),
            "cka": self.health.last or None,  # the last health check (cka/r<ratio>/last|mean), if one ran
        }
        if dist.is_rank0():
            path = self.out / "summary.json"
            path.write_text(json.dumps(summary, indent=2))
            final = {f"final_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            self.tracker.log_metrics(final, self.state.step)
            self.tracker.log_artifact(path)
        return summary

    @property
    def stopped_early(self) -> bool:
        """Stopped on a signal before the last step (a stop that came at the last step is a finished run)."""
        return bool(self.stopped) and self.state.step < self.total_steps

    def close(self) -> None:
        """Rank 0's end of the run that needs no other rank: the final encoder exported and uploaded
        (once the whole run is done, not at a preemption or a stop_after, which resume later), and
        the MLflow run ended. Call it after the process group is gone (pretrain.py does), so its
        length (a ViT-H upload) cannot time out the other ranks' collectives."""
        if not dist.is_rank0():
            return
        done = not self.stopped_early and self.state.step >= self.total_steps
        if done and self.cfg.tracking.log_encoder and self.last_checkpoint:
            self.tracker.log_encoder(self.last_checkpoint, self.out / "export")
        self.tracker.end("KILLED" if self.stopped_early else "FINISHED")
