"""Error types a user sees, each naming the file, key, row or tensor at fault."""


class OR1Error(Exception):
    """Base class of the errors or1-megatron raises on bad input."""


class ConfigError(OR1Error):
    """A run config is malformed: unknown key, wrong type or an impossible combination."""


class ModelConfigError(OR1Error):
    """A Hugging Face config.json is missing, unsupported or inconsistent."""


class CheckpointError(OR1Error):
    """A checkpoint is missing tensors, has extra ones, or has wrong shapes."""
