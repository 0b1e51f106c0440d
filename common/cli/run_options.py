"""The options `fedscan simulate` and `fedscan run` share, declared once: the run settings a flag
may set, how each is spelled, and the run config they make together with --config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fedscan.common.config import (
    MODELS,
    STRATEGIES,
    TASKS,
    RunConfig,
    flat_settings,
    load_run_config,
    read_toml,
)
from fedscan.common.errors import FedscanError

# The run settings the two commands take, by run-config key, and the flag that sets each: error
# messages name the flag a user typed (`--out`, `--lr`), not the key.
FLAGS: dict[str, str] = {
    "sites": "--sites",
    "rounds": "--rounds",
    "data_root": "--data-root",
    "output": "--out",
    "seed": "--seed",
    "task": "--task",
    "model": "--model",
    "strategy": "--strategy",
    "local_epochs": "--local-epochs",
    "learning_rate": "--lr",
    "batch_size": "--batch-size",
    "image_size": "--image-size",
    "device": "--device",
    "secagg": "--secagg/--no-secagg",
    "wait_timeout": "--wait-timeout",
    "round_timeout": "--round-timeout",
}
# the other options of both, and how they are spelled
CONFIG_FLAG, OVERWRITE_FLAG = "--config", "--overwrite"


def option(key: str, help: str) -> Any:
    """The option that sets the run setting ``key`` (None: not given), under its flag."""
    return typer.Option(None, FLAGS[key], help=help)


CONFIG = typer.Option(None, CONFIG_FLAG, help="Run configuration (TOML).")
ROUNDS = option("rounds", "Federated rounds.")
SEED = option("seed", "Random seed.")
TASK = option("task", f"One of: {', '.join(TASKS)}.")
MODEL = option("model", f"One of: {', '.join(MODELS)}.")
STRATEGY = option("strategy", f"One of: {', '.join(STRATEGIES)}.")
LOCAL_EPOCHS = option("local_epochs", "Local epochs per round (0: no training, to time the protocol).")
LEARNING_RATE = option("learning_rate", "Learning rate.")
BATCH_SIZE = option("batch_size", "Batch size.")
IMAGE_SIZE = option("image_size", "Image side in pixels (multiple of 16).")
OVERWRITE = typer.Option(False, OVERWRITE_FLAG, help="Replace the results of an earlier run in --out.")


def given_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The run settings among a command's parameters (``typer.Context.params``; None: not given)."""
    return {key: params[key] for key in FLAGS if key in params}


def flags_of(keys: list[str]) -> str:
    """The flags behind these settings or options, as a user typed them."""
    other = {"config": CONFIG_FLAG, "overwrite": OVERWRITE_FLAG}
    return ", ".join(FLAGS.get(k) or other.get(k) or "--" + k.replace("_", "-") for k in keys)


def config_sets(config: Path | None, key: str) -> bool:
    """Whether the --config file sets ``key``, flat or in its group's table (a file that cannot be
    read says no here: building the run config names the problem)."""
    if config is None:
        return False
    try:
        return key in flat_settings(read_toml(config))
    except (ValueError, FedscanError):
        return False


def run_config(config: Path | None, settings: dict[str, Any]) -> RunConfig:
    """The run config from --config and the settings given as flags; a FedscanError names the flag."""
    return load_run_config(config, settings, flags=FLAGS)
