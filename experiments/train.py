"""Trains a fixed-size network: the baseline that growth is measured against.

Run: ``python -m experiments.train [--config=experiments/configs/train.py[:variant]]
[--workdir=...]``; writes ``train.jsonl``, ``train_curves.png`` and orbax checkpoints (resumes
from them when the workdir already holds some).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging

from experiments import common
from growjax import train, tree
from growjax.nets.common import host_init

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "train.py")


def train_fixed(config, splits, model, workdir: str | None, name: str = "train"):
  """Trains ``model`` per ``config`` (optimizer, steps, batch size).

  Returns:
    ``(FitResult, Trainer)``.
  """
  tx = common.make_optimizer(config.optim)
  trainer = train.make_trainer(tx)
  if workdir is not None:
    model, state, history = train.restore_or_create(
        workdir, model, lambda: host_init(model, jax.random.key(config.seed)), tx, config.seed)
  else:
    state, history = train.create_state(host_init(model, jax.random.key(config.seed)), tx,
                                        config.seed), []
  mesh = train.make_mesh() if config.get("data_parallel", False) and (
      config.batch_size % len(jax.devices()) == 0) else None
  res = train.fit(model, state, trainer, splits, steps=config.steps,
                  batch_size=config.batch_size, workdir=workdir, eval_every=config.eval_every,
                  log_every=config.log_every, mesh=mesh, history=history, seed=config.seed,
                  name=name)
  return res, trainer


def run(config, workdir: str) -> dict:
  """Trains the configured model; returns final metrics (params, val and test accuracy)."""
  splits = common.load_data(config.data)
  model = common.build_model(config.model, splits)
  res, trainer = train_fixed(config, splits, model, workdir)
  test = train.evaluate(trainer.eval_step, res.model, res.state, splits.test)
  val = [r for r in res.metrics if r["kind"] == "eval"]
  out = {"params": tree.count(res.state.params), "steps": int(res.state.step),
         "val_accuracy": val[-1].get("val_accuracy") if val else None,
         "test_accuracy": test.get("accuracy"), "test_loss": test["loss"]}
  logging.info("Final: %s", out)
  print(out)
  return out


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.config_and_workdir_flags(_DEFAULT_CONFIG, "train")
  app.run(main)
