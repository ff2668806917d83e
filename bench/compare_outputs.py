"""Do two commits compute the same bytes? Each commit's tree is cloned into its own folder, every pipeline's config
is made tiny (``tests/conftest.py``'s ``tiny``, the same for both), ``stein run`` reproduces each pipeline, and the
MD5 of every output DVC records (``dvc.lock``'s outs) is compared. A refactoring that changes no computation shows
no difference; run both sides on the same machine (float results depend on the CPU's vector units).

    .venv/bin/python bench/compare_outputs.py 66297d3 HEAD            # every pipeline, tiny
    .venv/bin/python bench/compare_outputs.py 66297d3 HEAD --pipelines gmm2d ring8-agd --full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import tiny  # noqa: E402 - the tests' shrinker, so both sides get the same configs


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def prepare(rev: str, dst: Path, full: bool) -> Path:
    _run(["git", "clone", "-q", str(REPO), str(dst)], REPO).check_returncode()
    _run(["git", "checkout", "-q", rev], dst).check_returncode()
    (dst / "dvc.lock").unlink(missing_ok=True)
    if not full:
        for conf in (dst / "conf").glob("*.yaml"):
            conf.write_text(yaml.safe_dump(tiny(yaml.safe_load(conf.read_text())), sort_keys=False))
    return dst


def outputs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])}


def reproduce(root: Path, pipelines: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    seconds = {}
    for p in pipelines:
        t0 = time.perf_counter()
        proc = _run([sys.executable, "-m", "flows.cli", "run", p], root, env)
        seconds[p] = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{root.name}: stein run {p} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        print(f"  {root.name}: {p} in {seconds[p]:.0f} s", flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--pipelines", nargs="+", help="default: every pipeline of commit b's conf/")
    ap.add_argument("--full", action="store_true", help="the shipped configs, not tiny ones")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/compare_outputs"))
    ap.add_argument("--json", type=Path, help="also write the comparison here")
    args = ap.parse_args()
    if args.workdir.exists():
        subprocess.run(["rm", "-rf", str(args.workdir)], check=True)
    args.workdir.mkdir(parents=True)
    roots = [prepare(rev, args.workdir / name, args.full) for rev, name in ((args.a, "a"), (args.b, "b"))]
    pipelines = args.pipelines or sorted(p.stem for p in (roots[1] / "conf").glob("*.yaml"))
    for root in roots:
        reproduce(root, pipelines)
    a, b = outputs(roots[0]), outputs(roots[1])
    same = sorted(p for p in a.keys() & b.keys() if a[p] == b[p])
    differ = sorted(p for p in a.keys() & b.keys() if a[p] != b[p])
    only = sorted(a.keys() ^ b.keys())
    print(f"{len(same)} outputs identical, {len(differ)} differ, {len(only)} only on one side")
    for p in differ:
        print(f"  differs: {p}")
    for p in only:
        print(f"  one side only: {p}")
    if args.json:
        args.json.write_text(json.dumps({"same": same, "differ": differ, "only": only}, indent=1))
    sys.exit(1 if differ or only else 0)


if __name__ == "__main__":
    main()
