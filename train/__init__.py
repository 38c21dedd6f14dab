"""Training: configuration, run context, data, and the loop (`train_once`)."""

from train.config import Config, ConfigError, load_config
from train.context import RunContext
from train.trainer import train_once

__all__ = ["Config", "ConfigError", "RunContext", "load_config", "train_once"]
