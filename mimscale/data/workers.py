"""What every DataLoader worker process of every loader sets up first (one policy for all)."""
from __future__ import annotations

import signal

import cv2
import torch


def worker_init(_worker_id: int) -> None:
    # Preemption (Slurm/K8s) signals the whole process group; the trainer saves a checkpoint on
    # SIGTERM and needs its workers alive until it has done so.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one resize per call: a thread pool per worker only oversubscribes the cores
