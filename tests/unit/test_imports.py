"""stein_core stays free of orchestration and I/O dependencies, and importing it loads no submodule."""

import ast
import importlib
import pathlib
import subprocess
import sys

import stein_core

FORBIDDEN = {"prefect", "ray", "mlflow", "dvc", "pyarrow", "pydantic", "hydra", "omegaconf"}
ROOT = pathlib.Path(stein_core.__file__).resolve().parent
SUBMODULES = sorted(p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("_"))


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_no_forbidden_imports():
    imports = ", ".join(f"stein_core.{m}" for m in SUBMODULES)
    code = f"import {imports}, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    assert _run(code) == "[]"


def test_no_file_io():
    """The mathematics reads and writes no file: no open(), torch.load/save, Path.read_*/write_*, or os.environ
    (the pipeline resolves paths and settings and passes tensors and modules in)."""
    banned_calls = {"open", "load", "save", "read_text", "read_bytes", "write_text", "write_bytes", "getenv"}
    found = []
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in banned_calls:
                    found.append(f"{path.name}:{node.lineno} {name}()")
            if isinstance(node, ast.Attribute) and node.attr == "environ":
                found.append(f"{path.name}:{node.lineno} environ")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.name}:{node.lineno} import {m}" for m in mods
                          if m.split(".")[0] in {"pathlib", "shutil", "tempfile", "glob", "urllib", "requests"}]
    assert found == []


def test_importing_the_package_loads_no_submodule():
    code = "import stein_core, sys; print(sorted(m for m in sys.modules if m.startswith('stein_core.')))"
    assert _run(code) == "[]"
    code = ("import sys; from stein_core import ksd; "
            "print(sorted(m for m in sys.modules if m.startswith('stein_core.') and m != 'stein_core._random'))")
    assert _run(code) == "['stein_core.discrepancies', 'stein_core.kernels']"


def test_export_table_is_every_modules_all():
    """The lazy table equals the union of the submodules' ``__all__``: a new public name is reachable as
    ``stein_core.<name>``, and every submodule is listed."""
    assert sorted(stein_core.MODULES) == SUBMODULES
    for module in SUBMODULES:
        mod = importlib.import_module(f"stein_core.{module}")
        assert sorted(stein_core._EXPORTS[module]) == sorted(mod.__all__), module
        for name in mod.__all__:
            assert getattr(stein_core, name) is getattr(mod, name)


def test_public_api():
    for name in [
        "RadialKernel", "RBF", "IMQ", "median_heuristic", "sq_dists",
        "GaussianMixture", "score_from_log_prob",
        "stein_kernel_matrix", "ksd", "get_ksd_fn", "mmd",
        "geometric_sigmas", "get_dsm_loss_fn",
        "langevin_step", "annealed_langevin", "NoiseConditionalMLP",
    ]:
        assert hasattr(stein_core, name), name
        assert name in stein_core.__all__
    assert "kernels" in dir(stein_core) and stein_core.kernels.IMQ is stein_core.IMQ
