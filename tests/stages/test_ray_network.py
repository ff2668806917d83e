"""A local Ray is reachable from this machine only, and only with a token: while the train stage runs on a Ray
Train worker, every socket that a process of the run listens on is bound to a loopback address, Ray's servers
refuse a request without the session's token, and when the stage returns no process of the run is left."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import urllib.error
import urllib.request

import psutil
import pytest
import torch


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    # gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1 when asked for 127.0.0.1
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _listeners(procs: list[psutil.Process]) -> dict[tuple, str]:
    """``{(pid, proto, ip, port): process name}`` for every TCP socket in LISTEN and every unconnected UDP socket."""
    found = {}
    for p in procs:
        try:
            name = " ".join(p.cmdline()[:1])[-60:] or p.name()
            for c in p.net_connections(kind="inet"):
                tcp = c.type == socket.SOCK_STREAM
                if (tcp and c.status == psutil.CONN_LISTEN) or (not tcp and not c.raddr):
                    found[(p.pid, "tcp" if tcp else "udp", c.laddr.ip, c.laddr.port)] = name
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def _http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


class _Watcher(threading.Thread):
    """Polls, every 0.5 s, the listening sockets of this process and its descendants (a local Ray's GCS, raylet
    and agents are children of the driver, its workers children of the raylet), and once Ray is up asks its
    runtime-env agent (an HTTP server) for a listing without, with a wrong and with the session's token."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.sockets: dict[tuple, str] = {}
        self.procs: dict[int, psutil.Process] = {}
        self.session_dir: str | None = None
        self.auth: dict[str, int] = {}
        self.error: Exception | None = None

    def run(self):
        import ray

        me = psutil.Process()
        while not self.stop.is_set():
            procs = [me, *me.children(recursive=True)]
            self.procs.update((p.pid, p) for p in procs[1:])
            self.sockets.update(_listeners(procs))
            node = ray._private.worker._global_node
            if node is not None and not self.auth:
                try:
                    self.session_dir = node.get_session_dir_path()
                    url = f"{node.runtime_env_agent_address}/get_runtime_envs_info"
                    self.auth = {"none": _http_status(url, None), "wrong": _http_status(url, "0" * 64),
                                 "session": _http_status(url, os.environ["RAY_AUTH_TOKEN"])}
                except Exception as e:  # Ray still starting: try again at the next poll
                    self.auth = {}
                    self.error = e
            self.stop.wait(0.5)


@pytest.mark.slow
@pytest.mark.heavy  # make test stays under 10 minutes; make test-all (CI) runs it (23 s)
def test_a_local_ray_listens_on_loopback_only_and_requires_its_token(project):
    from tasks.families import FAMILIES
    from tasks.data.io import write_dataset
    from tasks.infra.runtime import RuntimeSettings
    from tasks.stages.train.task import train_model

    g = torch.Generator().manual_seed(0)
    write_dataset(project / "train.parquet", torch.randn(256, 2, generator=g).numpy())
    cfg = FAMILIES["ncsn"].config.model_validate({
        "family": "ncsn", "n_steps": 20, "batch_size": 32, "log_every": 10, "checkpoint_every": 20,
        "net": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "n_sigmas": 4,
    })
    # servers other tests of the session started (the S3 server) are not the run's
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    watcher = _Watcher()
    watcher.start()
    try:
        info = train_model.fn(
            cfg, data_path=project / "train.parquet", heldout_path=None, model_path=project / "model.pt",
            curves_dir=project / "plots", pipeline="test", checkpoints_dir=None, mlflow_run_id=None,
            mlflow_tracking_uri=None, settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1),
        )
    finally:
        watcher.stop.set()
        watcher.join()
    assert info["steps"] == 20

    # The watch covered the run: the GCS, the raylet and the training worker (its process group's rendezvous
    # store and gloo included) were seen listening. A process's name is cut to 15 characters when its
    # command line cannot be read.
    names = " ".join(watcher.sockets.values())
    assert "gcs_server" in names and "raylet" in names, names
    assert sum("RayTrainWo" in name for name in watcher.sockets.values()) >= 3, names
    off = {f"{proto} {ip}:{port}": name for (_, proto, ip, port), name in watcher.sockets.items()
           if not _is_loopback(ip)}
    assert not off, f"listening off loopback: {off}"

    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert watcher.auth == {"none": 401, "wrong": 403, "session": 200}, watcher.error

    # Every server and worker of the run stops with it.
    _, alive = psutil.wait_procs([p for pid, p in watcher.procs.items() if pid not in before], timeout=30)
    assert not alive, [p.pid for p in alive]
    assert watcher.session_dir
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(watcher.session_dir in a for a in p.info["cmdline"] or [])]
    assert not left, left
