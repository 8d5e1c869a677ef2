"""Orbax checkpoints that restore a grown network exactly.

A checkpoint holds two items: ``state`` (the ``TrainState`` arrays, through orbax's
StandardSave) and ``meta`` (JSON: the model config as ``growjax.nets.config_dict``, the growth
history and any extra run information). Restoring reads ``meta`` first, rebuilds the grown model
from its config, derives the abstract state (shapes and dtypes) from it and restores the arrays
into exactly those shapes — so a network grown ten times restores without the caller knowing its
widths.

Saves are synchronous and atomic: orbax writes into a temporary directory and renames it when
complete, so a crash during a save leaves the previous checkpoint as the latest restorable one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import optax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from growjax.nets.common import config_dict, from_config_dict
from growjax.train.state import TrainState


class _DropOrbaxInfo(logging.Filter):
  """Orbax logs dozens of INFO lines per save through absl; keep its warnings only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _quiet_orbax() -> None:
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
    handler.addFilter(_DropOrbaxInfo())


class Checkpointer:
  """Saves and restores ``(model, state, history)`` under ``directory/<step>``."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    _quiet_orbax()
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, model: nn.Module, state: TrainState,
           history: list[Mapping[str, Any]] | None = None,
           extra: Mapping[str, Any] | None = None) -> bool:
    """Writes a checkpoint for ``step`` (atomic: all or nothing).

    A step is written once: if ``step`` already has a checkpoint (e.g. a finished run resumed),
    nothing is written and False is returned.
    """
    if int(step) in self.all_steps():
      return False
    meta = {"model": config_dict(model), "history": list(history or []),
            "extra": dict(extra or {}), "step": int(step)}
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    return True

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, tx: optax.GradientTransformation, step: int | None = None
              ) -> tuple[nn.Module, TrainState, list[dict], dict]:
    """Restores ``(model, state, history, extra)`` at ``step`` (default: the latest).

    Args:
      tx: the optimizer the state was trained with (its state structure is rebuilt from it).
      step: checkpoint step.

    Raises:
      FileNotFoundError: no checkpoint in the directory (names the directory).
    """
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' for step {step}'} under {self.directory}; "
          f"available steps: {self.all_steps()}.")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    model = from_config_dict(meta["model"])
    abstract = abstract_state(model, tx)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    return model, restored, meta["history"], meta["extra"]

  def close(self) -> None:
    self.manager.close()


def abstract_state(model: nn.Module, tx: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs of the ``TrainState`` of ``model`` trained with ``tx`` (no FLOPs)."""
  from growjax.train.state import create_state  # pylint: disable=import-outside-toplevel
  return jax.eval_shape(lambda: create_state(model.init_variables(jax.random.key(0)), tx))
