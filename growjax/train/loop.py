"""The training loop with growth hooks, data parallelism, metrics, plots and checkpoints.

``fit`` trains a model for a number of steps and calls an optional growth hook after every step;
when the hook returns a ``Growth`` (a grown model and its variables, from ``growjax.morph`` or
``growjax.grow``), the loop carries the optimizer state across with ``transplant`` (new entries
zero), re-places the state on the devices and continues — the jitted step retraces once for the
new model and never otherwise. This is the growth loop of Lawton, Galstyan & Ver Steeg (2024,
arXiv:2411.05855): train N steps → grow → continue.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging

from growjax import tree
from growjax.curvature.losses import Loss, get_loss
from growjax.data.splits import Dataset, Splits, batches
from growjax.train import sharding
from growjax.train.checkpoint import Checkpointer
from growjax.train.metrics import MetricWriter, Progress, save_figure
from growjax.train.state import TrainState, regrow_state
from growjax.train.steps import evaluate, make_eval_step, make_train_step


class Growth(NamedTuple):
  """What a growth hook returns: the grown model, its variables and the morphism records."""
  model: nn.Module
  variables: dict
  records: list[dict]


GrowthHook = Callable[[int, nn.Module, TrainState], "Growth | None"]


class FitResult(NamedTuple):
  model: nn.Module
  state: TrainState
  history: list[dict]
  metrics: list[dict]


class Trainer(NamedTuple):
  """The jitted step functions of one (optimizer, loss) pair, shared across growth."""
  tx: optax.GradientTransformation
  loss: Loss
  train_step: Callable
  eval_step: Callable


def make_trainer(tx: optax.GradientTransformation, loss: str | Loss = "softmax_cross_entropy",
                 donate: bool = True) -> Trainer:
  """Jits the train and eval steps once (model static): reuse it across growth and runs."""
  loss = get_loss(loss)
  train_step = jax.jit(make_train_step(tx, loss), static_argnums=0,
                       donate_argnums=(1,) if donate else ())
  eval_step = jax.jit(make_eval_step(loss), static_argnums=0)
  return Trainer(tx, loss, train_step, eval_step)


def fit(model: nn.Module, state: TrainState, trainer: Trainer, data: Splits, *, steps: int,
        batch_size: int, workdir: str | os.PathLike | None = None, eval_every: int = 200,
        log_every: int = 50, checkpoint_every: int | None = None,
        growth_hook: GrowthHook | None = None, mesh: jax.sharding.Mesh | None = None,
        history: Sequence[dict] | None = None, seed: int = 0, name: str = "train",
        progress_every_s: float = 10.0, plot: bool = True) -> FitResult:
  """Trains ``state`` of ``model`` until ``state.step == steps``.

  Args:
    model: the model (static config).
    state: initial ``TrainState`` (``growjax.train.create_state`` or a restored one).
    trainer: jitted steps from ``make_trainer``.
    data: train/val/test splits; batches are drawn from ``data.train``.
    steps: total number of steps (absolute: a restored state resumes at its own step).
    batch_size: global batch size (a multiple of the number of devices in ``mesh``).
    workdir: where metrics (``<name>.jsonl``), plots and checkpoints go (None: nowhere).
    eval_every: validation evaluation interval (steps); also at the end.
    log_every: interval for train-metric records.
    checkpoint_every: checkpoint interval (None: only at the end, if ``workdir``).
    growth_hook: ``hook(step, model, state) -> Growth | None`` called after every step.
    mesh: data-parallel mesh (``sharding.make_mesh()``); None: the default device only.
    history: growth records so far (carried into checkpoints).
    seed: data-order seed.
    name: metrics file / progress label.
    progress_every_s: interval of progress log lines.
    plot: save ``<name>_curves.png`` at the end.

  Returns:
    ``FitResult(model, state, history, metrics)``; ``metrics`` holds every record written.
  """
  if steps <= 0 or batch_size <= 0:
    raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive.")
  if len(data.train) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(data.train)} training examples.")
  history = list(history or [])
  writer = MetricWriter(workdir, name) if workdir is not None else None
  ckpt = Checkpointer(os.path.join(os.fspath(workdir), "checkpoints")) if (
      workdir is not None) else None
  put_batch = (lambda b: sharding.shard_batch(b, mesh)) if mesh is not None else (
      lambda b: jax.device_put(b))
  place = (lambda s: sharding.replicate(s, mesh)) if mesh is not None else (lambda s: s)
  state = place(state)
  start = int(state.step)
  it = batches(data.train, batch_size, seed=seed + start)
  progress = Progress(steps, name=name, every_s=progress_every_s, start=start)
  records: list[dict] = []

  def emit(record):
    records.append(record)
    if writer is not None:
      writer.write(record)

  t0 = time.perf_counter()
  metrics = None
  for step in range(start + 1, steps + 1):
    batch = next(it)
    state, metrics = trainer.train_step(model, state, put_batch((batch.x, batch.y)))
    if step % log_every == 0 or step == steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      emit({"kind": "train", "step": step, "params": tree.count(state.params),
            "seconds": time.perf_counter() - t0, **m})
      progress.update(step, **m)
    if step % eval_every == 0 or step == steps:
      val = evaluate(trainer.eval_step, model, state, data.val, put=_eval_put(mesh))
      emit({"kind": "eval", "step": step, "params": tree.count(state.params),
            **{f"val_{k}": v for k, v in val.items()}})
    if growth_hook is not None and step < steps:
      grown = growth_hook(step, model, state)
      if grown is not None:
        renames = {}
        for rec in grown.records:
          renames.update(rec.get("renames", {}))
        model = grown.model
        state = place(regrow_state(state, grown.variables, trainer.tx, renames))
        history.extend(grown.records)
        emit({"kind": "growth", "step": step, "params": tree.count(state.params),
              "records": grown.records})
        logging.info("[%s] step %d: grew to %d parameters (%s)", name, step,
                     tree.count(state.params), ", ".join(r.get("op", "?") for r in grown.records))
    if ckpt is not None and checkpoint_every and step % checkpoint_every == 0:
      ckpt.save(step, model, jax.device_get(state), history)
  if ckpt is not None:
    ckpt.save(int(state.step), model, jax.device_get(state), history)
    ckpt.close()
  if plot and workdir is not None:
    plot_curves(records, os.path.join(os.fspath(workdir), f"{name}_curves.png"), title=name)
  return FitResult(model, state, history, records)


def _eval_put(mesh):
  if mesh is None:
    return lambda b: jax.device_put(b)
  n = mesh.devices.size

  def put(b):
    # Evaluation batches may be ragged; shard only those that split evenly.
    return sharding.shard_batch(b, mesh) if np.shape(b[0])[0] % n == 0 else jax.device_put(b)
  return put


def plot_curves(records: Sequence[dict], path: str, title: str = "") -> str:
  """Train/val loss and accuracy vs step, with growth events as vertical lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  grows = [r["step"] for r in records if r["kind"] == "growth"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if evals:
    axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], label="val")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("loss")
  axes[0].set_yscale("log")
  if evals and "val_accuracy" in evals[0]:
    axes[1].plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], label="val")
  if train and "accuracy" in train[0]:
    axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], alpha=0.5,
                 label="train (batch)")
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("accuracy")
  for ax in axes:
    for g in grows:
      ax.axvline(g, color="gray", lw=0.8, ls=":")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.suptitle(title)
  return save_figure(fig, path)


def restore_or_create(workdir: str | os.PathLike, model: nn.Module, variables_fn: Callable[[], dict],
                      tx: optax.GradientTransformation, seed: int = 0
                      ) -> tuple[nn.Module, TrainState, list[dict]]:
  """Resumes from ``<workdir>/checkpoints`` if it holds a checkpoint, else starts fresh."""
  from growjax.train.state import create_state  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(os.path.join(os.fspath(workdir), "checkpoints"))
  try:
    if ckpt.latest_step() is not None:
      model, state, history, _ = ckpt.restore(tx)
      logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
      return model, state, history
  finally:
    ckpt.close()
  return model, create_state(variables_fn(), tx, seed), []
