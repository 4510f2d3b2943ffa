"""Test helper: a Guard built the way the services build theirs (Guard.from_config over deploy.auth and
deploy.limits, keys and the user-id secret from the environment a Secret would fill), and the
Authorization headers of each key."""

from __future__ import annotations

from typing import Any

import pytest

from tuneloop.config.deploy import AuthConfig, LimitsConfig
from tuneloop.feedback.auth import Guard, key_line, new_token

USER_SECRET = "s" * 40


def make_guard(monkeypatch: pytest.MonkeyPatch, keys: dict[str, str], limits: dict[str, Any] | None = None,
               **auth: Any) -> tuple[Guard, dict[str, dict[str, str]]]:
    """keys: name -> comma-separated scopes. Returns the guard and name -> headers."""
    tokens = {name: new_token() for name in keys}
    monkeypatch.setenv("TUNELOOP_API_KEYS", ";".join(key_line(n, s.split(","), tokens[n]) for n, s in keys.items()))
    monkeypatch.setenv("TUNELOOP_USER_ID_SECRET", USER_SECRET)
    guard = Guard.from_config(AuthConfig(**auth), LimitsConfig.model_validate(limits or {}))
    return guard, {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}
