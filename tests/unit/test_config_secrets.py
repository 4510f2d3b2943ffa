"""Credentials never enter a run config (it travels to MLflow params, KFP parameters and job specs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config

from tuneloop.config import ConfigError, load_config


@pytest.mark.parametrize("override, key", [
    ({"registry__tracking_uri": "https://admin:hunter2@mlflow.example.com"}, "registry.tracking_uri"),
    ({"data__sources": [{"path": "s3://bucket/train/", "storage_options": {"secret": "AKIA-SECRET"}}]},
     "data.sources[0].storage_options.secret"),
    ({"data__sources": [{"path": "s3://bucket/train/", "storage_options": {"client_kwargs": {
        "aws_secret_access_key": "x"}}}]}, "aws_secret_access_key"),
    ({"train__checkpoint__uri": "https://store.example.com/ckpt?sig=abcdef&x=1"}, "train.checkpoint.uri"),
    ({"train__cluster__env": {"WANDB_API_KEY": "k"}}, "WANDB_API_KEY"),
])
def test_a_credential_in_the_config_is_refused_naming_the_key(tmp_path: Path, override: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(tmp_path, Path("/nonexistent-model"), **override))
    assert key in str(e.value) and ("credential" in str(e.value) or "secret" in str(e.value)
                                    or "password" in str(e.value) or "token" in str(e.value)), str(e.value)
    assert "hunter2" not in str(e.value) and "AKIA-SECRET" not in str(e.value)


def test_uris_without_credentials_and_plain_options_pass(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, Path("/nonexistent-model"),
                                  registry__tracking_uri="https://mlflow.example.com:5000",
                                  data__sources=[{"path": "s3://bucket/train/",
                                                  "storage_options": {"endpoint_url": "http://minio:9000"}}]))
    assert cfg.registry.tracking_uri.startswith("https://")
