"""AMT's side of the training loop: when to refresh the attention store, the refresh itself,
per-batch map lookup, and what a checkpoint and the summary record.

The Trainer calls (all ranks, same order):
  load_state_dict(s)   after loading a checkpoint (generation and refresh records)
  before_step(step)    refreshes when ``step`` is a scheduled refresh step; returns seconds spent
  host_inputs(batch)   {"attn": [B, L] float16} on the host, moved to the device with the batch
  state_dict(), marker_extra(), after_save(), summary()

Refresh (each rank): one whole-image pass over its share of the dataset (data/full_pass.py),
the no-grad CLS-attention forward of the current encoder (ViTEncoder cls_attention mode, so
ZeRO-3 gathers its parameters in the module hooks), rows written into a new store generation,
then a barrier. Under ZeRO-3 every forward is a collective (parameter all-gathers), so ranks step
in lockstep: a rank whose share is done runs dummy forwards until the last rank is.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import deepspeed.comm as ds_comm
import torch

from mimscale.checkpoint import checkpointer
from mimscale.data.streams import open_full_pass
from mimscale.hooks.base import LoopContext, LoopHooks
from mimscale.masking.amt_store import AttentionStore, prune
from mimscale.runtime import dist

# masking.amt.normalize -> ViTEncoder's cls_attention mode: Algorithm 1 of the AMT paper (average
# the heads' CLS attention, then min-max over patches) or min-max per head before the average
NORMALIZE_MODES = {"mean_then_minmax": "amt", "minmax_then_mean": "amt_per_head"}


def parse_when(text: str, total_epochs: float) -> float:
    """A refresh time in epochs: ``"40"`` (epochs) or ``"10%"`` (of the run's epochs)."""
    s = str(text).strip()
    if s.endswith("%"):
        return float(s[:-1]) / 100.0 * total_epochs
    return float(s)


def refresh_steps(first: str, every: str, total_steps: int, steps_per_epoch: int) -> list[int]:
    """Optimizer steps before which the store is refreshed: epochs first, first + every, ...
    that fall before the end of the run."""
    total_epochs = total_steps / steps_per_epoch
    f, e = parse_when(first, total_epochs), parse_when(every, total_epochs)
    out: list[int] = []
    k = 0
    while True:
        s = int(round((f + k * e) * steps_per_epoch))
        if s >= total_steps:
            return out
        if not out or s > out[-1]:
            out.append(s)
        k += 1


class AMTRefresh(LoopHooks):
    def __init__(self, ctx: LoopContext):
        self.t = ctx
        self.cfg = ctx.cfg.masking.amt
        self.num_samples = len(ctx.source)
        self.num_patches = ctx.num_patches
        self.schedule = refresh_steps(self.cfg.first_refresh, self.cfg.refresh_every, ctx.total_steps, ctx.steps_per_epoch)
        self.generation = 0  # refreshes done = index into the schedule
        # generations named by saves whose COMPLETE marker is not out yet (a background save still
        # writing): kept by after_save like those of complete checkpoints
        self.unpublished: set[int] = set()
        self.store: Optional[AttentionStore] = None
        self.records: list[dict] = []
        self.redo_at_start = False
        dist.log0(f"[mimscale] AMT: attention refreshes before steps {self.schedule or 'none (the run is too short)'}")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"generation": self.generation, "refreshes": self.records}

    def marker_extra(self) -> dict:
        self.unpublished.add(self.generation)  # until a complete tag names it (after_save)
        return {"amt_generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint of a run without AMT's store (e.g. another method): nothing refreshed yet
            return
        self.generation = int(state["generation"])
        self.records = list(state["refreshes"])
        if not self.generation:
            return
        if AttentionStore.complete(self.t.out, self.generation) is None:
            dist.log0(f"[mimscale] AMT: store generation {self.generation} is missing from {self.t.out}/amt: recomputing it now")
            self.redo_at_start = True
            return
        self.store = AttentionStore.open(self.t.out, self.generation, self.num_samples, self.num_patches)

    def after_save(self) -> None:
        """Drop store generations no checkpoint on disk (and not the run itself) refers to."""
        if not dist.is_rank0():
            return
        named = {int(checkpointer.read_marker(d).get("amt_generation", 0))
                 for _, d in checkpointer.complete_tags(checkpointer.checkpoint_root(self.t.out))}
        prune(self.t.out, {self.generation} | self.unpublished | named)
        # a generation a complete tag names is kept through that tag from now on; a background save
        # still writing keeps its own until its marker is out and this runs again
        self.unpublished -= named

    # ------------------------------------------------------------------ per step
    def before_step(self, step: int) -> float:
        if self.redo_at_start:
            self.redo_at_start = False
            return self.refresh(self.generation, step)
        if step in self.schedule and self.schedule.index(step) + 1 > self.generation:
            return self.refresh(self.schedule.index(step) + 1, step)
        return 0.0

    def host_inputs(self, batch: dict) -> dict:
        return {} if self.store is None else {"attn": self.store.lookup(batch["index"])}

    def prime(self) -> float:
        """The first refresh now (generation 1 at step 0): later steps mask and throw."""
        return self.refresh(max(1, self.generation), 0)

    def summary(self) -> dict:
        return {"amt_refreshes": self.records, "amt_generation": self.generation}

    # ------------------------------------------------------------------ the refresh
    def refresh(self, generation: int, step: int) -> float:
        t, cfg = self.t, self.cfg
        t0 = time.perf_counter()
        if dist.is_rank0():
            AttentionStore.create(t.out, generation, self.num_samples, self.num_patches)
        dist.barrier()
        store = AttentionStore.open(t.out, generation, self.num_samples, self.num_patches, writable=True)
        model = t.engine.module
        encoder = model.encoder
        dtype = encoder.patch_embed.proj.weight.dtype
        lockstep = t.zero_stage == 3
        batch_size = cfg.refresh_batch or 4 * t.micro_batch
        mode = NORMALIZE_MODES[cfg.normalize]  # which order of head average and min-max (models/vit.py)
        loader = open_full_pass(t.cfg.data, t.source, img_size=t.cfg.model.img_size, batch_size=batch_size,
                                rank=t.rank, world_size=t.world, seed=t.cfg.train.seed)
        it, done = iter(loader), False
        written = skipped = 0
        first = -1
        with torch.no_grad():
            while True:
                batch = None if done else next(it, None)
                done = batch is None
                more = torch.tensor([0.0 if done else 1.0], device=t.device)
                ds_comm.all_reduce(more, op=ds_comm.ReduceOp.MAX)
                if more.item() == 0:
                    break
                n = 0 if done else len(batch["index"])
                if n:
                    images = batch["image"].to(t.device, non_blocking=True)
                    maps = encoder(model.normalize(images).to(dtype), cls_attention=mode)  # [B, L] fp32
                    store.write(batch["index"], maps)
                    written += n
                    first = int(batch["index"][0]) if first < 0 else first
                elif lockstep:  # keep this rank's parameter all-gathers in step with the others
                    encoder(torch.zeros(1, 3, t.cfg.model.img_size, t.cfg.model.img_size, device=t.device, dtype=dtype), cls_attention=mode)
                if not done:
                    skipped += int(batch.get("skipped", 0))
        store.flush()
        counts = torch.tensor([written, skipped], dtype=torch.float64, device=t.device)
        ds_comm.all_reduce(counts)
        firsts = torch.full((t.world,), -1.0, dtype=torch.float64, device=t.device)
        firsts[t.rank] = first
        ds_comm.all_reduce(firsts, op=ds_comm.ReduceOp.MAX)
        dist.barrier()
        # Every rank reads one row each rank wrote: a node whose output_dir is not shared storage
        # would see zeros where the others wrote (train on unrelated maps, silently).
        probe = [int(i) for i in firsts.tolist() if i >= 0]
        unseen = torch.tensor([float(any(g != generation for g in store.generations_of(probe)))], device=t.device)
        ds_comm.all_reduce(unseen, op=ds_comm.ReduceOp.MAX)
        if unseen.item():
            raise RuntimeError(f"AMT store {store.path}: rows written by other ranks are not visible on every rank; "
                               "output_dir must be on storage shared by all nodes")
        store.close()
        seconds = time.perf_counter() - t0
        step_s = t.mean_step_seconds()
        record = {
            "generation": generation, "step": step, "epoch": step / t.steps_per_epoch,
            "samples": int(counts[0].item()), "skipped": int(counts[1].item()), "seconds": seconds,
            # the refresh against one epoch of training steps at the speed measured so far
            "pct_of_epoch": 100.0 * seconds / (step_s * t.steps_per_epoch) if step_s else None,
        }
        if dist.is_rank0():
            AttentionStore.mark_complete(t.out, generation, {**record, "num_samples": self.num_samples, "num_patches": self.num_patches})
        dist.barrier()
        self.store = AttentionStore.open(t.out, generation, self.num_samples, self.num_patches)
        self.generation = generation
        self.records = [r for r in self.records if r["generation"] < generation] + [record]
        self.after_save()  # the previous generation may no longer be needed
        pct = f"{record['pct_of_epoch']:.1f}% of an epoch" if record["pct_of_epoch"] is not None else "epoch time not measured yet"
        dist.log0(f"[mimscale] AMT refresh {generation} at step {step}: {record['samples']} maps in {seconds:.1f} s ({pct})")
        metrics = {"amt_refresh_s": seconds, "amt_generation": float(generation)}
        if record["pct_of_epoch"] is not None and math.isfinite(record["pct_of_epoch"]):
            metrics["amt_refresh_pct_of_epoch"] = record["pct_of_epoch"]
        t.log_metrics(metrics, step)
        return seconds
