"""mimscale: throughput-focused masked image modeling pretraining on DeepSpeed."""

__version__ = "0.1.0"
