"""`stein cluster` through the real CLI: the cheap cases (no cluster, bad sizes), and a one-node cluster that
listens on loopback only, refuses a client without its token, refuses to change size while up, and leaves no
process after `stein cluster down`. The two-node cluster with training on it is tests/e2e/test_cluster.py."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest


def stein(root: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env |= extra
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "cluster", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    print(f"$ stein cluster {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def test_status_without_a_cluster_says_so_and_exits_1(project):
    out = stein(project, "status")
    assert out.returncode == 1
    assert "no cluster is up in this project" in out.stdout
    out = stein(project, "status", "--json")
    assert out.returncode == 1 and json.loads(out.stdout) is None


def test_down_without_a_cluster_is_a_no_op(project):
    out = stein(project, "down")
    assert out.returncode == 0 and "nothing to stop" in out.stdout
    assert not (project / ".stein" / "cluster" / "state.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "Invalid value for '--nodes': 0 is not in the range 1<=x<=64"),
    (["--nodes", "two"], "Invalid value for '--nodes': 'two' is not a valid integer"),
    (["--cpus-per-node", "0"], "Invalid value for '--cpus-per-node': 0 is not in the range"),
    (["--nodes", "2", "--timeout", "-1"], "Invalid value for '--timeout'"),
])
def test_a_bad_size_exits_2_naming_the_option_before_anything_starts(project, args, message):
    out = stein(project, "up", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert not (project / ".stein" / "cluster" / "state.json").exists()


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _gcs_call(address: str, **auth: str) -> subprocess.CompletedProcess:
    """A separate Ray client process asking the head's GCS for its nodes, with the given auth environment."""
    code = (f"from ray._raylet import GcsClient; "
            f"print(len(GcsClient(address={address!r}).get_all_node_info(timeout=10)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} | auth
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_one_node_cluster_is_loopback_only_token_protected_and_leaves_nothing_behind(project):
    procs: dict[int, psutil.Process] = {}
    try:
        up = stein(project, "up", "--nodes", "1", "--cpus-per-node", "1")
        assert up.returncode == 0 and "stein-head up in" in up.stdout
        state = json.loads((project / ".stein" / "cluster" / "state.json").read_text())
        head = state["nodes"][0]
        launcher = psutil.Process(head["pid"])
        procs = {p.pid: p for p in [launcher, *launcher.children(recursive=True)]}
        names = " ".join(p.name() for p in procs.values())
        assert "gcs_server" in names and "raylet" in names, names
        # every listening socket of the node's processes is on loopback
        listening = [(p.name(), c.laddr) for p in procs.values() for c in p.net_connections(kind="inet")
                     if (c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN)
                     or (c.type == socket.SOCK_DGRAM and not c.raddr)]
        assert listening and all(_is_loopback(addr.ip) for _, addr in listening), listening
        assert os.stat(state["token_path"]).st_mode & 0o777 == 0o600

        # the GCS answers a client holding the token, and refuses one without it or with another
        token_path = state["token_path"]
        ok = _gcs_call(state["address"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
        assert ok.returncode == 0 and ok.stdout.strip() == "1", ok.stderr[-2000:]
        wrong = _gcs_call(state["address"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
        assert wrong.returncode != 0 and "nauthenticated" in wrong.stderr, wrong.stderr[-2000:]
        none = _gcs_call(state["address"], RAY_AUTH_MODE="disabled")
        assert none.returncode != 0, none.stdout

        # up again: nothing to start; another size: exit 2, the running cluster untouched
        again = stein(project, "up")
        assert again.returncode == 0 and "all 1 nodes running" in again.stdout
        bigger = stein(project, "up", "--nodes", "3")
        assert bigger.returncode == 2 and "--nodes" in bigger.stderr and "stein cluster down" in bigger.stderr
        status = stein(project, "status")
        assert status.returncode == 0 and "stein-head" in status.stdout and "running" in status.stdout
        assert f"export RAY_ADDRESS={state['address']}" in status.stdout
        procs.update((p.pid, p) for p in launcher.children(recursive=True))

        down = stein(project, "down")
        assert down.returncode == 0 and "stein-head (running) stopped" in down.stdout
    finally:
        _, alive = psutil.wait_procs(list(procs.values()), timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert not (project / ".stein" / "cluster" / "state.json").exists()


def test_ray_address_of_the_projects_cluster_is_recognised_and_a_stopped_head_is_refused(project):
    """init_ray finds the project's cluster from RAY_ADDRESS alone (127.0.0.1 or localhost, the same port), and a
    cluster whose head is gone is a ConfigError naming RAY_ADDRESS (exit 2 in a stage) instead of a long connection
    timeout. The record's head is a process that has exited."""
    import time as _time

    from tasks.infra.cluster import recorded_cluster_for
    from tasks.infra.ray_client import init_ray
    from tasks.config.sections import ConfigError
    from tasks.infra.runtime import RuntimeSettings

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    d = project / ".stein" / "cluster"
    d.mkdir(parents=True)
    state = {"address": "127.0.0.1:43210", "port": 43210, "token_path": str(d / "token"), "num_nodes": 1,
             "cpus_per_node": 1, "nodes": [{"name": "stein-head", "role": "head", "pid": gone.pid,
                                            "create_time": _time.time() - 5}]}
    (d / "state.json").write_text(json.dumps(state))
    assert recorded_cluster_for("127.0.0.1:43210", project) == state
    assert recorded_cluster_for("localhost:43210", project) == state
    assert recorded_cluster_for("127.0.0.1:43211", project) is None
    assert recorded_cluster_for("ray://127.0.0.1:43210", project) is None
    with pytest.raises(ConfigError, match="RAY_ADDRESS.*its head is not running: `stein cluster up`"):
        init_ray(RuntimeSettings(ray_address="localhost:43210"), project, 1)
