"""Run pretrain.py's main with one fault injected, under the real launcher:

    deepspeed --num_gpus 2 tests/faults/inject.py <fault> <rank> <step> -- <pretrain.py arguments>

faults:
  raise       that rank raises RuntimeError in its micro step of optimizer step <step>
  slow_close  rank 0's end-of-run work (export, upload) sleeps <step> seconds first
  enospc      that rank's checkpoint save of step <step> fails with OSError(ENOSPC): in its background
              writer (train.ckpt_background, the default: the error reaches the training thread
              at the next step's poll), or at the save's start with a blocking save
  hold_save   in step <step>'s save, once that rank wrote its files (before fsync and marker), it
              creates <output_dir>/HOLDING and sleeps (the test kills it there: a crash mid-save);
              a background save (train.ckpt_background) holds in its writer thread, before the
              fsync of the tag's first file, while training goes on
"""
from __future__ import annotations

import errno
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mimscale import pretrain  # noqa: E402
from mimscale.checkpoint import checkpointer  # noqa: E402
from mimscale.checkpoint.checkpointer import Checkpointer  # noqa: E402
from mimscale.runtime import dist  # noqa: E402
from mimscale.trainer import Trainer  # noqa: E402


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    fault, rank, step = args[0], int(args[1]), float(args[2])
    rest = args[args.index("--") + 1:]
    if fault == "raise" and dist.rank() == rank:
        original = Trainer.micro_step

        def micro_step(self, images, meta):
            if self.state.step + 1 == int(step):
                raise RuntimeError(f"injected fault on rank {rank} at step {int(step)}")
            return original(self, images, meta)

        Trainer.micro_step = micro_step
    elif fault == "slow_close":
        original_close = Trainer.close

        def close(self):
            if dist.is_rank0():
                time.sleep(step)
            original_close(self)

        Trainer.close = close
    elif fault == "enospc" and dist.rank() == rank:
        original_save = Checkpointer.save
        original_fsync_file = checkpointer._fsync_file

        def save(self, at, marker_extra=None):
            if at == int(step) and not self.background:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return original_save(self, at, marker_extra)

        def fsync_file(path):
            if Path(path).parent.name == f"step{int(step):08d}":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            original_fsync_file(path)

        Checkpointer.save = save
        checkpointer._fsync_file = fsync_file
    elif fault == "hold_save" and dist.rank() == rank:
        original_fsync = checkpointer._fsync_written

        def fsync_written(tag_dir, r):
            if tag_dir.name == f"step{int(step):08d}":  # every file of this rank written, none fsynced, no marker
                (tag_dir.parents[1] / "HOLDING").touch()
                time.sleep(600)
            original_fsync(tag_dir, r)

        checkpointer._fsync_written = fsync_written
        original_fsync_file = checkpointer._fsync_file

        def fsync_file(path):
            if Path(path).parent.name == f"step{int(step):08d}":
                (Path(path).parents[2] / "HOLDING").touch()
                time.sleep(600)
            original_fsync_file(path)

        checkpointer._fsync_file = fsync_file
    return pretrain.main(rest)


if __name__ == "__main__":
    sys.exit(main())
