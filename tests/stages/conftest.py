"""Fixtures shared by the stage tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory):
    from tasks.config import ImagePrepare
    from tasks.prepare import prepare_images

    d = tmp_path_factory.mktemp("digits")
    prepare_images.fn(ImagePrepare(seed=0), d / "train.parquet", d / "test.parquet")
    return d
