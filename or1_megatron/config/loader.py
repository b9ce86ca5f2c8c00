"""Loads a YAML run config onto the typed schema, applies `key=value` overrides, validates it.

Every error names where the bad value came from: the YAML file or the command-line override.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from or1_megatron.config.schema import OR1Config
from or1_megatron.config.validate import validate
from or1_megatron.errors import ConfigError


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {reason}") from None


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """`key=value` with YAML parsing of the value; list indices work (`stages.1.steps=40`)."""
    key, raw = item.split("=", 1)
    try:
        value = OmegaConf.from_dotlist([f"value={raw}"])["value"]
        OmegaConf.update(cfg, key.strip(), value, merge=True)
    except (OmegaConfBaseException, TypeError, ValueError, IndexError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"command line override {item!r}: {reason}") from None
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> OR1Config:
    """Load `path` (YAML) onto the schema, apply dotted overrides, validate, return the object."""
    cfg = OmegaConf.structured(OR1Config)
    source = "<defaults>"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError and friends: report the file
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping")
        cfg = _merge(cfg, layer, source)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        cfg = _apply_override(cfg, item)
    try:
        config: OR1Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{source}: key '{key}': {str(exc).splitlines()[0]}") from None
    validate(config, source)
    return config


def to_yaml(config: OR1Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def default_run_dir(config_path: str | Path, configured: str) -> Path:
    """run.run_dir when set, else runs/<config name>: where `or1 train` and the Slurm launcher
    put a run."""
    return Path(configured) if configured else Path("runs") / Path(config_path).stem


def save_resolved_config(config: OR1Config, run_dir: str | Path) -> Path:
    """Write the fully resolved config next to the run's outputs, so every run is reproducible."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(config))
    return out
