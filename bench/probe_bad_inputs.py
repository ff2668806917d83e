"""The reliability table of bench/RESULTS.md §7: every bad-input case of tests/stages/test_bad_inputs.py through
the real command line, in a fresh copy of the project with real outputs, one markdown row per case (exit code,
the last line the user sees, outputs changed).

    .venv/bin/python bench/probe_bad_inputs.py [--out table.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(name: str, command: str, proc, changed: int, seconds: float) -> str:
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    last = re.sub(r"/tmp/probe-[^/]+/repo", "<copy>", last.replace(str(REPO), ".")).replace("|", "\\|")
    last = last if len(last) <= 150 else last[:147] + "..."
    return f"| {name} | `{command}` | {proc.returncode} | {last} | {changed} | {seconds:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    m = _module("bad_inputs", REPO / "tests" / "stages" / "test_bad_inputs.py")
    copy_project = _module("tests_conftest", REPO / "tests" / "conftest.py").copy_project
    from flows.local import prefect_server

    rows = ["| case | command | exit | last line of stderr | outputs changed | s |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="probe-") as d:
        repo = m.build_repo(Path(d) / "repo", copy_project)
        conf = repo / "conf" / "gmm2d.yaml"
        original = conf.read_bytes()
        for name, change, _fragment in m.CONFIG_CASES:
            new = m._apply(change, original.decode())
            before = m.snapshot(repo)
            conf.write_bytes(new if isinstance(new, bytes) else new.encode())
            t0 = time.perf_counter()
            try:
                proc = m.stein(repo, "run", "gmm2d")
            finally:
                conf.write_bytes(original)
            changed = sum(before.get(k) != v for k, v in m.snapshot(repo).items()) + len(set(before) - set(m.snapshot(repo)))
            rows.append(_row(f"config: {name}", "stein run gmm2d", proc, changed, time.perf_counter() - t0))
            print(rows[-1], flush=True)
        for env in ({"STEIN_NUM_WORKERS": "0"}, {"STEIN_NUM_WORKERS": "3"}):
            before = m.snapshot(repo)
            t0 = time.perf_counter()
            proc = m.stein(repo, "run", "gmm2d", **env)
            changed = sum(before.get(k) != v for k, v in m.snapshot(repo).items())
            rows.append(_row(f"environment: {' '.join(f'{k}={v}' for k, v in env.items())}", "stein run gmm2d", proc,
                             changed, time.perf_counter() - t0))
            print(rows[-1], flush=True)
        for cli_args, _fragment in m.CLI_CASES:
            before = m.snapshot(repo)
            t0 = time.perf_counter()
            proc = m.stein(repo, *cli_args)
            changed = sum(before.get(k) != v for k, v in m.snapshot(repo).items())
            rows.append(_row(f"option: {' '.join(cli_args[:2])}", f"stein {' '.join(cli_args)}", proc, changed,
                             time.perf_counter() - t0))
            print(rows[-1], flush=True)
        os.environ["PREFECT_HOME"] = str(repo / ".stein" / "prefect")
        with prefect_server() as url:
            for name, stage, rel, spoil, _fragment in (getattr(c, "values", c) for c in m.DATA_CASES):
                path = repo / rel
                saved = path.read_bytes()
                try:
                    spoil(path)
                    before = m.snapshot(repo)
                    t0 = time.perf_counter()
                    proc = m.stein(repo, "stage", stage, PREFECT_API_URL=url)
                    seconds = time.perf_counter() - t0
                    after = m.snapshot(repo)
                finally:
                    path.write_bytes(saved)
                changed = sum(before.get(k) != v for k, v in after.items()) + len(set(before) - set(after))
                rows.append(_row(f"data: {name}", f"stein stage {stage}", proc, changed, seconds))
                print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    print("\n" + table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
