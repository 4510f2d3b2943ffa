"""MLflow users per component: each client of the MLflow server gets its own basic-auth user with
the least permissions its work needs, instead of the admin account.

| role     | experiment (runs, metrics, artifacts)         | registered model (versions, aliases, tags) |
|----------|-----------------------------------------------|--------------------------------------------|
| pipeline | EDIT: parent and stage runs                   | MANAGE: register versions, move aliases    |
| monitor  | EDIT: one run per check                       | READ: the champion alias and its tags      |
| training | EDIT: live metrics into the stage run         | none                                       |
| serving  | READ: a version's files live in its run       | READ: resolve the served version           |

`ensure_users` makes the server match that table: a user is created (or its password reset to the
one given, so rotating the Secret and upgrading the release rotates it), kept non-admin, and granted
exactly its role's permission on the run config's experiment and registered model (a grant it should
not have is revoked). It runs with the admin's credentials (MLFLOW_TRACKING_USERNAME/PASSWORD) through
MLflow's own `AuthServiceClient`; the chart runs `python -m tuneloop.mlflow_users CONFIG` as a
post-install/post-upgrade hook Job, with each user's name and password from a Secret in
TUNELOOP_MLFLOW_<ROLE>_USERNAME / TUNELOOP_MLFLOW_<ROLE>_PASSWORD.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("tuneloop.mlflow_users")

EXPERIMENT, REGISTERED_MODEL = "experiment", "registered_model"
# role -> (permission on the experiment, permission on the registered model); None: no grant
ROLES: dict[str, tuple[str | None, str | None]] = {
    "pipeline": ("EDIT", "MANAGE"),
    "monitor": ("EDIT", "READ"),
    "training": ("EDIT", None),
    "serving": ("READ", "READ"),  # READ on the experiment: the proxy authorizes a version's files by its run
}


@dataclass(frozen=True)
class ComponentUser:
    role: str  # a key of ROLES
    username: str
    password: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown MLflow user role {self.role!r}; one of {', '.join(ROLES)}")
        if not self.username or not self.password:
            raise ValueError(f"MLflow user for {self.role}: username and password must not be empty")

    def __repr__(self) -> str:  # never print the password
        return f"ComponentUser(role={self.role!r}, username={self.username!r})"


def _error_code(e: Exception) -> str | None:
    return getattr(e, "error_code", None)


def _set_permission(client, username: str, resource_type: str, resource_id: str,  # noqa: ANN001
                    permission: str | None) -> str:
    """Exactly `permission` for the user on one resource (None: no explicit grant). Returns what was done."""
    from mlflow.exceptions import MlflowException

    if permission is None:
        try:
            client.revoke_user_permission(username, resource_type, resource_id)
            return "revoked"
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
                raise
            return "none"
    try:
        client.grant_user_permission(username, resource_type, resource_id, permission)
        return f"granted {permission}"
    except MlflowException as e:
        if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
            raise
    # a grant exists already (maybe another level): replace it
    client.revoke_user_permission(username, resource_type, resource_id)
    client.grant_user_permission(username, resource_type, resource_id, permission)
    return f"set {permission}"


def ensure_users(tracking_uri: str, experiment_id: str, model_name: str, users: list[ComponentUser],
                 admin_username: str | None = None) -> list[str]:
    """Create or update every user and give it exactly its role's permissions on the experiment (by id)
    and the registered model (by name). Call with the admin's credentials in MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD. Returns one line per user saying what was done (no passwords)."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    admin_username = admin_username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    names = [u.username for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"MLflow users must be distinct, got {names}")
    if admin_username and admin_username in names:
        raise ValueError(f"MLflow user {admin_username!r} is the admin account; give each component its own user")
    client = AuthServiceClient(tracking_uri)
    lines = []
    for u in users:
        try:
            client.create_user(u.username, u.password)
            action = "created"
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            client.update_user_password(u.username, u.password)
            action = "password set"
        if client.get_user(u.username).is_admin:
            client.update_user_admin(u.username, False)
            action += ", admin rights removed"
        exp_perm, model_perm = ROLES[u.role]
        on_exp = _set_permission(client, u.username, EXPERIMENT, experiment_id, exp_perm)
        on_model = _set_permission(client, u.username, REGISTERED_MODEL, model_name, model_perm)
        lines.append(f"{u.role}: user {u.username} {action}; experiment {experiment_id}: {on_exp}; "
                     f"model {model_name}: {on_model}")
    return lines


def users_from_env(env: Mapping[str, str]) -> list[ComponentUser]:
    """Every role whose TUNELOOP_MLFLOW_<ROLE>_USERNAME is set, with its _PASSWORD."""
    users = []
    for role in ROLES:
        name = env.get(f"TUNELOOP_MLFLOW_{role.upper()}_USERNAME")
        if name:
            password = env.get(f"TUNELOOP_MLFLOW_{role.upper()}_PASSWORD", "")
            if not password:
                raise ValueError(f"TUNELOOP_MLFLOW_{role.upper()}_PASSWORD is not set (user {name})")
            users.append(ComponentUser(role, name, password))
    return users


def wait_for_server(tracking_uri: str, timeout_s: float) -> None:
    """Until MLflow's /health answers 200 (a hook Job may start before the server is ready)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=5) as r:  # noqa: S310
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except OSError as e:  # refused, DNS not there yet, 5xx while it starts
            last = e
        time.sleep(2)
    raise TimeoutError(f"MLflow at {tracking_uri} did not answer /health in {timeout_s:.0f} s: {last}")


def main(argv: list[str] | None = None) -> int:
    """`python -m tuneloop.mlflow_users CONFIG`: the users of TUNELOOP_MLFLOW_<ROLE>_* on the run
    config's MLflow server, experiment and registered model (both created as the admin if missing)."""
    ap = argparse.ArgumentParser(prog="python -m tuneloop.mlflow_users", description=main.__doc__)
    ap.add_argument("config", help="the run config (registry.tracking_uri, experiment and model_name)")
    ap.add_argument("--wait-seconds", type=float, default=300, help="how long to wait for the server")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tuneloop.config import load_config
    from tuneloop.registry import Registry

    cfg = load_config(args.config)
    uri = cfg.registry.tracking_uri
    if not uri or not uri.startswith(("http://", "https://")):
        print(f"{args.config}: registry.tracking_uri must be an MLflow server (http[s]://), got {uri!r}",
              file=sys.stderr)
        return 2
    users = users_from_env(os.environ)
    if not users:
        print("no TUNELOOP_MLFLOW_<ROLE>_USERNAME set: nothing to do", file=sys.stderr)
        return 2
    wait_for_server(uri, args.wait_seconds)
    reg = Registry(cfg)
    experiment_id = reg.experiment_id()  # created as the admin when missing
    _ensure_model(reg)
    for line in ensure_users(uri, experiment_id, cfg.registry.model_name, users):
        log.info("%s", line)
    return 0


def _ensure_model(reg) -> None:  # noqa: ANN001 - tuneloop.registry.Registry
    """The registered model, created as the admin when missing (permissions attach to an existing one)."""
    from mlflow.exceptions import MlflowException

    try:
        reg.client.get_registered_model(reg.name)
    except MlflowException as e:
        if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise
        reg.client.create_registered_model(reg.name, description="LoRA adapters trained by tuneloop.")


if __name__ == "__main__":
    sys.exit(main())
