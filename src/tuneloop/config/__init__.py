"""The typed run config: one YAML file -> one `RunConfig`, checked before any compute.

Every field has a help text (it is the configuration reference in the README, printed by
`tuneloop config-reference`). Unknown keys are refused, and combinations that cannot work
are refused in validators, with the dotted key named in the message, so a mistake fails in
a second on the laptop instead of an hour later on a GPU node.

Relative paths in a config file are resolved against the file's own folder, so a config
and its data can travel together; `s3://` and other URIs are left alone.

One module per section (data, train, evaluate, deploy, kubernetes), the whole config in run.py,
loading in load.py, moved keys in deprecated.py, the reference generator in reference.py.
"""

from tuneloop.config.base import (CLASSIFICATION_METRICS, DEFAULT_STATE_DIR, HIGHER_IS_BETTER, PREFERENCE_SLICE,
                                  SAFETY_SLICE, ConfigError)
from tuneloop.config.data import (PII_ENTITIES, DataConfig, DataSource, DedupConfig, DriftConfig, PiiConfig,
                                  template_fields)
from tuneloop.config.deploy import CanaryConfig, DeployConfig, KServeConfig, MonitorConfig, RegistryConfig
from tuneloop.config.evaluate import EvaluateConfig, GateRule, SafetyConfig, SliceConfig
from tuneloop.config.kubernetes import (KubernetesConfig, PlatformConfig, PodResources, PredictorResources, SecretEnv,
                                        Toleration, TrainPodResources)
from tuneloop.config.load import demo_config_path, load_config, parse_config
from tuneloop.config.reference import reference_markdown
from tuneloop.config.run import RunConfig
from tuneloop.config.train import (BaseModelConfig, CheckpointConfig, ClusterConfig, DPOConfig, LoraConfig, SFTConfig,
                                   TrainConfig)

__all__ = ["CLASSIFICATION_METRICS", "DEFAULT_STATE_DIR", "HIGHER_IS_BETTER", "PII_ENTITIES", "PREFERENCE_SLICE",
           "SAFETY_SLICE", "BaseModelConfig", "CanaryConfig", "CheckpointConfig", "ClusterConfig", "ConfigError",
           "DPOConfig", "DataConfig", "DataSource", "DedupConfig", "DeployConfig", "DriftConfig", "EvaluateConfig",
           "GateRule", "KServeConfig", "KubernetesConfig", "LoraConfig", "MonitorConfig", "PiiConfig",
           "PlatformConfig", "PodResources", "PredictorResources", "RegistryConfig", "RunConfig", "SFTConfig",
           "SafetyConfig", "SecretEnv", "SliceConfig", "Toleration", "TrainConfig", "TrainPodResources",
           "demo_config_path", "load_config", "parse_config", "reference_markdown", "template_fields"]
