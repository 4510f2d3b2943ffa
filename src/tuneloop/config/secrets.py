"""No credential ever enters a run config: the whole config travels to MLflow params, KFP run
parameters, the compiled pipeline and job specs. Credentials come from the environment (a
Kubernetes Secret through `kubernetes.secrets`, a pod's service account, AWS_* variables).

`credential_findings` walks a config and names every place that looks like one: a URI with a
password in it (`https://user:pass@host`), an option whose key names a secret (`storage_options:
{secret: ...}`), an environment entry whose name does (`train.cluster.env: {HF_TOKEN: ...}`).
"""

from __future__ import annotations

import re
from typing import Any

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL|PRIVATE_?KEY|"
                         r"ACCOUNT_?KEY|SESSION_?KEY)", re.I)
_URI_PASSWORD = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/@\s:]*:[^/@\s]+@", re.I)
_QUERY_SECRET = re.compile(r"[?&](?:[a-z_]*(?:token|secret|password|sig|key)[a-z_]*)=[^&\s]+", re.I)
# mappings whose keys are option or variable names (a secret-looking key there is a credential)
_NAMED_MAPPINGS = {"storage_options", "env"}


def credential_findings(node: Any, path: str = "", named: bool = False) -> list[str]:
    """`key: why` for every credential-looking value under node (a dumped config); `named`: inside a
    mapping of option or variable names (storage_options, env), nested mappings included."""
    out: list[str] = []
    if isinstance(node, dict):
        named = named or path.rsplit(".", 1)[-1] in _NAMED_MAPPINGS
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            if named and SECRET_NAME.search(str(k)) and v not in (None, ""):
                out.append(f"{key}: looks like a credential; give it through the environment (a Kubernetes Secret "
                           "listed in kubernetes.secrets, or the pod's service account), never in the config")
            else:
                out += credential_findings(v, key, named)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += credential_findings(v, f"{path}[{i}]", named)
    elif isinstance(node, str):
        if _URI_PASSWORD.match(node):
            out.append(f"{path}: the URI carries a password; drop it from the URI and give it through the "
                       "environment (e.g. MLFLOW_TRACKING_PASSWORD from a Secret in kubernetes.secrets)")
        elif "://" in node and _QUERY_SECRET.search(node):
            out.append(f"{path}: the URI carries a token or signature in its query; give it through the "
                       "environment instead")
    return out


def plain_env(env: dict[str, str]) -> dict[str, str]:
    """An `env` mapping of a config section, refused when a name looks like a secret's (validator body)."""
    for name in env:
        if SECRET_NAME.search(name):
            raise ValueError(f"{name}: looks like a secret; put it in a Kubernetes Secret and list it in "
                             "`kubernetes.secrets` (name, secret, key)")
    return env
