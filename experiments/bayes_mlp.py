"""Bayesian MLP on digits by mean-field Gaussian VI: predictive uncertainty and calibration.

Mean-field VI over the MLP's parameter tree (``growjax.vi.meanfield_vi``: reparameterised ELBO,
closed-form KL to a N(0, prior_std^2) prior, Adam; Bayes-by-backprop, Blundell et al. 2015,
arXiv:1505.05424) against the same MLP trained to its MAP point (the same prior as an L2 penalty,
same optimizer and steps). Both are judged on the held-out test split: accuracy, negative
log-likelihood, expected calibration error (15 bins), and predictive entropy on correct,
misclassified and out-of-distribution inputs (uniform-noise images and inverted digits), with the
AUROC of entropy for telling misclassified and OOD inputs apart from correct ones.

Outputs in the workdir: ``metrics.jsonl`` (training curve records, then the final comparison),
``bayes_mlp.png`` (reliability diagrams, entropy histograms, training curves).

Run: ``python -m experiments.bayes_mlp --workdir=/tmp/bayes_mlp``
(config and expected results: experiments/configs/bayes_mlp.py).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from growjax import vi
from growjax.data import batches, load_digits
from growjax.nets import MLP
from growjax.train.metrics import MetricWriter, Progress, format_table, save_figure

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "bayes_mlp.py")


def entropy(probs: jax.Array) -> jax.Array:
  """Predictive entropy ``[n]`` (nats) of probabilities ``[n, classes]``."""
  return -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12, 1.0)), axis=1)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
  """P(score of a positive > score of a negative) (ties count half): Mann-Whitney AUROC."""
  neg, pos = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
  if neg.size == 0 or pos.size == 0:
    return float("nan")
  ranks = np.concatenate([neg, pos]).argsort(kind="stable").argsort(kind="stable") + 1.0
  # Average ranks over ties.
  allv = np.concatenate([neg, pos])
  for v in np.unique(allv):
    idx = allv == v
    if idx.sum() > 1:
      ranks[idx] = ranks[idx].mean()
  r_pos = ranks[neg.size:].sum()
  return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def evaluate(probs: jax.Array, labels: np.ndarray, ood_probs: dict[str, jax.Array],
             num_bins: int) -> dict:
  """Accuracy, NLL, ECE and entropy statistics of predictive probabilities."""
  probs = jnp.asarray(probs)
  labels_j = jnp.asarray(labels)
  correct = np.asarray(jnp.argmax(probs, axis=1) == labels_j)
  nll = -jnp.mean(jnp.log(jnp.clip(probs[jnp.arange(len(labels)), labels_j], 1e-12, 1.0)))
  ent = np.asarray(entropy(probs))
  out = {"accuracy": float(correct.mean()), "nll": float(nll),
         "ece": float(vi.expected_calibration_error(probs, labels_j, num_bins)),
         "entropy_correct": float(ent[correct].mean()),
         "entropy_wrong": float(ent[~correct].mean()) if (~correct).any() else float("nan"),
         "auroc_wrong_vs_correct": auroc(ent[correct], ent[~correct])}
  for name, p in ood_probs.items():
    e = np.asarray(entropy(p))
    out[f"entropy_{name}"] = float(e.mean())
    out[f"auroc_{name}_vs_test"] = auroc(ent, e)
  return out


def ood_inputs(x_test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
  """Out-of-distribution inputs: uniform-noise images and inverted test digits."""
  rng = np.random.default_rng(seed)
  return {"noise": rng.uniform(0, 1, x_test.shape).astype(np.float32),
          "inverted": (1.0 - x_test).astype(np.float32)}


def _plot(results, curves, bins, config, path):
  import matplotlib  # local: plotting only
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
  for j, name in enumerate(("vi", "map")):
    ax = axes[0, j]
    b = bins[name]
    centers = 0.5 * (b["edges"][1:] + b["edges"][:-1])
    mask = b["count"] > 0
    ax.bar(centers[mask], b["accuracy"][mask], width=1.0 / len(centers), edgecolor="k",
           alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(centers[mask], b["confidence"][mask], "r.", label="mean confidence")
    ax.set_title(f"{name.upper()}: reliability, ECE={results[name]['ece']:.3f}, "
                 f"acc={results[name]['accuracy']:.3f}", fontsize=9)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
  ax = axes[0, 2]
  steps = [c["step"] for c in curves]
  ax.plot(steps, [c["vi_val_accuracy"] for c in curves], label="VI val acc")
  ax.plot(steps, [c["map_val_accuracy"] for c in curves], label="MAP val acc")
  ax.set_xlabel("step")
  ax.set_ylabel("validation accuracy")
  ax2 = ax.twinx()
  ax2.plot(steps, [c["elbo_per_datum"] for c in curves], "g:", label="ELBO / datum")
  ax2.set_ylabel("ELBO / datum (VI)")
  ax.legend(loc="lower right", fontsize=8)
  for j, name in enumerate(("vi", "map")):
    ax = axes[1, j]
    ent = results[name]["_entropies"]
    hist_bins = np.linspace(0, np.log(10), 30)
    for key, lab in (("correct", "test, correct"), ("wrong", "test, misclassified"),
                     ("noise", "OOD: noise"), ("inverted", "OOD: inverted")):
      if len(ent[key]):
        ax.hist(ent[key], bins=hist_bins, density=True, histtype="step", lw=1.5, label=lab)
    ax.set_title(f"{name.upper()}: predictive entropy", fontsize=9)
    ax.set_xlabel("entropy [nats]")
    ax.legend(fontsize=8)
  ax = axes[1, 2]
  keys = ["ece", "nll", "auroc_wrong_vs_correct", "auroc_noise_vs_test",
          "auroc_inverted_vs_test"]
  xs = np.arange(len(keys))
  ax.bar(xs - 0.2, [results["vi"][k] for k in keys], 0.4, label="VI")
  ax.bar(xs + 0.2, [results["map"][k] for k in keys], 0.4, label="MAP")
  ax.set_xticks(xs, ["ECE", "NLL", "AUROC\nwrong", "AUROC\nnoise", "AUROC\ninverted"],
                fontsize=8)
  ax.legend(fontsize=8)
  fig.suptitle(f"Bayesian MLP {config.widths} on digits: mean-field VI vs MAP")
  fig.tight_layout()
  return save_figure(fig, path)


def run(config, workdir: str) -> dict:
  """Trains VI and MAP, evaluates both; returns the comparison (also written to metrics)."""
  os.makedirs(workdir, exist_ok=True)
  writer = MetricWriter(workdir)
  data = load_digits(seed=config.seed)
  train, val, test = data.train, data.val, data.test
  model = MLP(input_dim=train.x.shape[1], widths=tuple(config.widths),
              num_outputs=data.num_classes, activation=config.activation)
  key = jax.random.PRNGKey(config.seed)
  key, init_key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, train.x.shape[1]), jnp.float32))["params"]

  def apply(p, x):
    return model.apply({"params": p}, x)

  def log_likelihood(p, batch):
    x, y = batch
    logp = jax.nn.log_softmax(apply(p, x))
    return jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

  num_data = len(train)
  optimizer = optax.adam(config.learning_rate)
  algo = vi.meanfield_vi(log_likelihood, optimizer, num_data=num_data,
                         prior_std=config.prior_std, init_std=config.init_std,
                         num_samples=config.train_samples)
  vi_state = algo.init(params)
  vi_step = jax.jit(algo.step)

  # MAP: the same log joint (likelihood + Gaussian prior), per datum, same optimizer.
  def map_loss(p, batch):
    prior = sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p)) / (2 * config.prior_std**2)
    return -jnp.mean(log_likelihood(p, batch)) + prior / num_data

  @jax.jit
  def map_step(p, opt_state, batch):
    grads = jax.grad(map_loss)(p, batch)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes float and int32 counters
      updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  map_params = params
  with jax.numpy_dtype_promotion("standard"):
    map_opt = optimizer.init(map_params)

  @jax.jit
  def vi_predict(state, k, x):
    samples = algo.sample(k, state, config.predict_samples)
    return jnp.mean(jax.vmap(lambda p: jax.nn.softmax(apply(p, x)))(samples), axis=0)

  @jax.jit
  def map_predict(p, x):
    return jax.nn.softmax(apply(p, x))

  def accuracy(probs, y):
    return float(np.mean(np.asarray(jnp.argmax(probs, axis=1)) == y))

  progress = Progress(config.steps, name="bayes_mlp")
  curves = []
  stream = batches(train, config.batch_size, seed=config.seed)
  for step in range(1, config.steps + 1):
    b = next(stream)
    batch = (jnp.asarray(b.x), jnp.asarray(b.y))
    key, k_step = jax.random.split(key)
    vi_state, info = vi_step(k_step, vi_state, batch)
    map_params, map_opt = map_step(map_params, map_opt, batch)
    if step % config.eval_every == 0 or step == config.steps:
      key, k_eval = jax.random.split(key)
      rec = {"step": step, "elbo_per_datum": float(info.elbo) / num_data,
             "kl_per_datum": float(info.kl) / num_data,
             "vi_val_accuracy": accuracy(vi_predict(vi_state, k_eval, val.x), val.y),
             "map_val_accuracy": accuracy(map_predict(map_params, val.x), val.y)}
      writer.write(rec)
      curves.append(rec)
      progress.update(step, elbo=rec["elbo_per_datum"], vi_val=rec["vi_val_accuracy"],
                      map_val=rec["map_val_accuracy"])

  ood = ood_inputs(test.x, config.seed)
  key, k_test, *k_ood = jax.random.split(key, 2 + len(ood))
  probs = {"vi": vi_predict(vi_state, k_test, test.x), "map": map_predict(map_params, test.x)}
  ood_probs = {"vi": {n: vi_predict(vi_state, k, x) for (n, x), k in zip(ood.items(), k_ood)},
               "map": {n: map_predict(map_params, x) for n, x in ood.items()}}
  results, bins = {}, {}
  for name in ("vi", "map"):
    results[name] = evaluate(probs[name], test.y, ood_probs[name], config.ece_bins)
    ent = np.asarray(entropy(probs[name]))
    correct = np.asarray(jnp.argmax(probs[name], axis=1)) == test.y
    results[name]["_entropies"] = {"correct": ent[correct], "wrong": ent[~correct],
                                   **{n: np.asarray(entropy(p))
                                      for n, p in ood_probs[name].items()}}
    bins[name] = {k: np.asarray(v) for k, v in vi.reliability_bins(
        probs[name], jnp.asarray(test.y), config.ece_bins)._asdict().items()}
  plot = _plot(results, curves, bins, config, os.path.join(workdir, "bayes_mlp.png"))
  for name in results:
    results[name].pop("_entropies")
  rows = [{"model": n.upper(), **{k: v for k, v in r.items()}} for n, r in results.items()]
  print(format_table(rows, ["model", "accuracy", "nll", "ece", "entropy_correct",
                            "entropy_wrong", "entropy_noise", "entropy_inverted",
                            "auroc_wrong_vs_correct", "auroc_noise_vs_test",
                            "auroc_inverted_vs_test"]))
  summary = {"summary": True, "vi": results["vi"], "map": results["map"], "plot": plot,
             "final_elbo_per_datum": curves[-1]["elbo_per_datum"]}
  writer.write(summary)
  logging.info("test ECE: VI %.4f vs MAP %.4f; accuracy VI %.4f vs MAP %.4f",
               results["vi"]["ece"], results["map"]["ece"], results["vi"]["accuracy"],
               results["map"]["accuracy"])
  return summary


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests and notebooks can import run() next to
  # other experiment modules without duplicate-flag errors.
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", default=_DEFAULT_CONFIG,
                                  help_string="ml_collections config file (optionally :quick).")
  flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and the plot.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
