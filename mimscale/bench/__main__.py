"""``python -m mimscale.bench step|loader|decode|convert`` (the command: cli.py)."""
import os
import sys

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as pretrain.py: before torch is imported

from mimscale.bench.cli import main  # noqa: E402

sys.exit(main())
