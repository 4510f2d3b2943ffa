"""Per-component MLflow users (tuneloop.mlflow_users) against a real `mlflow server --app-name basic-auth`
on loopback, with default_permission NO_PERMISSIONS as in prod: each user can do exactly its role's work
(the registry code path the pipeline, the monitor and the training pods run) and nothing more."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, start_until_healthy, tiny_config

pytestmark = pytest.mark.integration

ADMIN = ("platform-admin", "admin-password-0123")
USERS = {"pipeline": ("pipeline", "pipeline-password-1"), "monitor": ("monitor", "monitor-password-12"),
         "training": ("training", "training-password-1"), "serving": ("serving", "serving-password-12")}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "not-a-real-key-0123456789"}
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    url = f"http://127.0.0.1:{port}"
    proc = start_until_healthy([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")],
                               f"{url}/health", root / "server.log", env)
    yield url
    proc.terminate()
    proc.wait(30)


def _as(monkeypatch, user: tuple[str, str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def _denied(fn) -> bool:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    try:
        fn()
    except MlflowException as e:
        return e.get_http_status_code() in (401, 403)
    return False


@pytest.fixture(scope="module")
def installed(auth_server, tmp_path_factory) -> tuple[str, Path]:
    """What the chart's hook Job does: `python -m tuneloop.mlflow_users CONFIG` with the admin's
    credentials and each user's from the environment (run as its own process, as in the pod)."""
    import subprocess

    tmp = tmp_path_factory.mktemp("users-config")
    config = tiny_config(tmp, tmp / "no-model", registry__tracking_uri=auth_server)
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    for role, (name, password) in USERS.items():
        env[f"TUNELOOP_MLFLOW_{role.upper()}_USERNAME"] = name
        env[f"TUNELOOP_MLFLOW_{role.upper()}_PASSWORD"] = password
    for _ in range(2):  # a helm upgrade runs it again: idempotent
        done = subprocess.run([sys.executable, "-m", "tuneloop.mlflow_users", str(config), "--wait-seconds", "30"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not any(p in done.stdout + done.stderr for _, p in [ADMIN, *USERS.values()]), "a password was printed"
    assert "pipeline: user pipeline password set; experiment" in done.stderr
    return auth_server, config


def test_each_component_can_do_its_work_and_no_more(installed, tmp_path, monkeypatch):
    from conftest import register_version
    from mlflow.tracking import MlflowClient

    from tuneloop.config import load_config
    from tuneloop.registry import Registry

    url, config = installed
    cfg = load_config(config)
    experiment_id = stage_exp(url, cfg, monkeypatch)

    # the pipeline: parent and stage runs, register a version (artifacts proxied), move aliases
    _as(monkeypatch, USERS["pipeline"])
    reg = Registry(cfg)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    version = register_version(reg, adapter, "run-1")
    reg.set_alias("champion", version)
    stage_run = reg.stage_runs(reg.pipeline_run("run-1").info.run_id)[0].info.run_id

    # training pods: live metrics into the stage run; nothing on the model
    _as(monkeypatch, USERS["training"])
    client = MlflowClient(url, url)
    from mlflow.entities import Metric

    client.log_batch(stage_run, metrics=[Metric("loss", 1.5, 0, 0)])
    assert _denied(lambda: client.get_registered_model(cfg.registry.model_name))
    assert _denied(lambda: client.set_registered_model_alias(cfg.registry.model_name, "champion", version))

    # the monitor: a run per check, reads the champion, cannot move it
    _as(monkeypatch, USERS["monitor"])
    reg = Registry(cfg)
    assert str(reg.alias_version("champion").version) == version
    reg.record_run("monitor-1", {"tuneloop.stage": "monitor"}, {"window_requests": 3.0})
    assert _denied(lambda: reg.set_alias("champion", version))
    assert _denied(lambda: reg.client.delete_model_version(cfg.registry.model_name, version))

    # serving: reads the model and downloads the adapter (READ on the experiment too: the artifact proxy
    # authorizes by the version's run), writes nothing
    _as(monkeypatch, USERS["serving"])
    reg = Registry(cfg)
    got = reg.download_adapter(reg.alias_version("champion"), tmp_path / "cache")
    assert (got / "adapter_config.json").read_text() == '{"r": 4}'
    assert _denied(lambda: reg.client.create_run(experiment_id))
    assert _denied(lambda: reg.set_alias("canary", version))

    # none of them is an admin: user management is refused
    from mlflow.server.auth.client import AuthServiceClient

    for role, user in USERS.items():
        _as(monkeypatch, user)
        assert _denied(lambda: AuthServiceClient(url).create_user(f"{role}-x", "another-password-1")), role


def stage_exp(url: str, cfg, monkeypatch) -> str:  # noqa: ANN001 - the experiment id, looked up as the admin
    from mlflow.tracking import MlflowClient

    _as(monkeypatch, ADMIN)
    return MlflowClient(url).get_experiment_by_name(cfg.registry.experiment).experiment_id


def test_rotation_and_demotion(installed, monkeypatch):
    """Running again with a new password rotates it; a user someone made admin is demoted; a grant
    the role should not have is revoked."""
    from mlflow.server.auth.client import AuthServiceClient

    from tuneloop.config import load_config
    from tuneloop.mlflow_users import ComponentUser, ensure_users

    url, config = installed
    cfg = load_config(config)
    exp = stage_exp(url, cfg, monkeypatch)
    admin = AuthServiceClient(url)
    admin.update_user_admin("serving", True)
    admin.grant_user_permission("training", "registered_model", cfg.registry.model_name, "MANAGE")
    lines = ensure_users(url, exp, cfg.registry.model_name,
                         [ComponentUser("serving", "serving", "rotated-password-99"),
                          ComponentUser("training", "training", USERS["training"][1])])
    assert "admin rights removed" in lines[0] and f"model {cfg.registry.model_name}: revoked" in lines[1]
    assert admin.get_user("serving").is_admin is False
    _as(monkeypatch, ("serving", USERS["serving"][1]))
    assert _denied(lambda: AuthServiceClient(url).get_user("serving"))  # the old password no longer works
    _as(monkeypatch, ADMIN)
    ensure_users(url, exp, cfg.registry.model_name, [ComponentUser("serving", *USERS["serving"])])  # restore


def test_refuses_the_admin_and_bad_input():
    from tuneloop.mlflow_users import ComponentUser, ensure_users, users_from_env, wait_for_server

    with pytest.raises(ValueError, match="is the admin account"):
        ensure_users("http://127.0.0.1:9", "1", "m", [ComponentUser("pipeline", "root", "x" * 12)],
                     admin_username="root")
    with pytest.raises(ValueError, match="must be distinct"):
        ensure_users("http://127.0.0.1:9", "1", "m", [ComponentUser("pipeline", "a", "x" * 12),
                                                      ComponentUser("monitor", "a", "y" * 12)])
    with pytest.raises(ValueError, match="unknown MLflow user role"):
        ComponentUser("gateway-admin", "a", "b")
    with pytest.raises(ValueError, match="TUNELOOP_MLFLOW_MONITOR_PASSWORD is not set"):
        users_from_env({"TUNELOOP_MLFLOW_MONITOR_USERNAME": "monitor"})
    assert "secret" not in repr(ComponentUser("pipeline", "p", "secret-password"))
    assert [u.role for u in users_from_env({"TUNELOOP_MLFLOW_SERVING_USERNAME": "s",
                                            "TUNELOOP_MLFLOW_SERVING_PASSWORD": "p" * 12})] == ["serving"]
    with pytest.raises(TimeoutError, match="did not answer /health in 1 s"):
        wait_for_server(f"http://127.0.0.1:{free_port()}", 1)
