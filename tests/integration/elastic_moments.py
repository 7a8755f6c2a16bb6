"""Run pretrain.py's main and dump the optimizer's Adam moments by parameter name, under the real
launcher (or as one process):

    deepspeed --num_gpus 2 tests/integration/elastic_moments.py <dump.pt> <when> -- <pretrain.py arguments>

when: ``save@N`` after the checkpoint of step N is written, ``restore`` right after a resume
loaded its checkpoint. Rank 0 writes {name: {"exp_avg", "exp_avg_sq", "fp32"}} (whole tensors,
gathered the way DeepSpeed's safe_get_full_* helpers do for every ZeRO stage) to <dump.pt>.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from mimscale import pretrain  # noqa: E402
from mimscale.checkpoint.checkpointer import Checkpointer  # noqa: E402
from mimscale.runtime import dist  # noqa: E402


def relink(engine) -> None:
    """DeepSpeed 0.19.8's ZeRO-1/2 optimizer links the parameters' views of the Adam state after the
    FIRST param group's first step, so the second group's parameters (no weight decay) are left
    without one and safe_get_full_optimizer_state raises "exp_avg not found". Link them again (a
    read-side fix: the optimizer and its checkpoints are unaffected)."""
    opt = engine.optimizer
    if getattr(opt, "_hp_optimizer_states_linked", False) and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def dump(engine, path: Path) -> None:
    """Every rank calls (ZeRO-1/2 all-reduce, ZeRO-3 gathers); rank 0 writes."""
    out = {}
    if int(engine.zero_optimization_stage()) == 0:  # the client AdamW's own state, no ZeRO mapping
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                st = engine.optimizer.state[p]
                out[name] = {"exp_avg": st["exp_avg"].detach().cpu().clone(), "exp_avg_sq": st["exp_avg_sq"].detach().cpu().clone(),
                             "fp32": p.detach().float().cpu().clone()}
        if dist.is_rank0():
            torch.save(out, path)
        return
    relink(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out[name] = {"exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                     "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
                     "fp32": safe_get_full_fp32_param(p).detach().cpu().clone()}
    if dist.is_rank0():
        torch.save(out, path)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    path, when = Path(args[0]), args[1]
    rest = args[args.index("--") + 1:]
    if when.startswith("save@"):
        at = int(when.split("@")[1])
        original_save = Checkpointer.save

        def save(self, step, marker_extra=None):
            tag = original_save(self, step, marker_extra)
            if step == at:
                dump(self.engine, path)
            return tag

        Checkpointer.save = save
    elif when == "restore":
        original_restore = Checkpointer.restore

        def restore(self, tag_dir, universal=None):
            original_restore(self, tag_dir, universal)
            dump(self.engine, path)

        Checkpointer.restore = restore
    else:
        raise SystemExit(f"when: save@N or restore, got {when!r}")
    return pretrain.main(rest)


if __name__ == "__main__":
    sys.exit(main())
