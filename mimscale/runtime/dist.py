"""Process-group set-up, rank helpers, seeding and threads."""
from __future__ import annotations

import os
import random
import socket
import sys
from datetime import timedelta

import numpy as np
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """Let a plain ``python mimscale/pretrain.py`` run as a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_size() -> int:
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))


def is_rank0() -> bool:
    return rank() == 0


def set_threads(threads: int) -> int:
    """Torch intra-op threads per rank (0: the cores shared evenly by this node's ranks), so two
    ranks on two cores do not oversubscribe them."""
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_size()))
    torch.set_num_threads(threads)
    return threads


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Initialize DeepSpeed's process group (nccl on GPUs, gloo on CPU); a collective that waits
    longer than ``timeout_minutes`` for a rank fails (config key dist.timeout_minutes)."""
    import deepspeed

    ensure_env()
    # DeepSpeed JIT-builds its CPU comm op with the first ninja on PATH: the one installed beside
    # this Python (pinned in constraints.txt), always, since two ninja versions hash build commands
    # differently and every switch between them rebuilds the op (30-100 s per launch).
    here = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(here, "ninja")) and not os.environ.get("PATH", "").startswith(here + os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    _unlink_shm_workspace()


def _unlink_shm_workspace() -> None:
    """DeepSpeed's CPU backend gives each rank a 69 MB shared-memory all-reduce workspace in
    /dev/shm and never unlinks it: every CPU run would leave its ranks' files behind until /dev/shm
    (RAM) fills. Once every rank has mapped every other rank's workspace (inside
    init_distributed) the names are no longer needed, so each rank removes its own; the mappings
    stay valid until the process exits, however it exits."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    barrier()  # every rank is past its shm set-up
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank()}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # shm all-reduce not in use (e.g. ranks on several nodes)
        pass


def device() -> torch.device:
    """This rank's device, as DeepSpeed's accelerator sees it (so DS_ACCELERATOR=cpu on a GPU
    machine keeps batches on the CPU with the engine)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Barrier then destroy the group: ending without it occasionally aborts a rank at exit."""
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def log0(*args) -> None:
    if is_rank0():
        print(*args, file=sys.stderr, flush=True)


@torch.no_grad()
def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``t`` [B, ...] (the same B on every rank) concatenated in rank order ->
    ([world * B, ...], this rank's first row). No gradient flows back through the gathered rows
    (C-MAE gathers its target keys, which have none). A world of one returns ``t`` itself."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return t, 0
    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts), tdist.get_rank() * t.shape[0]
