"""A local multi-node Ray cluster on this machine (``stein cluster up|status|down``): its nodes, their launcher,
their state file and token. The stages join it through :mod:`tasks.infra.ray_client`.

`stein cluster up` starts a head and N-1 worker nodes on this machine, each its own process tree (a launcher,
``python -m tasks.infra.cluster``, and the Ray processes it starts), so that training sees the cluster path: DDP
workers on different Ray nodes, a node that can die on its own, a driver that joins through RAY_ADDRESS.

Why a launcher and not ``ray start``: a node of a loopback-only cluster needs Ray's local-IP switch off
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, else Ray turns 127.0.0.1 into the machine's outward address and every
server listens on all interfaces), and ``ray start --address`` refuses to start a worker node with that switch
off. ``ray start --head`` also writes the cluster's address into /tmp/ray/ray_current_cluster, where every plain
``ray.init()`` on the machine (any user's, and a stale file after the cluster stopped) would then connect. The
launcher starts the node the way ``ray start --block`` does (``ray._private.node.Node``, the process Ray's own
``cluster_utils.Cluster`` uses) and, like it, stops the node's processes when one of them dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.infra.runtime import OFFLINE_ENV, free_port

log = logging.getLogger("stein")


#: Ray's switch, read once when ``ray`` is imported, that makes a node's IP the loopback address (on by default on
#: macOS and Windows only): ``ray._private.services.get_node_ip_address`` then returns 127.0.0.1 instead of the
#: address the machine routes out of.
_RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_interface() -> str | None:
    """The name of the network interface that carries 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.address == "127.0.0.1" for a in addrs)), None)


#: Where a local cluster keeps its state: ``state.json`` (address, nodes, PIDs), the token, one log per node.
CLUSTER_SUBDIR = "cluster"
NODE_NAME_PREFIX = "stein-"


class ClusterError(RuntimeError):
    """A cluster command could not do its work (a node failed to start or to stop); exit code 1."""


def cluster_dir(root: Path) -> Path:
    from tasks.infra.runtime import state_dir

    return state_dir(root) / CLUSTER_SUBDIR


def read_cluster_state(root: Path) -> dict[str, Any] | None:
    """The recorded local cluster of the project at ``root`` (what ``stein cluster up`` wrote), or None."""
    import json

    path = cluster_dir(root) / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{path} is unreadable ({exc}): remove it after stopping the nodes it names") from None


def _write_cluster_state(root: Path, state: dict[str, Any]) -> None:
    import json

    path = cluster_dir(root) / "state.json"
    tmp = path.with_name(f".state.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def _normalise_address(address: str) -> str:
    host, _, port = address.strip().rpartition(":")
    return f"{'127.0.0.1' if host in ('localhost', '127.0.0.1') else host}:{port}"


def recorded_cluster_for(address: str, root: Path) -> dict[str, Any] | None:
    """The project's local cluster if ``address`` (a RAY_ADDRESS) is its head, else None."""
    try:
        state = read_cluster_state(root)
    except ClusterError:
        return None
    if state is None or "://" in address:
        return None
    return state if _normalise_address(address) == state["address"] else None


def _use_cluster_auth(token_path: str) -> None:
    """Make this process a client of the local cluster: its loopback address and its token (from the file, the
    same one its nodes read). A token of a local Ray started earlier in this process is dropped, and Ray's cached
    settings are refreshed, as ``init_ray`` does for a local Ray."""
    os.environ[_RAY_LOCAL_ONLY_ENV] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token_path
    os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray reads RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment a program needs to use the local cluster as a Ray client (what ``stein cluster up``
    prints as ``export`` lines; ``stein`` itself finds it from RAY_ADDRESS alone)."""
    return {"RAY_ADDRESS": state["address"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"],
            _RAY_LOCAL_ONLY_ENV: "0"}


def _node_env(token_path: Path, port: int) -> dict[str, str]:
    """The environment of a node's processes (and so of every Ray worker on it)."""
    env = dict(OFFLINE_ENV) | dict(os.environ) | {
        _RAY_LOCAL_ONLY_ENV: "0",  # 127.0.0.1 stays 127.0.0.1: every server listens on loopback
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        # Ray's own processes that look the cluster up (Train's placement-group cleaner) find this one, not another
        # Ray of the machine ("Found multiple active Ray instances").
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        # A node drains for up to 30 s on SIGTERM (for Serve replicas): nothing here needs it.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_AUTH_TOKEN", None)
    if lo := _loopback_interface():  # torch's gloo/NCCL sockets of the training workers on loopback too
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = lo
    return env


def _process(rec: dict[str, Any], exact: bool = True):
    """The live process of a node record, or None (gone, or its PID now belongs to another process; ``exact=False``:
    a record without a start time, taken by its PID alone)."""
    import psutil

    if not rec.get("pid"):
        return None
    try:
        p = psutil.Process(rec["pid"])
        if (exact and abs(p.create_time() - rec["create_time"]) > 0.5) or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.NoSuchProcess:
        return None


def node_alive(rec: dict[str, Any]) -> bool:
    return _process(rec) is not None


def _spawn_node(root: Path, *, name: str, head: bool, port: int, num_cpus: int, object_store_bytes: int,
                token_path: Path, where: Path | None = None, with_parent: bool = False):
    """Start one node's launcher in its own session (its own process group); return (Popen, ready file). Its ready
    file and log go under ``where`` (default: the project's cluster folder); ``with_parent``: the node stops when
    this process is gone, however it ended."""
    import subprocess
    import sys

    d = where or cluster_dir(root)
    (d / "logs").mkdir(parents=True, exist_ok=True)
    (d / "nodes").mkdir(exist_ok=True)
    ready = d / "nodes" / f"{name}.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tasks.infra.cluster", "--name", name, "--num-cpus", str(num_cpus),
           "--object-store-bytes", str(object_store_bytes), "--ready-file", str(ready)]
    cmd += ["--head", "--port", str(port)] if head else ["--address", f"127.0.0.1:{port}"]
    cmd += ["--parent-pid", str(os.getpid())] if with_parent else []
    env = _node_env(token_path, port)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")) if p)
    with open(d / "logs" / f"{name}.log", "ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, ready


def _wait_ready(proc, ready: Path, name: str, root: Path, deadline: float) -> dict[str, Any]:
    """Wait for a launcher's ready file: its node is registered with the head. A launcher that exits or a deadline
    that passes is a ClusterError quoting the end of the node's log."""
    import json

    import psutil

    while True:
        if ready.is_file():
            info = json.loads(ready.read_text())
            info["create_time"] = psutil.Process(proc.pid).create_time()
            return info
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            log_path = cluster_dir(root) / "logs" / f"{name}.log"
            tail = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.is_file() else []
            what = f"exited with code {code}" if code is not None else "did not come up in time"
            raise ClusterError(f"node {name} {what}; the end of {log_path}:\n" + "\n".join(tail))
        time.sleep(0.2)


def stop_node(rec: dict[str, Any], timeout_s: float = 20.0) -> float:
    """Stop one node: SIGTERM to its launcher's process group (the launcher stops its Ray processes), then, after
    ``timeout_s``, SIGKILL to the group and to any process of the node that left it. Returns the seconds taken.
    A record whose launcher is gone still has its remaining processes killed by PID."""
    import signal

    import psutil

    t0 = time.perf_counter()
    proc = _process(rec)
    if proc is None:
        procs = []
    else:
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = [proc]
        try:
            os.killpg(rec["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    # The node's Ray processes as recorded at start-up (PID and start time, so that a reused PID is never taken
    # for one of them): they may have outlived a launcher that someone else killed.
    for pid, created in rec.get("procs", []):
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) <= 0.5 and p not in procs:
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    if alive:
        log.warning("node %s: %d process(es) still running %.0f s after SIGTERM: killing them", rec["name"],
                    len(alive), timeout_s)
        try:
            os.killpg(rec["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        if alive:
            raise ClusterError(f"node {rec['name']}: processes {[p.pid for p in alive]} survived SIGKILL")
    return time.perf_counter() - t0


def _lock(root: Path):
    """An exclusive lock on the cluster state (one `stein cluster up/down` at a time), held until closed."""
    import fcntl

    d = cluster_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / "lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _object_store_bytes(nodes: int) -> int:
    """Each node's object store: together the share one Ray node would take (30% of memory), at least 100 MiB.
    Ray's default would give each node 30%, so that N nodes on one machine would claim N x 30%."""
    import psutil

    return max(100 * 2**20, int(psutil.virtual_memory().total * 0.3 / nodes))


def _node_names(nodes: int) -> list[str]:
    return [f"{NODE_NAME_PREFIX}head", *(f"{NODE_NAME_PREFIX}worker-{i}" for i in range(1, nodes))]


def cluster_up(root: Path, nodes: int | None, cpus_per_node: int | None, *, timeout_s: float = 180.0,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the project's local cluster: a head and ``nodes - 1`` worker nodes, ``cpus_per_node`` CPUs each, on
    127.0.0.1 with token auth. With a cluster already recorded, start only its nodes that are down (a crashed
    worker node comes back under its name); a different size is a ConfigError (stop it first). Returns the state.
    Whatever this call started is stopped again if it fails."""
    import secrets

    from tasks.config.sections import ConfigError

    with _lock(root):
        state = read_cluster_state(root)
        if state is not None and not node_alive(state["nodes"][0]):
            echo("the recorded cluster's head is down: stopping what is left of it and starting a new one")
            for rec in reversed(state["nodes"]):
                stop_node(rec)
            state = None
        if state is not None:
            for option, value, running in (("--nodes", nodes, state["num_nodes"]),
                                           ("--cpus-per-node", cpus_per_node, state["cpus_per_node"])):
                if value is not None and value != running:
                    raise ConfigError("stein cluster up", option, f"{value} differs from the running cluster's "
                                      f"{running} (at {state['address']}): `stein cluster down` first")
        started = []
        try:
            if state is None:
                nodes, cpus_per_node = nodes or 2, cpus_per_node or 1
                d = cluster_dir(root)
                token_path = d / "token"
                token_path.unlink(missing_ok=True)
                fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                port = free_port()
                state = {"address": f"127.0.0.1:{port}", "port": port, "token_path": str(token_path),
                         "num_nodes": nodes, "cpus_per_node": cpus_per_node,
                         "object_store_bytes": _object_store_bytes(nodes), "started": time.time()}
                state["nodes"] = [{"name": n, "role": "head" if i == 0 else "worker", "num_cpus": cpus_per_node,
                                   "pid": None, "create_time": 0.0} for i, n in enumerate(_node_names(nodes))]
            todo = [rec for rec in state["nodes"] if rec["pid"] is None or not node_alive(rec)]
            for rec in todo:  # what a crashed node left running (by the PIDs recorded for it), before it restarts
                if rec["pid"] is not None:
                    stop_node(rec, timeout_s=10)
            if not todo:
                echo(f"cluster at {state['address']} is up: all {len(state['nodes'])} nodes running")
                return state
            # the head first (the workers join it), then every missing worker at once
            waves = [[r for r in todo if r["role"] == "head"], [r for r in todo if r["role"] == "worker"]]
            for wave in waves:
                t0 = time.monotonic()
                spawned = []
                for rec in wave:
                    proc, ready = _spawn_node(root, name=rec["name"], head=rec["role"] == "head",
                                              port=state["port"], num_cpus=rec["num_cpus"],
                                              object_store_bytes=state["object_store_bytes"],
                                              token_path=Path(state["token_path"]))
                    rec.update(pid=proc.pid, create_time=0.0)
                    started.append(rec)
                    spawned.append((rec, proc, ready))
                for rec, proc, ready in spawned:
                    info = _wait_ready(proc, ready, rec["name"], root, t0 + timeout_s)
                    rec.update(info, up_seconds=round(time.monotonic() - t0, 2))
                    echo(f"{rec['name']} up in {rec['up_seconds']:.1f} s (pid {rec['pid']}, node {rec['node_id'][:12]})")
            _write_cluster_state(root, state)
            started = []
            return state
        finally:
            for rec in reversed(started):  # a failure or an interrupt: nothing this call started survives
                if rec.get("create_time"):
                    stop_node(rec)
                else:
                    _kill_unready(rec)


#: ``stein run``'s own Ray (:func:`pipeline_ray`): a folder per run under the state dir (token, ready file, log).
PIPELINE_RAY_SUBDIR = "pipeline-ray"
#: What the stages of a pipeline run are told about its Ray: the launcher's ready file and the launcher's PID.
PIPELINE_RAY_ENV = "STEIN_PIPELINE_RAY_READY"
PIPELINE_RAY_PID_ENV = "STEIN_PIPELINE_RAY_PID"
PIPELINE_RAY_NODE = "stein-pipeline"


@contextlib.contextmanager
def pipeline_ray(root: Path, num_cpus: int) -> Iterator[dict[str, str]]:
    """One local Ray for a whole pipeline run; yields the environment its stages need to join it.

    Without it every stage that uses Ray (train, evaluate's checkpoint tasks, a sweep's trainings) starts a Ray of
    its own and stops it again: a few seconds each, on the way to the stage's own work. Here one head node starts
    when the pipeline does, in the background (a launcher, as for :func:`cluster_up`: 127.0.0.1 only, token auth
    with a token file of this run only, no dashboard), while the first stages (prepare) run; a stage that needs
    Ray waits for it (:func:`pipeline_ray_ready`) and joins it through ``RAY_ADDRESS``, as it would join any
    cluster. The node stops when the block ends, and by itself when this process is gone, however it ended (its
    launcher watches its parent): a killed ``stein run`` leaves no Ray behind. The run's folder (token, ready
    file) goes with it; the node's log is kept as ``.stein/pipeline-ray/last-node.log``."""
    import json
    import secrets
    import shutil
    import tempfile

    import psutil

    from tasks.infra.runtime import state_dir

    base = state_dir(root) / PIPELINE_RAY_SUBDIR
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="run-", dir=base))  # owner-only (0700): the token lives here
    token_path = d / "token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    port = free_port()
    proc, ready = _spawn_node(root, name=PIPELINE_RAY_NODE, head=True, port=port, num_cpus=num_cpus,
                              object_store_bytes=_object_store_bytes(1), token_path=token_path, where=d,
                              with_parent=True)
    try:
        rec: dict[str, Any] = {"name": PIPELINE_RAY_NODE, "pid": proc.pid,
                               "create_time": psutil.Process(proc.pid).create_time()}
    except psutil.NoSuchProcess:  # the launcher already failed: the stages find it gone and start their own
        rec = {"name": PIPELINE_RAY_NODE, "pid": None, "create_time": 0.0}
    env = client_env({"address": f"127.0.0.1:{port}", "token_path": str(token_path)})
    env |= {PIPELINE_RAY_ENV: str(ready), PIPELINE_RAY_PID_ENV: str(proc.pid)}
    try:
        yield env
    finally:
        if ready.is_file():  # the node's processes as the launcher recorded them, killed by PID if need be
            rec["procs"] = json.loads(ready.read_text()).get("procs", [])
        stop_node(rec)
        proc.poll()
        with contextlib.suppress(OSError):
            os.replace(d / "logs" / f"{PIPELINE_RAY_NODE}.log", base / "last-node.log")
        shutil.rmtree(d, ignore_errors=True)


def pipeline_ray_ready(timeout_s: float = 180.0, poll_s: float = 0.1) -> bool:
    """In a stage of a pipeline run with its own Ray (``STEIN_PIPELINE_RAY_READY`` set): wait until that Ray is up.
    True when it is; False when its launcher is gone or it did not come up within ``timeout_s`` (the stage then
    starts a Ray of its own, as a stage run alone does)."""
    import psutil

    ready = Path(os.environ[PIPELINE_RAY_ENV])
    launcher = _process({"pid": int(os.environ.get(PIPELINE_RAY_PID_ENV, "0") or 0), "create_time": 0.0}, exact=False)
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if launcher is None or not _running(launcher) or time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _running(p) -> bool:
    """Whether a psutil process still runs (a dead child its parent has not reaped yet is a zombie)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_unready(rec: dict[str, Any]) -> None:
    """Stop a launcher that never reported ready (its create_time unknown): by its process group."""
    import signal

    import psutil

    try:
        p = psutil.Process(rec["pid"])
        procs = [p, *p.children(recursive=True)]
        os.killpg(rec["pid"], signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        if alive:
            os.killpg(rec["pid"], signal.SIGKILL)
            for q in alive:
                q.kill()
            psutil.wait_procs(alive, timeout=10)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


def cluster_down(root: Path, *, timeout_s: float = 20.0, echo: Callable[[str], None] = print) -> dict[str, float] | None:
    """Stop the project's local cluster, worker nodes first (one whose head is gone would hang), then the head;
    remove its state and token. Returns ``{node name: seconds to stop}``, or None when no cluster is recorded."""
    with _lock(root):
        state = read_cluster_state(root)
        if state is None:
            return None
        times = {}
        for rec in reversed(state["nodes"]):
            if rec.get("pid") is None:
                continue
            was = "running" if node_alive(rec) else "already down"
            times[rec["name"]] = stop_node(rec, timeout_s)
            echo(f"{rec['name']} ({was}) stopped in {times[rec['name']]:.1f} s")
        d = cluster_dir(root)
        (d / "state.json").unlink(missing_ok=True)
        Path(state["token_path"]).unlink(missing_ok=True)
        for ready in (d / "nodes").glob("*.json"):
            ready.unlink(missing_ok=True)
        return times


def cluster_status(root: Path) -> dict[str, Any] | None:
    """The recorded cluster with each node's liveness and, when the head answers, what its GCS reports per node
    (alive, CPUs, address). None when no cluster is recorded."""
    state = read_cluster_state(root)
    if state is None:
        return None
    for rec in state["nodes"]:
        rec["alive"] = rec.get("pid") is not None and node_alive(rec)
    state["gcs"] = None
    if state["nodes"][0]["alive"]:
        try:
            state["gcs"] = _gcs_nodes(state)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: status must work on a broken cluster
            state["gcs_error"] = f"{type(exc).__name__}: {exc}"
    return state


def _gcs_nodes(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{node id: {name, alive, address, cpus}}`` as the head's GCS reports them (with the cluster's token)."""
    _use_cluster_auth(state["token_path"])
    from ray._raylet import GcsClient

    client = GcsClient(address=state["address"])
    out = {}
    for node_id, info in client.get_all_node_info(timeout=10).items():
        out[node_id.hex()] = {"name": info.node_name, "alive": info.state == 0, "address": info.node_manager_address,
                              "cpus": info.resources_total.get("CPU", 0.0)}
    return out


def _node_main(argv: list[str] | None = None) -> int:
    """A node's launcher (``python -m tasks.infra.cluster``): start the node's Ray processes on 127.0.0.1, write the
    ready file, and stay until SIGTERM (Ray's handler stops the processes) or until one of them dies (then stop
    the others and exit 1, as ``ray start --block`` does). Its environment comes from ``_node_env``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m tasks.infra.cluster", description=_node_main.__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--head", action="store_true")
    parser.add_argument("--port", type=int, help="the head's GCS port")
    parser.add_argument("--address", help="a worker node: the head's GCS address")
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--object-store-bytes", type=int, required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--parent-pid", type=int,
                        help="stop the node once this process (the one that started the launcher) is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tasks.infra.runtime import apply_offline_env

    apply_offline_env()  # an entry point of its own: telemetry off before Ray is imported, however it is started

    from ray._private import ray_constants
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise SystemExit(f"{_RAY_LOCAL_ONLY_ENV}=0 must be set: the node would listen on every interface")
    params = RayParams(
        node_ip_address="127.0.0.1", node_name=args.name, num_cpus=args.num_cpus, num_gpus=0,
        object_store_memory=args.object_store_bytes, include_dashboard=False,
        dashboard_agent_listen_port=None,  # several nodes on one machine: no fixed agent port
        min_worker_port=0, max_worker_port=0,  # workers' ports picked by the OS, not from one shared range
        # No autoscaler monitor: the cluster's size is fixed, and the monitor's metrics port is one fixed number
        # (44217) that every Ray on the machine would contend for.
        no_monitor=True,
    )
    if args.head:
        params.gcs_server_port = args.port
        params.update_if_absent(num_redis_shards=None, redis_max_clients=None)
    else:
        params.gcs_address = args.address
        params.include_log_monitor = False  # one log monitor per machine: the head's reads every node's logs
    t0 = time.perf_counter()
    node = Node(params, head=args.head, shutdown_at_exit=True, spawn_reaper=True)
    import psutil

    pids = {kind: [p.process.pid for p in infos] for kind, infos in node.all_processes.items()}
    info = {"pid": os.getpid(), "node_id": node.node_id, "address": node.gcs_address,
            "session_dir": node.get_session_dir_path(), "raylet_pid": pids[ray_constants.PROCESS_TYPE_RAYLET][0],
            "procs": [[pid, psutil.Process(pid).create_time()] for kind in pids for pid in pids[kind]],
            "start_seconds": round(time.perf_counter() - t0, 2)}
    ready = Path(args.ready_file)
    tmp = ready.with_name(f".{ready.name}.tmp")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, ready)
    log.info("node %s (%s) up at %s in %.1f s", args.name, node.node_id, node.gcs_address, info["start_seconds"])
    while True:
        time.sleep(0.5)
        if args.parent_pid is not None and os.getppid() != args.parent_pid:  # re-parented: its starter died
            log.error("node %s: the process that started it (pid %d) is gone: stopping the node", args.name,
                      args.parent_pid)
            # Every descendant, listed before any is killed: the raylet's agents (runtime env, dashboard agent) and
            # workers are its children, and once the raylet is gone they would no longer be found under this one.
            procs = psutil.Process().children(recursive=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            for q in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    q.kill()
            os._exit(1)
        dead = node.dead_processes()
        if dead:
            log.error("node %s: %s exited (%s): stopping the node's other processes", args.name,
                      ", ".join(kind for kind, _ in dead), ", ".join(str(p.returncode) for _, p in dead))
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            os._exit(1)


if __name__ == "__main__":
    import sys

    sys.exit(_node_main())
