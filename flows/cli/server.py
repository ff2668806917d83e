"""``stein server``: the project's MLflow tracking server on 127.0.0.1, optionally behind basic auth.

:func:`tracking_server` is the server's whole life (start in its own process group, wait until it answers, check
the admin's credentials, stop the group), shared by the command and the tests. The server's command line,
environment and auth config are built by :class:`tasks.infra.server.TrackingServer`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import click

from tasks.infra.server import (  # stdlib-only module: `stein --help` stays fast
    ADMIN_PASSWORD_ENV, ADMIN_USERNAME, CLIENT_PASSWORD_ENV, CLIENT_USERNAME_ENV, PERMISSIONS, ServerSetupError,
    TrackingServer,
)


@dataclass(frozen=True)
class RunningServer:
    spec: TrackingServer
    process: subprocess.Popen
    startup_seconds: float

    @property
    def url(self) -> str:
        return self.spec.url


def check_port_free(port: int) -> None:
    """:class:`ServerSetupError` when something already listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ServerSetupError(f"port {port} on 127.0.0.1 is in use ({exc.strerror}): "
                                   "choose another with --port") from None


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def http_status(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> int:
    """The HTTP status of a GET of ``url`` (an error status too); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or {})), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _log_tail(path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@contextlib.contextmanager
def tracking_server(spec: TrackingServer, env: Mapping[str, str] | None = None,
                    timeout: float = 180.0) -> Iterator[RunningServer]:
    """Start ``spec``'s ``mlflow server`` and yield it once ``/health`` answers (and, with auth, the admin's
    password from the environment is accepted); stop its process group (SIGTERM, then SIGKILL) however the block
    ends. The server runs in a session of its own (a Ctrl-C in the terminal reaches only us; we stop it) and the
    kernel sends it SIGTERM when this process dies, which ``mlflow server`` forwards to its uvicorn.

    Raises :class:`ServerSetupError` for bad input (no usable admin password, a wrong one for an existing admin)
    and RuntimeError when the server exits or does not answer, with the end of its log."""
    from flows.local import open_private_log, private_child, stop_process_group, wait_until_healthy

    base = dict(os.environ if env is None else env)
    server_env = spec.environment(base)
    spec.prepare()
    t0 = time.perf_counter()
    with open_private_log(spec.log) as out:
        proc = subprocess.Popen(spec.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=server_env, cwd=spec.state, start_new_session=True, preexec_fn=private_child)
    try:
        try:
            wait_until_healthy(proc, f"{spec.url}/health", timeout, "mlflow server", spec.log)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its end:\n{_log_tail(spec.log)}") from None
        if spec.auth:
            # MLflow reads the admin password only when it creates the admin user; on a later start a different one
            # would be ignored in silence, and the credentials the user passes on to the pipeline would not work.
            status = http_status(f"{spec.url}/api/2.0/mlflow/users/get?username={ADMIN_USERNAME}",
                                 basic_auth_header(ADMIN_USERNAME, base[ADMIN_PASSWORD_ENV]))
            if status == 401:
                raise ServerSetupError(
                    f"${ADMIN_PASSWORD_ENV} is not the password of the admin user '{ADMIN_USERNAME}' in {spec.auth_db}: "
                    "MLflow uses the variable only on the first start, when it creates that user; give the "
                    "current password (change it with MLflow's update-password API or UI)")
            if status != 200:
                raise RuntimeError(f"mlflow server answered {status} to the admin's credentials; see {spec.log}")
        yield RunningServer(spec, proc, time.perf_counter() - t0)
    finally:
        stop_process_group(proc)


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port on 127.0.0.1.")
@click.option("--auth", is_flag=True,
              help=f"Require MLflow's basic auth: the admin user '{ADMIN_USERNAME}' gets the password in "
                   f"${ADMIN_PASSWORD_ENV} (required; no default) on the first start.")
@click.option("--default-permission", type=click.Choice(PERMISSIONS), default=None,
              help="With --auth: what a user may do on an experiment nobody gave them a permission on "
                   "[default: READ: every user compares every run, writers need EDIT].")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server worker processes.")
def server(port: int, auth: bool, default_permission: str | None, workers: int) -> None:
    """Run an MLflow tracking server on 127.0.0.1 for the project's runs, until Ctrl-C.

    \b
    It serves the project's store (.stein/mlflow.db) and proxies artifacts (kept in .stein/mlartifacts), so
    the pipeline logs over HTTP with only its URL:
      MLFLOW_TRACKING_URI=http://127.0.0.1:5000 stein run
    With --auth every request needs a user's credentials (401 without, 403 without a permission); clients pass
    them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD. The server's log is .stein/mlflow-server.log.
    """
    from flows.cli.common import _fail, _setup
    from flows.local import exit_on_termination
    from tasks.infra.runtime import state_dir

    if default_permission is not None and not auth:
        _fail(ValueError(f"--default-permission {default_permission} needs --auth (without it every client may do anything)"))
    root = _setup()
    state = state_dir(root)
    try:
        spec = TrackingServer(state, port, auth=auth, default_permission=default_permission or "READ", workers=workers)
        spec.environment(os.environ)  # a missing or unusable admin password fails here, before anything starts
        check_port_free(port)
    except ServerSetupError as exc:
        _fail(exc)
    exit_on_termination()
    rel = lambda p: p.relative_to(root) if p.is_relative_to(root) else p  # noqa: E731
    try:
        with tracking_server(spec) as running:
            click.echo(f"MLflow tracking server on {spec.url} (started in {running.startup_seconds:.1f} s; Ctrl-C to stop)")
            click.echo(f"  store {rel(state / 'mlflow.db')}, artifacts {rel(spec.artifacts)}, log {rel(spec.log)}")
            click.echo(f"  log to it:  export MLFLOW_TRACKING_URI={spec.url}")
            if auth:
                click.echo(f"  as a user:  export {CLIENT_USERNAME_ENV}=<user> {CLIENT_PASSWORD_ENV}=<password> "
                           f"(users and permissions: {rel(spec.auth_db)}, default permission "
                           f"{spec.default_permission}; the admin creates users at {spec.url}/signup)")
            code = running.process.wait()
            click.echo(f"error: mlflow server exited with code {code}; see {spec.log}", err=True)
            sys.exit(1)
    except ServerSetupError as exc:
        _fail(exc)
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("MLflow tracking server stopped")
