"""Unit-test configuration for the pure-math package ``stein_core``."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too so that tests/unit runs standalone without warnings.
    config.addinivalue_line("markers", "slow: long statistical test (deselect with -m 'not slow')")


@pytest.fixture
def round_trip(tmp_path):
    """``round_trip(net, cls)``: save ``net.model_args`` and its weights, load them with ``weights_only=True`` and
    rebuild a ``cls`` from them (what a checkpoint of the pipeline does)."""
    import torch

    def rebuild(net, cls):
        path = tmp_path / "ckpt.pt"
        torch.save({"model_args": net.model_args, "state_dict": net.state_dict()}, path)
        ckpt = torch.load(path, weights_only=True)
        rebuilt = cls(**ckpt["model_args"])
        rebuilt.load_state_dict(ckpt["state_dict"])
        return rebuilt

    return rebuild
