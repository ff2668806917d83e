"""A real two-node Ray cluster on this machine (`stein cluster up --nodes 2 --cpus-per-node 1`) and the train stage
on it through RAY_ADDRESS, as on a remote cluster: the two DDP workers run on different nodes and train what one
worker trains with the same global batch; a worker node killed mid-training (its raylet) comes back with
`stein cluster up`, Ray Train restarts the worker group from the last checkpoint, and the run ends with exactly the
weights of the uninterrupted one; an elastic training (`STEIN_NUM_WORKERS=1-2`) shrinks to one worker when the node
dies and grows back to two when it returns, with a 1-worker run's weights. `stein cluster down` then leaves no
process of the cluster.

The cluster is started once for the module. Everything runs through the real CLI in a copy of the repository with a
small training (300 steps, a checkpoint every 50); the stages talk to the session's Prefect server, as in
tests/e2e/test_pipeline_e2e.py. About 15-20 minutes on a busy 2-core machine (the elastic case alone 7.5): heavy."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

TRAIN = {"n_steps": 300, "batch_size": 128, "log_every": 10, "checkpoint_every": 50,
         "net": {"kind": "mlp", "hidden": 32, "n_layers": 2}, "n_sigmas": 5}
PREPARE = {"n_train": 2000, "n_test": 400}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    return project_copier(tmp_path_factory.mktemp("cluster") / "repo",
                          params={"gmm2d": {"prepare": PREPARE, "train": TRAIN}})


def _env(repo: Path, prefect_api: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["STEIN_THREADS"] = "1"
    env["PREFECT_HOME"] = str(repo / ".stein" / "prefect")
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env | extra


def stein(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, env=env or _env(repo),
                          capture_output=True, text=True, timeout=timeout)
    print(f"$ stein {' '.join(args)}  -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


class Cluster:
    """The module's cluster: its recorded state, and every process of it seen so far (launchers, Ray's servers,
    the workers they start), collected by walking the launchers' process trees whenever ``watch`` is called."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.procs: dict[int, psutil.Process] = {}
        self.state: dict = {}
        self.up_seconds = 0.0

    def status(self) -> tuple[int, dict | None]:
        out = stein(self.repo, "cluster", "status", "--json")
        return out.returncode, json.loads(out.stdout)

    def watch(self) -> None:
        state_file = self.repo / ".stein" / "cluster" / "state.json"
        if state_file.is_file():
            self.state = json.loads(state_file.read_text())
        for rec in self.state.get("nodes", []):
            try:
                launcher = psutil.Process(rec["pid"])
                for p in [launcher, *launcher.children(recursive=True)]:
                    self.procs.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def node(self, name: str) -> dict:
        return next(rec for rec in self.state["nodes"] if rec["name"] == name)


@pytest.fixture(scope="module")
def cluster(repo) -> Iterator[Cluster]:
    c = Cluster(repo)
    try:
        t0 = time.perf_counter()
        up = stein(repo, "cluster", "up", "--nodes", "2", "--cpus-per-node", "1")
        c.up_seconds = time.perf_counter() - t0
        assert up.returncode == 0
        c.watch()
        yield c
    finally:
        c.watch()
        t0 = time.perf_counter()
        down = stein(repo, "cluster", "down")
        print(f"stein cluster down: {time.perf_counter() - t0:.1f} s")
        # the fallback if `down` failed: every process seen, by its PID (psutil checks it is still the same one)
        _, alive = psutil.wait_procs(list(c.procs.values()), timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        assert down.returncode == 0 and "cluster stopped" in down.stdout
        assert not alive, f"left running after `stein cluster down`: {[(p.pid, p.name()) for p in alive]}"
        assert not (repo / ".stein" / "cluster" / "state.json").exists()
        assert not (repo / ".stein" / "cluster" / "token").exists()


@pytest.fixture(scope="module")
def prepared(repo, prefect_api) -> Path:
    assert stein(repo, "stage", "prepare", env=_env(repo, prefect_api)).returncode == 0
    return repo


def _train_run(repo: Path) -> tuple[dict, dict]:
    """The tags and the ``train/samples_per_s`` history of the newest train stage run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / '.stein' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gmm2d")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
            if r.data.tags.get("stein.family")]
    run = runs[0]
    rate = [m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s")]
    return run.data.tags, {"samples_per_s": rate, "run_id": run.info.run_id}


def _weights(path: Path, steps: int = TRAIN["n_steps"]) -> dict:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["step"] == steps
    return {f"{group}.{name}.{k}": v for group in ("modules", "raw_modules") for name, sd in ckpt.get(group, {}).items()
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def runs(prepared, cluster, prefect_api) -> dict:
    """The train stage with one worker on a local Ray (no RAY_ADDRESS, beside the running cluster) and with two
    workers on the cluster; each one's weights, tags and throughput."""
    repo = prepared
    out = {}
    for name, extra in (("local_1", {"STEIN_NUM_WORKERS": "1"}),
                        ("cluster_2", {"STEIN_NUM_WORKERS": "2", "RAY_ADDRESS": cluster.state["address"]})):
        t0 = time.perf_counter()
        proc = stein(repo, "stage", "train", env=_env(repo, prefect_api, **extra))
        seconds = time.perf_counter() - t0
        cluster.watch()
        assert proc.returncode == 0, name
        tags, metrics = _train_run(repo)
        out[name] = {"weights": _weights(repo / "models" / "gmm2d" / "model.pt"), "tags": tags, "output": proc.stdout + proc.stderr,
                     "stage_seconds": seconds, **metrics}
        rate = metrics["samples_per_s"]
        print(f"{name}: stage {seconds:.1f} s, samples/s median {sorted(rate)[len(rate) // 2]:,.0f} over {len(rate)} logs")
    return out


def test_the_cluster_is_two_loopback_nodes_with_a_private_token(cluster):
    code, state = cluster.status()
    assert code == 0
    assert [rec["name"] for rec in state["nodes"]] == ["stein-head", "stein-worker-1"]
    assert all(rec["alive"] for rec in state["nodes"])
    # the head's GCS knows both nodes, alive, on 127.0.0.1, one CPU each
    gcs = {v["name"]: v for v in state["gcs"].values() if v["alive"]}
    assert sorted(gcs) == ["stein-head", "stein-worker-1"]
    assert {v["address"] for v in gcs.values()} == {"127.0.0.1"} and {v["cpus"] for v in gcs.values()} == {1.0}
    assert state["address"] == f"127.0.0.1:{state['port']}"
    assert os.stat(state["token_path"]).st_mode & 0o777 == 0o600
    print(f"stein cluster up (2 nodes): {cluster.up_seconds:.1f} s; per node: "
          + ", ".join(f"{rec['name']} {rec['up_seconds']:.1f} s" for rec in state["nodes"]))


def test_two_workers_run_on_two_nodes_and_train_what_one_worker_trains(runs, cluster):
    import torch

    nodes = runs["cluster_2"]["tags"]["ray.worker_nodes"].split(",")
    cluster_nodes = {rec["node_id"] for rec in cluster.state["nodes"]}
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # rank 0 and rank 1 on different nodes
    assert set(nodes) == cluster_nodes
    assert "2 worker(s) on 2 Ray node(s)" in runs["cluster_2"]["output"]
    # the local run had its own one-node Ray, none of the cluster's nodes
    local_nodes = runs["local_1"]["tags"]["ray.worker_nodes"].split(",")
    assert len(local_nodes) == 1 and not set(local_nodes) & cluster_nodes
    # The same global batch of 128 in both: one worker takes it whole, two take 64 rows each and DDP averages their
    # gradients, which sums the same float32 numbers in another order. After 300 Adam steps the weights agree to
    # round-off: measured max |diff| 1.3e-7 (weights up to 16 in size); the bound below leaves ~8x room at O(1)
    # weights, while a wrong slice, a rank-dependent seed or un-averaged gradients change them in the first digit.
    one, two = runs["local_1"]["weights"], runs["cluster_2"]["weights"]
    assert one.keys() == two.keys() and len(one) > 4
    print("max |1 worker - 2 workers|:", max(float((two[k] - v).abs().max()) for k, v in one.items()),
          "max |weight|:", max(float(v.abs().max()) for v in one.values()))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_killed_worker_node_comes_back_and_training_ends_with_the_uninterrupted_weights(prepared, runs, cluster,
                                                                                            prefect_api,
                                                                                            assert_resumed_where_it_stopped):
    import torch

    repo = prepared
    worker = cluster.node("stein-worker-1")
    env = _env(repo, prefect_api, STEIN_NUM_WORKERS="2", RAY_ADDRESS=cluster.state["address"])
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "train"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # each line with the time it arrived, while the test below is busy restarting the node
        for line in proc.stdout:
            lines.put((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()
    seen: list[tuple[float, str]] = []
    try:
        t_kill = None
        deadline = time.monotonic() + 900
        while proc.poll() is None or not lines.empty():
            assert time.monotonic() < deadline, "training did not finish within 15 minutes"
            try:
                t, line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append((t, line))
            m = re.search(r"\[train\] step (\d+)/", line)
            if t_kill is None and m and int(m.group(1)) >= 100:
                cluster.watch()  # the training workers, for the leftover check
                os.kill(worker["raylet_pid"], signal.SIGKILL)
                t_kill = time.monotonic()
                # the node's launcher sees its raylet die and stops the node's other processes
                psutil.wait_procs([psutil.Process(worker["pid"])], timeout=30)
                code, state = cluster.status()
                assert code == 1 and [r["alive"] for r in state["nodes"]] == [True, False]
                t_repair = time.monotonic()
                assert stein(repo, "cluster", "up").returncode == 0  # starts the missing node only
                repair_seconds = time.monotonic() - t_repair
                cluster.watch()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        print("".join(line for _, line in seen)[-6000:])
    assert t_kill is not None, "training ended before step 100"
    assert proc.returncode == 0
    assert_resumed_where_it_stopped("".join(line for _, line in seen))
    after = [(t, line) for t, line in seen if t > t_kill]
    t_nodes = next(t for t, line in after if "2 worker(s) on 2 Ray node(s)" in line)
    t_step = next(t for t, line in after if re.search(r"\[train\] step \d+/", line))
    print(f"node killed -> worker group on 2 nodes again: {t_nodes - t_kill:.1f} s; -> first step: "
          f"{t_step - t_kill:.1f} s (of which `stein cluster up` restarting the node: {repair_seconds:.1f} s)")

    code, state = cluster.status()
    assert code == 0
    new_worker = next(r for r in state["nodes"] if r["name"] == "stein-worker-1")
    assert new_worker["node_id"] != worker["node_id"] and new_worker["pid"] != worker["pid"]
    tags, _ = _train_run(repo)
    # the restarted group's ranks on the head and on the new worker node (which rank lands where is Ray's choice)
    ranks = tags["ray.worker_nodes"].split(",")
    assert len(ranks) == 2 and set(ranks) == {state["nodes"][0]["node_id"], new_worker["node_id"]}, ranks
    # Resumed from the last registered checkpoint (step 50 or 100), the run recomputes the same steps with the same
    # two ranks: bit for bit the uninterrupted two-worker run's weights.
    resumed, uninterrupted = _weights(repo / "models" / "gmm2d" / "model.pt"), runs["cluster_2"]["weights"]
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


#: How long the elastic test keeps its single worker paused once the node is back: Train's resize monitor interval
#: there (5 s) and its autoscaling coordinator's refresh (20 s), plus a margin.
RESIZE_PAUSE_S = 35


def _train_workers(cluster: Cluster) -> list[psutil.Process]:
    """The live Ray Train worker processes among the cluster's (Ray titles them ``ray::RayTrainWorker...``)."""
    found = []
    for p in cluster.procs.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _registered_step(repo: Path, since: float) -> int:
    """The step of the newest checkpoint Ray Train has registered in a run written since ``since`` (its checkpoint
    manager writes a snapshot at each registration), -1 if none. A checkpoint the loop has reported but Train has
    not registered yet is not one a restart resumes from."""
    best = -1
    for snap in (repo / ".stein" / "ray_results").glob("*/checkpoint_manager_snapshot.json"):
        try:
            if snap.stat().st_mtime < since:
                continue
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being written: the next line looks again
            continue
        best = max(best, int(latest.get("metrics", {}).get("step", -1)))
    return best


def _resume(procs: list[psutil.Process]) -> None:
    """SIGCONT to each paused process still there (the resize may have ended it)."""
    for p in procs:
        try:
            p.resume()
        except psutil.Error:
            pass


def test_elastic_training_shrinks_when_a_node_dies_grows_back_when_it_returns_and_ends_with_the_same_weights(
        prepared, cluster, prefect_api, assert_resumed_where_it_stopped):
    """``STEIN_NUM_WORKERS=1-2``: two workers while both nodes are up; the worker node killed, Ray Train goes on
    with the one worker that fits on the head (from the last checkpoint), and when `stein cluster up` brings the
    node back it grows to two again. Every rank takes its slice of the one global batch of step t, so the weights
    equal a 1-worker run's up to the float32 reordering of the gradient sums (the bound of the 2-vs-1 test above).
    Its own config file (8000 steps), its own uninterrupted run.

    Growing back takes Train up to about half a minute after the node is up (its resize monitor looks every
    ``STEIN_ELASTIC_RESIZE_S`` seconds, at resources its autoscaling coordinator refreshes every 20 s), and on a
    quiet machine the single worker can finish first (it did once: the test then saw no growth). The node is killed
    once Train has registered a checkpoint (else the shrunk group starts over instead of resuming). The single
    worker is paused (SIGSTOP) from its first step until ``RESIZE_PAUSE_S`` seconds after the node is back: Train
    decides to resize meanwhile (the paused worker only misses health checks, which Train tolerates for minutes),
    and ends the worker once it runs again. (Kept paused, its shutdown would wait for it: measured, Train then
    stays in the resize until the worker continues.) On a slower machine both the decision and the worker are
    slower, so the pause still comes first."""
    import torch

    repo = prepared
    raw = yaml.safe_load((repo / "conf" / "gmm2d.yaml").read_text())
    raw["train"].update(n_steps=8000, checkpoint_every=200, log_every=100)
    conf = repo / "elastic.yaml"
    conf.write_text(yaml.safe_dump(raw, sort_keys=False))

    local = stein(repo, "stage", "train", "-c", str(conf), env=_env(repo, prefect_api, STEIN_NUM_WORKERS="1"))
    assert local.returncode == 0
    reference = _weights(repo / "models" / "gmm2d" / "model.pt", steps=8000)

    worker = cluster.node("stein-worker-1")
    env = _env(repo, prefect_api, STEIN_NUM_WORKERS="1-2", STEIN_ELASTIC_RESIZE_S="5",
               RAY_ADDRESS=cluster.state["address"])
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "train", "-c", str(conf)], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    paused: list[psutil.Process] = []
    phase = "two"  # two workers -> (kill) -> one worker -> (it paused, the node back) -> two workers again
    try:
        deadline = time.monotonic() + 1200
        while proc.poll() is None or not lines.empty():
            assert time.monotonic() < deadline, "training did not finish within 20 minutes"
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            step = re.search(r"\[train\] step (\d+)/", line)
            if (phase == "two" and step and int(step.group(1)) >= 200 and any("2 worker(s) on 2 Ray node(s)" in s for s in seen)
                    and _registered_step(repo, started) >= 200):  # killed before Train has a checkpoint, it starts over
                cluster.watch()
                os.kill(cluster.node("stein-worker-1")["raylet_pid"], signal.SIGKILL)
                psutil.wait_procs([psutil.Process(worker["pid"])], timeout=30)
                phase = "killed"
            elif phase == "killed" and "1 worker(s) on 1 Ray node(s)" in line:
                phase = "one"
            elif phase == "one" and step:  # the single worker trains: pause it, bring the node back
                cluster.watch()
                paused = _train_workers(cluster)
                assert len(paused) == 1, f"expected the one Ray Train worker, on the head; found {paused}"
                paused[0].suspend()
                assert stein(repo, "cluster", "up").returncode == 0
                cluster.watch()
                time.sleep(RESIZE_PAUSE_S)  # the resize decision comes meanwhile (see above); the output is queued
                _resume(paused)
                phase = "back"
            elif phase == "back" and "2 worker(s) on 2 Ray node(s)" in line:
                phase = "grown"
        proc.wait(timeout=60)
    finally:
        _resume(paused)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        print("".join(s for s in seen if "worker(s) on" in s or "resuming" in s or "Reporting" not in s)[-6000:])
    assert proc.returncode == 0
    assert phase == "grown", f"the worker group did not shrink and grow back (last phase: {phase})"
    assert len(assert_resumed_where_it_stopped("".join(seen))) >= 2  # shrunk, then grown: each from its checkpoint
    elastic = _weights(repo / "models" / "gmm2d" / "model.pt", steps=8000)
    print("max |1 worker - elastic 2/1/2 workers|:", max(float((elastic[k] - v).abs().max()) for k, v in reference.items()))
    for key, value in reference.items():
        torch.testing.assert_close(elastic[key], value, rtol=1e-5, atol=1e-6, msg=key)
