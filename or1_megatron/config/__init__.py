"""Run configuration: typed schema, YAML + dotted-override loading, validation, saving."""
from or1_megatron.config.loader import load_config, save_resolved_config
from or1_megatron.config.schema import OR1Config

__all__ = ["OR1Config", "load_config", "save_resolved_config"]
