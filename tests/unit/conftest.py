"""Unit-test configuration for the pure-math package ``stein_core``."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too so that tests/unit runs standalone without warnings.
    config.addinivalue_line("markers", "slow: long statistical test (deselect with -m 'not slow')")
