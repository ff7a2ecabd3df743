"""Configuration: one dataclass tree, loaded from YAML recipes plus dotted overrides."""

from mmfm.config.loading import field_docs, load_config, load_structured, save_config, to_yaml
from mmfm.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SourceConfig,
    TrainConfig,
)
from mmfm.core.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "SourceConfig",
    "TrainConfig",
    "field_docs",
    "load_config",
    "load_structured",
    "save_config",
    "to_yaml",
]
