"""``python -m mimscale.bench step|loader|decode|convert`` (the command: cli.py)."""
import sys

from mimscale.bench.cli import main

sys.exit(main())
