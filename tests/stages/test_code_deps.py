"""Each DVC stage's code deps are what it really imports (``flows.code_deps``): a stage whose imports are missing
from its deps would not rerun when that code changes, and a stage that lists code it never imports reruns for
nothing (a new family or stein_core module would make every pipeline stale)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.code_deps import WIRING, import_closure, is_wiring
from flows.registry import PIPELINES

REPO = Path(__file__).resolve().parents[2]
STAGES = [(p, st.name) for p, spec in PIPELINES.items() for st in spec.stages]

# Each stage's entry point, imported the way `stein stage` imports it (its config validated, its flow loaded, its
# family looked up), in a child forked from one interpreter that has only the third-party packages loaded: each
# child starts with no project module, as a fresh `python -m flows.cli stage` does.
_PROBE = r"""
import json, os, sys
import click, numpy, pyarrow, pydantic, torch, yaml, prefect  # third-party only: no project module yet
from pathlib import Path
root = Path.cwd()
assert not [m for m in sys.modules if m.split(".")[0] in ("stein_core", "tasks", "flows")]
for pipeline, stage in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        from flows.code_deps import loaded_project_files
        from flows.registry import get_pipeline
        spec = get_pipeline(pipeline)
        spec.load_config(root)
        spec.stage(stage).load_flow()
        from tasks.families import FAMILIES
        if (family := spec.family(root, stage)) is not None:  # a sweep's prepare and evaluate train no family
            FAMILIES[family]
        os.write(w, json.dumps(loaded_project_files(root)).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    print(json.dumps({"stage": f"{pipeline}-{stage}", "files": json.loads(b"".join(chunks))}))
"""


def _dvc_stages(root: Path = REPO) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(STAGES)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PREFECT_HOME": "/nonexistent-not-used"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {d["stage"]: d["files"] for d in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("pipeline,stage", STAGES)
def test_every_project_file_a_stage_loads_is_a_dep(loaded, pipeline, stage):
    """The check the issue asks for: the entry point in a fresh interpreter, every project file it loaded a dep
    (or wiring, which is deliberately not one)."""
    name = f"{pipeline}-{stage}"
    deps = set(_dvc_stages()[name]["deps"])
    files = loaded[name]
    assert files, "the probe loaded nothing"
    missing = [f for f in files if f not in deps and not is_wiring(f)]
    assert missing == [], f"{name} imports {missing}, which are not in its dvc.yaml deps"
    flow = PIPELINES[pipeline].stage(stage).flow.partition(":")[0]
    assert f"{flow.replace('.', '/')}.py" in deps


def test_the_probe_catches_a_missing_dep(loaded):
    """What the check above would say of a stage whose deps lack a file it imports (here: the sample stage's task
    dropped from gmm2d's sample stage)."""
    deps = set(_dvc_stages()["gmm2d-sample"]["deps"]) - {"tasks/stages/sample.py"}
    assert "tasks/stages/sample.py" in loaded["gmm2d-sample"]
    assert [f for f in loaded["gmm2d-sample"] if f not in deps and not is_wiring(f)] == ["tasks/stages/sample.py"]


def test_a_stage_depends_on_its_own_family_only():
    stages = _dvc_stages()
    families = {"gmm2d": "ncsn", "digits": "ncsn", "ring8-agd": "agd", "digits-agd": "agd", "ring8-mmd": "mmd",
                "digits-mmd": "mmd", "gmm2d-blindness": "ncsn", "ring8-gebm": "gebm", "digits-gebm": "gebm",
                "ring8-mmdgan": "mmdgan", "digits-mmdgan": "mmdgan", "ring8-ebm": "ebm", "digits-ebm": "ebm",
                "ring8-nce": "nce", "ring8-fce": "fce", "digits-latent-ebm": "latent_ebm",
                # a sweep's stages validate every method's section: every method's family
                "ica-small": {"ksd", "maxsksd", "lsd"}, "ica": {"ksd", "maxsksd", "lsd"}}
    known = {f for v in families.values() for f in ({v} if isinstance(v, str) else v)}
    assert set(families) == set(PIPELINES)
    for name, spec in PIPELINES.items():
        for st in spec.stages:
            deps = stages[spec.dvc_stage(st.name)]["deps"]
            used = {d.removeprefix("tasks/families/").removesuffix(".py") for d in deps
                    if d.startswith("tasks/families/") and d.removesuffix(".py").split("/")[-1] in known}
            want = {families[name]} if isinstance(families[name], str) else families[name]
            assert used == want, (name, st.name, used)  # every stage validates the train section
            assert not any(is_wiring(d) for d in deps), (name, st.name)
            assert not any(d in ("stein_core", "tasks/families") for d in deps), "code deps are files, not folders"


def test_the_critics_module_reruns_the_critic_and_energy_pipelines_only():
    stages = _dvc_stages()  # (every evaluate stage imports it: the kale metric)
    for name, spec in PIPELINES.items():
        if spec.upstream or spec.is_sweep:  # a sweep: its lsd method has a critic (checked below)
            continue
        critic = name.endswith(("-gebm", "-mmdgan", "-ebm", "-nce", "-fce"))  # the energy nets are critics' nets
        assert ("stein_core/critics.py" in stages[f"{name}-train"]["deps"]) == critic, name
        assert ("tasks/families/_critic.py" in stages[f"{name}-train"]["deps"]) == critic, name
    assert "stein_core/critics.py" in stages["ica-small-train-lsd"]["deps"]


def test_generators_module_reruns_the_generator_pipelines_only():
    stages = _dvc_stages()
    for pipeline in ("ring8-agd", "ring8-mmd", "digits-agd", "digits-mmd"):
        assert "stein_core/generators.py" in stages[f"{pipeline}-train"]["deps"], pipeline
    for pipeline in ("gmm2d", "digits"):
        for st in PIPELINES[pipeline].stages:
            assert "stein_core/generators.py" not in stages[f"{pipeline}-{st.name}"]["deps"], (pipeline, st.name)
    assert "stein_core/score_matching.py" in stages["gmm2d-train"]["deps"]
    assert "stein_core/score_matching.py" not in stages["ring8-agd-train"]["deps"]


def test_lazy_stein_core_import_is_followed(tmp_path):
    """``from stein_core import ksd`` loads stein_core.discrepancies on first use: the graph follows the name."""
    pkg = tmp_path / "tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "user.py").write_text("def f():\n    from stein_core import ksd\n    return ksd\n")
    shutil.copytree(REPO / "stein_core", tmp_path / "stein_core")
    files = import_closure(tmp_path, ["tasks.user"])
    assert "stein_core/discrepancies.py" in files and "stein_core/kernels.py" in files
    assert "stein_core/generators.py" not in files


def test_wiring_is_not_followed():
    assert all(is_wiring(w) or w.endswith("/") for w in WIRING)
    files = import_closure(REPO, ["flows.train"])
    assert "tasks/infra/ray_client.py" not in files and "tasks/tracking/log.py" not in files
    assert "tasks/stages/train/loop.py" in files


def _copy_project(dst: Path) -> None:
    for name in ("stein_core", "tasks", "flows", "conf"):
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", dst / "dvc.yaml")


def _render(root: Path) -> str:
    code = "from pathlib import Path; from flows.dvcgen import render; import sys; sys.stdout.write(render(Path.cwd()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_new_module_and_new_family_change_no_existing_stage(tmp_path):
    """A researcher adds ``stein_core/newmath.py`` and a family ``tasks/families/newfam.py`` (with its own
    pipeline config): dvc.yaml's stages of every existing pipeline are unchanged, so ``stein status`` of each stays
    clean; and the new family is found by its module alone (no registry file edited)."""
    _copy_project(tmp_path)
    (tmp_path / "stein_core" / "newmath.py").write_text("import torch\n\n\ndef double(x):\n    return 2 * x\n")
    mmd = (tmp_path / "tasks" / "families" / "mmd.py").read_text()
    new = (mmd.replace('Literal["mmd"]', 'Literal["newfam"]').replace('name = "mmd"', 'name = "newfam"')
           .replace("from tasks.families._generator import", "from stein_core.newmath import double\nfrom tasks.families._generator import"))
    assert new != mmd
    (tmp_path / "tasks" / "families" / "newfam.py").write_text(new)
    assert _render(tmp_path) == (REPO / "dvc.yaml").read_text()
    probe = ("from tasks.families import FAMILIES; from pathlib import Path; from flows.code_deps import import_closure; "
             "print(FAMILIES['newfam'].name, 'stein_core/newmath.py' in import_closure(Path.cwd(), ['tasks.families.newfam']))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.stdout.split() == ["newfam", "True"], out.stderr[-2000:]


def test_an_edit_to_a_family_changes_its_pipelines_only(tmp_path):
    """The dep lists stay as they are after an edit; which stages an edit reruns is which list holds the file."""
    stages = _dvc_stages()
    holders = sorted(n for n, s in stages.items() if "tasks/families/agd.py" in s["deps"])
    assert holders == sorted(f"{spec.name}-{st.name}" for spec in (PIPELINES["ring8-agd"], PIPELINES["digits-agd"])
                             for st in spec.stages)
