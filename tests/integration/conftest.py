"""Fixtures shared by the integration tests."""
from __future__ import annotations

import pytest

from tests.integration.launch import ZERO_STAGES, run_script_json


@pytest.fixture(scope="session")
def zero_checks(tmp_path_factory) -> dict:
    """One 2-rank launch of tests/integration/zero_checks.py for ZeRO 1, 2 and 3 in turn (R-MAE and
    C-MAE, AutoMAE's gradient routing, AMT's attention pass; each against plain torch), shared by
    test_views.py, test_automae.py and test_amt.py:
    {"1": {"views": ..., "automae": ..., "amt": ...}, "2": ..., "3": ...}."""
    out = tmp_path_factory.mktemp("zero_checks") / "checks.json"
    return run_script_json("tests/integration/zero_checks.py", ",".join(map(str, ZERO_STAGES)), out)
