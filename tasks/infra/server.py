"""The project's MLflow tracking server: what ``stein server`` runs, built here so tests start the same server.

``mlflow server`` on 127.0.0.1 with the project's SQLite store (``.stein/mlflow.db``, the store every local run
writes) and proxied artifacts: clients upload and download artifacts through the server (``mlflow-artifacts:/``
URIs), which keeps them under ``.stein/mlartifacts/<experiment id>/``. A client then needs nothing but the URL
(``MLFLOW_TRACKING_URI=http://127.0.0.1:PORT``), no path on the server's disk: every process that reaches the
port logs the same way (the stages, the local Ray's workers, another machine through an SSH tunnel).

With ``auth`` the server runs MLflow's basic-auth app: every request but ``/health`` needs a user's credentials
(an anonymous client gets 401), and a user may do on an experiment what their permission on it allows (the
default permission where nobody granted one; READ unless set): anything more gets 403.
Users and permissions live in ``.stein/mlflow-auth.db``; the server's auth settings in ``.stein/mlflow-auth.ini``,
which holds no secret. The admin user's password comes from the environment only (``MLFLOW_AUTH_ADMIN_PASSWORD``,
MLflow's own variable: there is no default), and so does the Flask secret key the auth app signs its CSRF
tokens with (``MLFLOW_FLASK_SERVER_SECRET_KEY``, or a random one for each start). Neither is written to disk.

Nothing here starts a process: :func:`flows.cli.server.tracking_server` does, in its own process group.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: MLflow's own variable for the password of the admin user it creates on the first start with auth.
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
#: MLflow's variable for the key the basic-auth app signs CSRF tokens with (a random one per start if unset).
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
#: The variables any MLflow client reads its basic-auth credentials from.
CLIENT_USERNAME_ENV, CLIENT_PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
ADMIN_USERNAME = "admin"
#: The permission a user has on an experiment nobody granted them one on (MLflow's ``default_permission``).
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
#: MLflow refuses shorter admin passwords (``mlflow.utils.validation._validate_password``) and the default that
#: older MLflow releases shipped; both are checked here too, so that ``stein server`` fails before starting anything.
MIN_PASSWORD_LENGTH = 12
_LEGACY_DEFAULT_PASSWORD = "password1234"
HOST = "127.0.0.1"
#: How long a server worker trusts a user's checked credentials. Without this cache every request pays MLflow's
#: password hash check (PBKDF2): measured here at ~1 s per request on a loaded 2-core machine, against ~0.1 s with
#: it. The worker that handles a password change or a deletion drops its entry at once; other workers (with
#: ``--workers`` > 1) may accept the old password until this many seconds have passed.
AUTH_CACHE_SECONDS = 60


class ServerSetupError(ValueError):
    """Bad input to ``stein server`` (a missing or unusable secret, a busy port): the CLI exits with code 2."""


@dataclass(frozen=True)
class TrackingServer:
    """One MLflow tracking server: its state folder, port and access control.

    ``state`` is the folder for the store, the artifacts, the auth database and the server log (the project's
    ``.stein/``). ``default_permission`` (with ``auth``) is what a user may do on an experiment without a
    permission of their own: READ lets every user compare every run and only the users granted EDIT (and an
    experiment's creator, who gets MANAGE) log into it; NO_PERMISSIONS hides the experiments too.
    """

    state: Path
    port: int
    auth: bool = False
    default_permission: str = "READ"
    workers: int = 1

    def __post_init__(self):
        if self.default_permission not in PERMISSIONS:
            raise ServerSetupError(f"default permission {self.default_permission!r} is not one of {', '.join(PERMISSIONS)}")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.state / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.state / "mlartifacts"

    @property
    def auth_db(self) -> Path:
        return self.state / "mlflow-auth.db"

    @property
    def auth_config(self) -> Path:
        return self.state / "mlflow-auth.ini"

    @property
    def log(self) -> Path:
        return self.state / "mlflow-server.log"

    def command(self) -> list[str]:
        """The ``mlflow server`` command line (this interpreter's ``mlflow``)."""
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--host", HOST, "--port", str(self.port), "--workers", str(self.workers),
            "--backend-store-uri", self.store_uri,
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
        ]
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
        return cmd

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The server's environment: ``base`` with telemetry off, no job execution (its worker processes cost
        memory and CPU a small machine lacks; set ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` to have them) and,
        with ``auth``, the auth config's path and the secret key. The admin password stays where it is: in
        ``base``, checked here. Raises :class:`ServerSetupError` when ``auth`` lacks a usable password."""
        from tasks.infra.runtime import OFFLINE_ENV

        env = dict(base)
        for key, value in OFFLINE_ENV.items():
            env.setdefault(key, value)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        # a client's settings must not steer the server (the job runner would log back into it with them)
        for key in ("MLFLOW_TRACKING_URI", CLIENT_USERNAME_ENV, CLIENT_PASSWORD_ENV):
            env.pop(key, None)
        if self.auth:
            check_admin_password(base.get(ADMIN_PASSWORD_ENV))
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config)
            env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)  # the admin's name is the config's
            if not base.get(SECRET_KEY_ENV):
                env[SECRET_KEY_ENV] = secrets.token_hex(32)
        return env

    def auth_config_text(self) -> str:
        """The basic-auth app's settings (no secret: the admin password comes from the environment)."""
        return (
            "# Written by `stein server --auth` at each start; no secrets here. The admin password comes from\n"
            f"# ${ADMIN_PASSWORD_ENV} and is used only to create the admin user on the first start.\n"
            "[mlflow]\n"
            f"default_permission = {self.default_permission}\n"
            f"database_uri = sqlite:///{self.auth_db}\n"
            f"admin_username = {ADMIN_USERNAME}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
        )

    def prepare(self) -> None:
        """Create the state folder and, with ``auth``, write the auth config (atomically)."""
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)  # the stores and password hashes in it are the owner's alone
        if self.auth:
            tmp = self.auth_config.with_name(f".{self.auth_config.name}.{os.getpid()}.tmp")
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
            tmp.write_text(self.auth_config_text())
            os.replace(tmp, self.auth_config)


def check_admin_password(password: str | None) -> str:
    """The admin password from the environment, or :class:`ServerSetupError` naming what is wrong with it."""
    if not password:
        raise ServerSetupError(
            f"--auth needs the admin user's password in ${ADMIN_PASSWORD_ENV} (there is no default); "
            f"set it in the environment of `stein server`, not on its command line")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ServerSetupError(f"${ADMIN_PASSWORD_ENV} is {len(password)} characters long; MLflow needs at least "
                               f"{MIN_PASSWORD_LENGTH}")
    if password == _LEGACY_DEFAULT_PASSWORD:
        raise ServerSetupError(f"${ADMIN_PASSWORD_ENV} is the well-known default of older MLflow releases; "
                               "choose another password")
    return password
