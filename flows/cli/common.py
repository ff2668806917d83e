"""What every ``stein`` command module shares: the environment set-up and the exit on bad input (code 2).

Kept apart from :mod:`flows.cli.main` so that the command modules it registers (``flows/cli/*.py``) can import these
without importing the module that imports them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from tasks.infra.runtime import apply_offline_env, private_state_dir, project_root

EXIT_USAGE = 2

#: The bounds of the config keys these options mirror (tasks/config/sections.py: ``Seed``, ``evaluate.n_bootstrap``,
#: ``evaluate.kid_subsets``, ``evaluate.kid_subset_size``), so that an option and its key refuse the same values.
SEED = click.IntRange(0, 2**32 - 1)
N_BOOTSTRAP = click.IntRange(10, 1_000_000)
KID_SUBSETS = click.IntRange(1, 100_000)
KID_SUBSET_SIZE = click.IntRange(2, 1_000_000)


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_USAGE)


def _setup() -> Path:
    apply_offline_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = project_root()
    if (root / "dvc.yaml").is_file():  # a project: its .stein/ (stores, password hashes) is owner-only
        private_state_dir(root)
    from tasks.infra.offline_plots import ensure_template_quietly

    ensure_template_quietly(root)  # the page `dvc plots show` draws offline with, when missing (.dvc/config names it)
    return root
