"""Bad input through the real command line, in a copy of the project whose outputs exist: every case exits 2 with
one line naming the file and the key (or column), and no output changes (MD5 of every file under data/, models/,
samples/, metrics/, plots/ and dvc.lock, before and after).

Config cases go through ``stein run`` (validation of every config the pipeline reproduces happens before DVC
removes any output); data cases through ``stein stage`` (the stage reads the file; for train, inside a Ray Train
worker). The table of these cases is in bench/RESULTS.md §7.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

OUTPUTS = ("data", "models", "samples", "metrics", "plots", "dvc.lock")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | {"STEIN_THREADS": "1"} | extra


def stein(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def snapshot(repo: Path) -> dict[str, str]:
    files = {}
    for top in OUTPUTS:
        p = repo / top
        for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []):
            if f.is_file():
                files[str(f.relative_to(repo))] = hashlib.md5(f.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    return build_repo(tmp_path_factory.mktemp("bad-inputs") / "repo", project_copier)


def build_repo(dst: Path, copy_project) -> Path:
    """A copy of the project in ``dst`` (``copy_project``: tests/conftest.py), and small but real gmm2d outputs: data from the
    prepare task, a seeded untrained score network as the model, samples, a metrics file."""
    import torch

    from flows.registry import PIPELINES
    from stein_core import NoiseConditionalMLP
    from tasks.families import module_checkpoint
    from tasks.stages.prepare import prepare_mixture
    from tasks.data.io import save_torch, write_dataset, write_json

    def small(dst: Path) -> None:
        conf = dst / "conf" / "gmm2d.yaml"
        raw = yaml.safe_load(conf.read_text())
        raw["prepare"].update(n_train=400, n_test=200)
        raw["evaluate"].update(n_eval=100, n_bootstrap=20, checkpoints=None, plots=["samples"])
        conf.write_text(yaml.safe_dump(raw, sort_keys=False))

    copy_project(dst, set_params=small)
    cfg = PIPELINES["gmm2d"].load_config(dst)
    prepare_mixture.fn(cfg.prepare, dst / "data/gmm2d/train.parquet", dst / "data/gmm2d/test.parquet")
    torch.manual_seed(0)
    net = NoiseConditionalMLP(dim=2, hidden=16, n_layers=2, embed_dim=8)
    save_torch(dst / "models/gmm2d/model.pt", module_checkpoint("ncsn", {"score": net}, shape=[2], sigmas=[3.0, 1.0]))
    write_dataset(dst / "samples/gmm2d/samples.parquet", np.random.default_rng(0).normal(size=(300, 2)) * 5)
    write_json(dst / "metrics/gmm2d.json", {"mmd": 0.1})
    (dst / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    return dst


def _dump(raw) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def _edit(section: str, **values):
    def apply(raw):
        raw[section].update(values)
        return _dump(raw)
    return apply


def _drop(section: str):
    def apply(raw):
        del raw[section]
        return _dump(raw)
    return apply


def _literal(section: str, key: str, text: str):
    """Set ``section.key`` to the YAML text ``text`` as written (``.inf``, ``1e3``)."""
    def apply(raw):
        raw[section][key] = "@@"
        return _dump(raw).replace("'@@'", text)
    return apply


def _text(fn):
    """A case given as a function of the file's text."""
    fn.text = True
    return fn


#: (case id, change of conf/gmm2d.yaml (a function of the parsed file returning the new text, or of the text),
#:  what stderr must contain besides the file name)
CONFIG_CASES = [
    ("empty file", _text(lambda t: ""), "empty"),
    ("comments only", _text(lambda t: "# nothing here\n\n# at all\n"), "empty"),
    ("a list at the top", _text(lambda t: "- prepare\n- train\n"), "expected a mapping"),
    ("not YAML", _text(lambda t: t + "\ntrain: [unclosed\n"), "not valid YAML"),
    ("not UTF-8", _text(lambda t: t.encode("latin-1", "replace") + b"\n# caf\xe9\n"), "not UTF-8"),
    ("duplicate key", _text(lambda t: t.replace("\ntrain:\n", "\ntrain:\n  lr: 0.5\n", 1)), "'lr' given twice"),
    ("duplicate section", _text(lambda t: t + "\nsample:\n  sampler: annealed_langevin\n"), "'sample' given twice"),
    ("missing section", _drop("evaluate"), "key 'evaluate'"),
    ("unknown key", _edit("train", lrr=0.1), "key 'train.lrr': unknown key"),
    ("true for an integer", _edit("train", n_steps=True), "key 'train.n_steps'"),
    ("float for an integer", _edit("train", batch_size=128.0), "key 'train.batch_size'"),
    ("1e3 for an integer", _literal("sample", "n_samples", "1e3"), "key 'sample.n_samples'"),
    ("quoted number", _edit("train", lr="1.0e-3"), "key 'train.lr'"),
    ("string for a float", _edit("sample", eps="small"), "key 'sample.eps'"),
    ("inf", _literal("prepare", "std", ".inf"), "key 'prepare.std'"),
    ("subnormal", _literal("prepare", "std", "1e-320"), "key 'prepare.std': 1e-320 is a subnormal float"),
    ("a subnormal coordinate", _edit("prepare", means=[[5e-324, 0.0], [5.0, 5.0]]), "key 'prepare.means': 5e-324 is a subnormal"),
    ("nan", _literal("sample", "eps", ".nan"), "key 'sample.eps'"),
    ("negative step size", _edit("sample", eps=-1.0), "key 'sample.eps'"),
    ("huge sample count", _edit("sample", n_samples=10**11), "key 'sample.n_samples'"),
    ("huge mean", _edit("prepare", means=[[1e300, 0.0], [5.0, 5.0]]), "key 'prepare.means.0.0'"),
    ("negative seed", _edit("prepare", seed=-1), "key 'prepare.seed'"),
    ("weights not summing to 1", _edit("prepare", weights=[0.5, 0.2]), "sum to 1"),
    ("unknown family", _edit("train", family="gan"), "key 'train.family'"),
    ("unknown sampler", _edit("sample", sampler="hmc"), "key 'sample.sampler'"),
    ("unknown metric", _edit("evaluate", metrics=["mmd", "fidd"]), "key 'evaluate.metrics.1'"),
    ("sigma_min above sigma_max", _edit("train", sigma_min=30.0), "sigma"),
    ("null section", lambda raw: _dump({**raw, "train": None}), "key 'train'"),
    # hostile files: refused while parsing, before anything is expanded (a 2.5 KB alias bomb expands to 10^9 items)
    ("alias bomb", _text(lambda t: t + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(9))), "an anchor (&b0)"),
    ("over 256 KiB", _text(lambda t: t + ("# " + "x" * 98 + "\n") * 3000), "bytes: a config file is at most 256 KiB"),
    ("25,000 values", _text(lambda t: t + "big: [" + ", ".join(["0"] * 25_000) + "]\n"), "more than 10000 values"),
    ("nested 100 deep", _text(lambda t: t + "deep: " + "[" * 100 + "]" * 100 + "\n"), "nested deeper than 32"),
    ("a list as a key", _text(lambda t: t + "? [a, b]\n: 1\n"), "a list as a key"),
    ("a mapping as a key", _text(lambda t: t + "{a: 1}: 1\n"), "a mapping as a key"),
    ("a 100 KB value", _edit("train", family="x" * 100_000), "got 'xxxxxxxx"),
]


def _apply(case, text: str):
    return case(text) if getattr(case, "text", False) else case(yaml.safe_load(text))


@pytest.mark.parametrize("name,change,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_exits_2_naming_file_and_key_and_touches_nothing(repo, name, change, fragment):
    conf = repo / "conf" / "gmm2d.yaml"
    original = conf.read_bytes()
    before = snapshot(repo)
    new = _apply(change, original.decode())
    assert (new if isinstance(new, bytes) else new.encode()) != original
    try:
        conf.write_bytes(new if isinstance(new, bytes) else new.encode())
        proc = stein(repo, "run", "gmm2d")
    finally:
        conf.write_bytes(original)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last.startswith("error: conf/gmm2d.yaml") or last.startswith(f"error: {conf}"), last
    assert fragment in last, last
    assert len(last) < 400, f"{len(last)} characters: a message quotes a short prefix of a value"
    assert "Traceback" not in proc.stderr
    assert snapshot(repo) == before


def test_a_bad_upstream_config_fails_the_downstream_run_before_dvc(repo):
    """gmm2d-blindness reproduces gmm2d's stages: a broken conf/gmm2d.yaml stops it before DVC runs."""
    conf = repo / "conf" / "gmm2d.yaml"
    original = conf.read_text()
    before = snapshot(repo)
    try:
        conf.write_text(original.replace("  lr: ", "  lr: -", 1))
        proc = stein(repo, "run", "gmm2d-blindness")
    finally:
        conf.write_text(original)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "conf/gmm2d.yaml: key 'train.lr'" in proc.stderr.splitlines()[-1]
    assert snapshot(repo) == before


@pytest.mark.parametrize("env,fragment", [
    ({"STEIN_NUM_WORKERS": "0"}, "key 'STEIN_NUM_WORKERS'"),
    ({"STEIN_NUM_WORKERS": "two"}, "key 'STEIN_NUM_WORKERS'"),
    ({"STEIN_NUM_WORKERS": "3"}, "conf/gmm2d.yaml: key 'train.batch_size': 256 is not a multiple of STEIN_NUM_WORKERS=3"),
    ({"STEIN_NUM_WORKERS": "2-1"}, "key 'STEIN_NUM_WORKERS': MIN-MAX needs 1 <= MIN <= MAX (got '2-1')"),
    ({"STEIN_NUM_WORKERS": "1-3"},  # elastic: every size in the range must split the batch
     "key 'train.batch_size': 256 is not a multiple of 3 (STEIN_NUM_WORKERS=1-3 may train on 3)"),
])
def test_bad_runtime_settings_exit_2_before_dvc(repo, env, fragment):
    before = snapshot(repo)
    proc = stein(repo, "run", "gmm2d", **env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert fragment in proc.stderr.splitlines()[-1]
    assert snapshot(repo) == before


def _parquet(path: Path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


def _points(x: np.ndarray):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _nan_rows(path: Path) -> None:
    from tasks.data.io import read_dataset

    x = read_dataset(path).x
    x[[5, 9, 12]] = np.nan
    _parquet(path, {"x": _points(x)})


def _inf_row(path: Path) -> None:
    from tasks.data.io import read_dataset

    x = read_dataset(path).x
    x[2, 1] = np.inf
    _parquet(path, {"x": _points(x)})


def _no_mixture(path: Path) -> None:
    """The same points, without the mixture the prepare stage records in the metadata."""
    from tasks.data.io import read_dataset, write_dataset

    write_dataset(path, read_dataset(path).x)


def _strings(path: Path) -> None:
    _parquet(path, {"x": pa.FixedSizeListArray.from_arrays(pa.array(["a", "b"] * 4), 2)})


def _checkpoint_edit(edit):
    """A spoiler of a model checkpoint: ``edit(ckpt)`` changes the loaded dict, which is saved back."""
    def spoil(path: Path) -> None:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    return spoil


def _huge_hidden(ckpt) -> None:  # a 400 KB file that asks for terabytes
    ckpt["model_args"]["score"]["hidden"] = 10**6


#: The checkpoint's constructor arguments, read by ``load_model`` as every stage reads a model.
CHECKPOINT_CASES = [
    ("hidden=10**6", _huge_hidden, "key 'model_args.score': module 'score' would hold"),
    ("an extra argument", lambda c: c["model_args"]["score"].update(colour="red"),
     "key 'model_args.score': not arguments of NoiseConditionalMLP: got an unexpected keyword argument 'colour'"),
    ("a string for an integer", lambda c: c["model_args"]["score"].update(hidden="many"),
     "key 'model_args.score': NoiseConditionalMLP({"),
    ("a negative size", lambda c: c["model_args"]["score"].update(n_layers=-3), "key 'model_args.score'"),
    ("weights of another size", lambda c: c["model_args"]["score"].update(hidden=17),
     "key 'modules.score': the weights do not fit NoiseConditionalMLP("),
    ("no arguments", lambda c: c["model_args"].pop("score"), "key 'model_args.score': expected the constructor arguments"),
]


@pytest.mark.parametrize("name,edit,fragment", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_checkpoint_is_checked_before_any_module_is_built(repo, tmp_path, name, edit, fragment):
    import shutil

    from tasks.config.sections import ConfigError
    from tasks.families.loading import load_model

    path = tmp_path / "model.pt"
    shutil.copy(repo / "models/gmm2d/model.pt", path)
    load_model(path)  # the untouched copy loads
    _checkpoint_edit(edit)(path)
    with pytest.raises(ConfigError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value), info.value
    assert len(str(info.value)) < 400, str(info.value)


#: (case id, stage, file (relative), how it is spoiled, what stderr's last line must contain besides the file).
#: Each goes through a stage command (~10-20 s each here): one per way of reading (Parquet in the stage process,
#: Parquet inside a Ray Train worker, a checkpoint); the other spoilt files are read in-process below.
DATA_CASES = [
    ("test split: NaN rows", "evaluate", "data/gmm2d/test.parquet", _nan_rows,
     "key 'x': 3 of 200 rows hold non-finite values (NaN or inf), the first at row 5"),
    ("test split: no true distribution for ksd_target", "evaluate", "data/gmm2d/test.parquet", _no_mixture,
     "key 'evaluate.metrics': ksd_target needs the true distribution"),
    ("samples: not Parquet", "evaluate", "samples/gmm2d/samples.parquet", lambda p: p.write_bytes(b"PAR1 garbage"),
     "not a readable Parquet file"),
    ("model: not a checkpoint", "sample", "models/gmm2d/model.pt", lambda p: p.write_bytes(b"not a zip"),
     "not a PyTorch checkpoint"),
    ("model: hidden=10**6", "sample", "models/gmm2d/model.pt", _checkpoint_edit(_huge_hidden),
     "key 'model_args.score': module 'score' would hold"),
    # heavy (36 s, make test-all): tests/stages/test_training.py checks the same error from inside a Ray Train worker
    pytest.param("train split: NaN rows (inside the Ray Train worker)", "train", "data/gmm2d/train.parquet", _nan_rows,
                 "key 'x': 3 of 400 rows hold non-finite values (NaN or inf), the first at row 5",
                 marks=pytest.mark.heavy),
]

#: The same, read by the function every stage reads Parquet with.
READ_CASES = [
    ("an inf value", _inf_row, "key 'x': 1 of 300 rows hold non-finite values"),
    ("no column x", lambda p: _parquet(p, {"y": np.zeros(4)}), "key 'x': missing column 'x'"),
    ("strings", _strings, "key 'x': expected a fixed-size list of floats"),
    ("zero rows", lambda p: _parquet(p, {"x": _points(np.zeros((0, 2), np.float32))}), "key 'x': no data"),
    ("a null row", lambda p: _parquet(p, {"x": pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2))}), "not a readable Parquet file"),
    ("a list of variable length", lambda p: _parquet(p, {"x": [[1.0, 2.0], [3.0]]}),
     "key 'x': expected a fixed-size list of floats"),
    ("float labels", lambda p: _parquet(p, {"x": _points(np.zeros((2, 2), np.float32)), "label": [0.5, 1.0]}),
     "key 'label': expected integer class labels"),
    ("a shape that does not fit", lambda p: pq.write_table(
        pa.table({"x": _points(np.zeros((2, 2), np.float32))}).replace_schema_metadata(
            {"shape": "[3]"}), p), "key 'shape': schema metadata shape [3] does not describe rows of 2 values"),
]


@pytest.mark.parametrize("name,spoil,fragment", READ_CASES, ids=[c[0] for c in READ_CASES])
def test_read_dataset_names_file_and_column(tmp_path, name, spoil, fragment):
    from tasks.config.sections import ConfigError
    from tasks.data.io import read_dataset, write_dataset

    path = tmp_path / "samples.parquet"
    write_dataset(path, np.random.default_rng(0).normal(size=(300, 2)))
    spoil(path)
    with pytest.raises(ConfigError) as info:
        read_dataset(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value), info.value


@pytest.fixture(scope="module")
def prefect_api(prefect_api, repo):
    """The session's Prefect server, named in this process's environment for the module's stage commands (each
    would otherwise start its own server)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", prefect_api)
        mp.setenv("PREFECT_HOME", str(repo / ".stein" / "prefect"))
        yield prefect_api


@pytest.mark.slow
@pytest.mark.parametrize("name,stage,rel,spoil,fragment", DATA_CASES, ids=[getattr(c, "values", c)[0] for c in DATA_CASES])
def test_bad_data_exits_2_naming_file_and_column_and_touches_nothing_else(repo, prefect_api, name, stage, rel, spoil,
                                                                         fragment):
    path = repo / rel
    original = path.read_bytes()
    try:
        spoil(path)
        before = snapshot(repo)
        proc = stein(repo, "stage", stage, PREFECT_API_URL=prefect_api)
        after = snapshot(repo)
    finally:
        path.write_bytes(original)
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert fragment in last and (last.startswith(f"error: {rel}: ") or rel in last), last
    assert after == before


# ------------------------------------------------------------------------------------------ CLI options


def _numeric_params():
    """Every numeric option of every `stein` command: (command path, option)."""
    import click

    from flows.cli.main import main

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        for p in cmd.params:
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)):
                yield " ".join(path), p

    return list(walk(main, ()))


def test_every_numeric_cli_option_is_bounded_on_both_sides():
    """`stein gof --n-bootstrap 10**12` and `stein bench ksd --n 10**7` met no bound and died allocating: every
    int or float option now has a range, as its config key does."""
    params = _numeric_params()
    assert len(params) >= 15, [(c, p.name) for c, p in params]  # the walk does reach the commands
    import click

    unbounded = [f"{c} --{p.name}" for c, p in params
                 if not isinstance(p.type, (click.IntRange, click.FloatRange)) or p.type.min is None or p.type.max is None]
    assert not unbounded, unbounded


CLI_CASES = [
    (["gof", "--data", "samples.parquet", "--n-bootstrap", str(10**12)], "'--n-bootstrap': 1000000000000 is not in the range"),
    (["gof", "--data", "samples.parquet", "--seed", "-1"], "'--seed': -1 is not in the range"),
    (["bench", "ksd", "--n", str(10**7)], "'--n': 10000000 is not in the range"),
    (["bench", "ksd", "--n", "30000", "--d", "60000"], "the data alone would be 6.7 GiB"),
    (["bench", "ksd", "--n", "8192", "--d", "512", "--naive"], "the naive reference materialises [n, n, d]"),
    (["eval", "kid", "--real", "a.parquet", "--fake", "b.parquet", "--subsets", str(10**9)], "'--subsets': 1000000000 is not in the range"),
    (["runs", "--last", str(10**9)], "'--last'"),
]


@pytest.mark.parametrize("args,fragment", CLI_CASES, ids=[" ".join(a[:2]) + " " + a[-2] for a, _ in CLI_CASES])
def test_an_out_of_range_option_exits_2_before_any_work(repo, args, fragment):
    before = snapshot(repo)
    proc = stein(repo, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(repo) == before


def test_gof_on_more_rows_than_its_matrices_allow_exits_2_pointing_at_max_samples(repo, tmp_path):
    from tasks.data.io import write_dataset

    data = tmp_path / "big.parquet"
    write_dataset(data, np.random.default_rng(0).normal(size=(20_001, 2)))
    proc = stein(repo, "gof", "--data", str(data))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {data}: key 'x': 20,001 rows: the test holds [n, n] float64 matrices (3 GiB each); "
        "test at most 20,000 (--max-samples draws a random subset)")


def test_a_network_larger_than_memory_is_refused_before_ray_starts(tmp_path):
    """`hidden: 65536` passed every bound of its key and asked for 64 GiB of weights: the train stage counts the
    network on the meta device (no storage) and refuses it naming the key, before Ray or any allocation."""
    import time

    from tasks.config.sections import ConfigError
    from tasks.data.io import write_dataset
    from tasks.families import FAMILIES
    from tasks.stages.train.task import train_model

    write_dataset(tmp_path / "train.parquet", np.random.default_rng(0).normal(size=(64, 2)))
    cfg = FAMILIES["ncsn"].config.model_validate({"family": "ncsn", "n_steps": 10, "batch_size": 16,
                                                  "net": {"kind": "mlp", "hidden": 65536, "n_layers": 2}})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        train_model.fn(cfg, data_path=tmp_path / "train.parquet", heldout_path=None, model_path=tmp_path / "m.pt",
                       curves_dir=tmp_path, pipeline="test", mlflow_run_id=None, mlflow_tracking_uri=None,
                       config_file="conf/test.yaml")
    assert str(info.value).startswith("conf/test.yaml: key 'train.net': module 'score' would hold 17,182,621,714 numbers (64 GiB"), info.value
    assert "GiB of float32" in str(info.value)
    import ray

    assert not ray.is_initialized() and time.perf_counter() - t0 < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]


def test_stein_run_beside_a_bare_dvc_repro_exits_at_once_naming_it(repo):
    """A `dvc repro` of the same project holds DVC's lock: `stein run` started its servers and failed 22 s later
    with the holder's name cut off. Now it names the process (as DVC's lock file records it) before it starts
    anything."""
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, zc.lockfile\n"
        "lock = zc.lockfile.LockFile('.dvc/tmp/lock')\n"  # as dvc.lock.Lock takes it
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"), "dvc-repro-stand-in"], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        (repo / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(repo)
        t0 = time.perf_counter()
        proc = stein(repo, "run", "gmm2d")
        seconds = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: process {holder.pid} (`{sys.executable} -c import sys"), last
    assert "dvc-repro-stand-in`) holds DVC's lock of" in last and last.endswith("wait for it to finish, or stop it"), last
    assert not (repo / ".stein" / "prefect" / "server.log").exists() or "Uvicorn" not in (repo / ".stein" / "prefect" / "server.log").read_text()
    assert snapshot(repo) == before
    print(f"refused in {seconds:.1f} s")
    # the lock is free again: the probe gave back what it took
    from flows.local import dvc_lock_holder

    assert dvc_lock_holder(repo) is None
