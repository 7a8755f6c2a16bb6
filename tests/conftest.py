"""Markers: ``slow`` tests run by default (CI runs them); deselect with ``pytest -m "not slow"``."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long end-to-end runs (deselect with -m 'not slow')")
