"""Shared by the end-to-end modules: one Prefect server per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def prefect_api(repo) -> Iterator[str]:
    """The URL of one Prefect server for every `stein` command of a module (whose ``repo`` fixture is its project
    copy), stopped with its process group when the module is done. Its database lives in the copy's .stein/prefect,
    like the server `stein run` starts. Starting a server takes 10-35 s on a 2-core machine; a module's runs would
    each start one."""
    from flows.local import prefect_server

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)  # always a server of our own, never one the caller points to
        mp.setenv("PREFECT_HOME", str(repo / ".stein" / "prefect"))
        with prefect_server(timeout=180) as url:
            yield url
