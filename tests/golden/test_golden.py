"""Stored loss curves: every case's 20 per-step losses must equal the stored ones exactly.

A refactor that keeps behaviour keeps these bit for bit (fp32 on CPU, one thread per rank, gloo's
2-rank all-reduce: the same code path gives the same bits). A change meant to alter training
rewrites them with ``python -m tests.golden.update`` and says why in its commit message.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden.cases import CASES, STAGES, STEPS, golden_file
from tests.integration.launch import run_script_json

RUNNER = str(Path(__file__).resolve().parent / "run.py")


@pytest.mark.parametrize("stage", STAGES)
def test_golden_curves(stage, tmp_path):
    stored = json.loads(golden_file(stage).read_text())
    assert sorted(stored) == sorted(CASES)
    curves = run_script_json(RUNNER, stage, tmp_path / "curves.json", timeout=900)
    for name in CASES:
        assert len(curves[name]) == STEPS, (name, len(curves[name]))
        diffs = [(i + 1, got, want) for i, (got, want) in enumerate(zip(curves[name], stored[name])) if got != want]
        assert not diffs, f"{name} under ZeRO-{stage}: steps (step, now, stored) differ: {diffs[:5]}"
