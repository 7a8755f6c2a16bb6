"""Rewrite the stored golden loss curves from the code as it is now:

    python -m tests.golden.update

Run it only when a change in training behaviour is intended, and say why in the commit message;
tests/golden/test_golden.py compares every later run to these files exactly.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests.golden.cases import CASES, STAGES, golden_file
from tests.integration.launch import run_script_json

RUNNER = str(Path(__file__).resolve().parent / "run.py")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            curves = run_script_json(RUNNER, stage, Path(tmp) / f"zero{stage}.json", timeout=900)
            assert sorted(curves) == sorted(CASES), curves.keys()
            golden_file(stage).write_text(json.dumps(curves, indent=1) + "\n")
            print(f"wrote {golden_file(stage)}: {', '.join(f'{k} {v[0]:.4f}->{v[-1]:.4f}' for k, v in curves.items())}")


if __name__ == "__main__":
    main()
