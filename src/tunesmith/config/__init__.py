"""Config schema and loading."""

from tunesmith.config.load import dump_config, load_config
from tunesmith.config.schema import Config

__all__ = ["Config", "dump_config", "load_config"]
