"""Grows a network during training by Gauss-Newton-learned morphisms (or a baseline method).

Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855): train → collect statistics → learn and
score candidate morphisms at every site → apply the best within the round's budget → continue.
The run prints a per-round table (params, FLOPs, train loss, validation accuracy, predicted and
realised ΔL, λ, seconds), writes ``train.jsonl`` / ``growth.jsonl``, orbax checkpoints of the
grown network, ``growth.png`` (loss and accuracy vs parameter count, with fixed-size baselines of
a width sweep trained for the same number of steps) and ``summary.json``.

Run: ``python -m experiments.grow`` (digits MLP, a few minutes on a 2-core CPU); see
``experiments/configs/grow.py`` for the variants.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging

from experiments import common
from experiments.train import train_fixed
from growjax import grow, train, tree
from growjax.grow.candidates import LearnConfig
from growjax.nets.common import host_init

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "grow.py")


def grow_config(c) -> grow.GrowConfig:
  """``growjax.grow.GrowConfig`` from the ``config.grow`` block."""
  learn = LearnConfig(damping=c.damping, fan_out_solver=c.fan_out_solver,
                      psi_steps=c.psi_steps, psi_lr=c.psi_lr, psi_init=c.psi_init)
  return grow.GrowConfig(method=c.method, ks=tuple(c.ks), rank_by=c.rank_by,
                         round_budget=c.round_budget, round_budget_frac=c.round_budget_frac,
                         max_morphisms=c.max_morphisms, width_bucket=c.width_bucket,
                         gammas=tuple(c.gammas), damping=c.damping,
                         adapt_damping=c.adapt_damping,
                         damping_bounds=(c.damping_floor, grow.GrowConfig().damping_bounds[1]),
                         relinearize=c.relinearize, learn=learn)


def run(config, workdir: str) -> dict:
  """Grows the configured seed network; returns the summary (also ``summary.json``)."""
  splits = common.load_data(config.data)
  model = common.build_model(config.model, splits)
  tx = common.make_optimizer(config.optim)
  trainer = train.make_trainer(tx, config.loss)
  searcher = grow.Searcher(config.loss, grow_config(config.grow))
  schedule = grow.Schedule(**dict(config.schedule))
  grower = grow.Grower(searcher, splits, trainer, schedule, seed=config.seed, workdir=workdir)
  state = train.create_state(host_init(model, jax.random.key(config.seed)), tx, config.seed)
  mesh = train.make_mesh() if config.data_parallel and (
      config.batch_size % len(jax.devices()) == 0) else None
  seed_params = tree.count(state.params)
  res = train.fit(model, state, trainer, splits, steps=config.steps,
                  batch_size=config.batch_size, workdir=workdir, eval_every=config.eval_every,
                  log_every=config.log_every, growth_hook=grower, mesh=mesh, seed=config.seed,
                  name="train")
  val = train.evaluate(trainer.eval_step, res.model, res.state, splits.val)
  test = train.evaluate(trainer.eval_step, res.model, res.state, splits.test)
  final = {"round": "final", "step": int(res.state.step), "params": tree.count(res.state.params),
           "val_accuracy": val.get("accuracy"), "val_loss": val["loss"]}
  columns = ["round", "step", "params", "flops", "train_loss", "val_accuracy", "sites",
             "predicted", "realised", "damping", "seconds"]
  table = train.format_table(grower.rows + [final], columns)
  print(f"\nGrowth rounds ({config.grow.method}):\n{table}\n")

  baselines = []
  if config.baselines.enabled:
    for widths in config.baselines.widths:
      fixed_model = _with_widths(model_config(config.model), widths)
      fixed = common.build_model(fixed_model, splits)
      fres, ftrainer = train_fixed(config, splits, fixed, None, name=f"fixed_{widths}")
      fval = train.evaluate(ftrainer.eval_step, fres.model, fres.state, splits.val)
      baselines.append({"widths": list(widths), "params": tree.count(fres.state.params),
                        "val_accuracy": fval.get("accuracy"), "val_loss": fval["loss"]})
    print("Fixed-size baselines (same steps):\n" + train.format_table(baselines) + "\n")

  summary = {"method": config.grow.method, "seed_params": seed_params,
             "final_params": final["params"], "final_model": str(res.model),
             "val_accuracy": final["val_accuracy"], "val_loss": final["val_loss"],
             "test_accuracy": test.get("accuracy"), "test_loss": test["loss"],
             "rounds": grower.rows, "stopped": grower.stopped, "baselines": baselines}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, default=str)
  plot_growth(grower.rows, final, baselines, os.path.join(workdir, "growth.png"),
              title=f"{config.data.name}: {config.grow.method} growth")
  return summary


def model_config(c):
  return c.copy_and_resolve_references()


def _with_widths(c, widths):
  field = {"mlp": "widths", "convnet": "channels", "resnet": "stages"}[c.kind]
  c[field] = tuple(widths)
  return c


def plot_growth(rows, final, baselines, path: str, title: str = "") -> str:
  """Validation loss and accuracy vs parameter count: growth trajectory and fixed sizes."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  pts = [r for r in rows if r["params"]] + [final]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, label in ((axes[0], "val_loss", "validation loss"),
                         (axes[1], "val_accuracy", "validation accuracy")):
    ax.plot([r["params"] for r in pts], [r[key] for r in pts], "o-", label="growth (per round)")
    if baselines:
      ax.plot([b["params"] for b in baselines], [b[key] for b in baselines], "s--",
              label="fixed size (same steps)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(label)
    ax.legend()
  fig.suptitle(title)
  return train.save_figure(fig, path)


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.config_and_workdir_flags(_DEFAULT_CONFIG, "grow")
  app.run(main)
