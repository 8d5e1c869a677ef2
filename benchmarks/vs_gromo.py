r"""growjax growth vs GroMo (PyTorch): the same MLP growth task on digits, in the same run.

The task of issue 3: a 64→4→4→10 ReLU MLP on ``growjax.data.load_digits`` grows for 5 rounds,
each round adding up to 4 neurons at one of its two hidden layers, with statistics on 1,024
training samples. Both frameworks start from the same weights (growjax's seed initialisation
copied into GroMo's ``GrowingMLP``), see the same statistics batches and train between rounds with
the same Adam steps on the same minibatches (fresh Adam state after every growth in both).

* growjax: ``growjax.grow.grow_round`` with ``method="gn"``, ``ks=(1, 2, 4)`` — the
  Gauss-Newton-learned morphisms of Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855) — in
  two configurations: ``gn``, the fast mode for small dense networks (``grow_config``: exact GN
  fan-out by a dense solve on per-example u-space curvature, fan-in from the GN-metric SVD with
  ``--psi_steps`` Adam refinements, network padded to ``--width_bucket`` so that compiled
  functions survive growth, statistics and both sites' learners in one compiled call), and
  ``gn_default``, the library defaults (CG fan-out, 20 Adam fan-in steps); both with the
  library's 7-point line search on the fan-out scale. As a like-for-like check, growjax's
  TINY-style method (``tiny``).
* GroMo: TINY (Verbockhaven, Rudkiewicz, Chevallier & Charpiat 2024, arXiv:2405.19816), GroMo's
  own implementation: ``init_computation`` → forward/backward on the statistics batch →
  ``update_computation`` → ``compute_optimal_updates(maximum_added_neurons=4, <TINY preset>)``
  → ``select_best_update`` → line search with ``gromo.utils.utils.line_search`` (its own: a
  log-spaced scan of the scaling factor, extended by decades while the loss decreases) →
  ``apply_change``. The TINY preset is the one GroMo's ``compute_optimal_updates`` docstring
  gives to reproduce the paper (``compute_delta=False``: only new neurons, like growjax). The
  library default (``compute_delta=True``, which also moves the existing consumer weights, so
  part of its loss decrease costs no added parameter) is reported beside it.

Reported: wall time per growth step (statistics + solve + apply, and with the line search) as
growjax/GroMo ratios; for growjax cold (first pass: XLA compilation included, one compile per new
network config), warm (the same growth sequence replayed in the same process, every config
compiled) and the compile time itself (JAX's own compile-event durations during each step);
GroMo's line search and, for a like-for-like cost, GroMo evaluating growjax's 7-point grid on
the same step; realised loss decrease per added parameter (statistics batch and validation set);
validation accuracy against parameter count after the rounds. ``--cache_probe`` runs growjax's
cold pass in two fresh processes sharing JAX's persistent compilation cache.

Repetitions interleave the frameworks (GroMo, growjax GN, growjax TINY, rotating); times are
medians over rounds and repetitions. The process is pinned to one CPU and torch to one thread
(both frameworks then use one core of this shared 2-core machine).

Run: ``python benchmarks/vs_gromo.py`` (about 5 minutes on the 2-core CPU machine, including
the cache probe; ``--quick`` for a smoke run). Writes ``benchmarks/results/vs_gromo.json``.
Needs the bench extra: ``torch==2.13.0`` (CPU wheel) and ``gromo``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from growjax import grow, train, tree  # noqa: E402
from growjax.data import Dataset, batches, load_digits  # noqa: E402
from growjax.nets import MLP  # noqa: E402
from growjax.nets.common import host_init  # noqa: E402
from growjax.train.metrics import format_table  # noqa: E402

# Effective fan-out scales of growjax's default line search (GrowConfig.gammas).
GAMMAS = grow.GrowConfig().gammas
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = collections.defaultdict(float)


def _on_duration(event: str, duration: float, **_):
  if event in _COMPILE_EVENTS:
    _compile_seconds[event] += duration


def compile_total() -> float:
  """Seconds JAX has spent tracing, lowering and compiling jitted functions so far."""
  return float(sum(_compile_seconds.values()))


def xla_compile_total() -> float:
  """Seconds of XLA backend compilation so far (what the persistent cache can save)."""
  return float(_compile_seconds[_COMPILE_EVENTS[-1]])


# ---- shared protocol -----------------------------------------------------------------------------

def stats_batch(splits, round_: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The statistics batch of a round (the same indices for both frameworks)."""
  gen = np.random.default_rng(seed * 1000 + round_)
  idx = gen.choice(len(splits.train), min(size, len(splits.train)), replace=False)
  return splits.train.x[idx], splits.train.y[idx]


def phase_batches(splits, phase: int, steps: int, batch_size: int, seed: int):
  """The minibatches of training phase ``phase`` (0: before the first growth)."""
  it = batches(splits.train, batch_size, seed=seed * 1000 + 500 + phase)
  return [next(it) for _ in range(steps)]


# ---- growjax ------------------------------------------------------------------------------------

class TimedSearcher(grow.Searcher):
  """``growjax.grow.Searcher`` that accumulates wall time per stage of ``grow_round``.

  Each stage blocks on its device results, so the time is the stage's own (``grow_round`` would
  wait for the same values a moment later when it reads them on the host).
  """

  def __init__(self, loss, config):
    super().__init__(loss, config)
    self.seconds = collections.defaultdict(float)
    self._depth = 0

  def _timed(self, stage, fn, *args, **kwargs):
    self._depth += 1
    t0 = time.perf_counter()
    try:
      out = jax.block_until_ready(fn(*args, **kwargs))
    finally:
      self._depth -= 1
    if self._depth == 0:  # nested calls (re-solves) are inside their caller's time
      self.seconds[stage] += time.perf_counter() - t0
    return out

  def stats(self, *args, **kwargs):
    return self._timed("stats", super().stats, *args, **kwargs)

  def candidates(self, *args, **kwargs):
    return self._timed("solve", super().candidates, *args, **kwargs)

  def real_losses(self, *args, **kwargs):
    return self._timed("line_search", super().real_losses, *args, **kwargs)

  def fused_candidates(self, *args, **kwargs):  # statistics included (one compiled call)
    return self._timed("solve", super().fused_candidates, *args, **kwargs)


def growjax_run(method: str, searcher: TimedSearcher, trainer, splits, init_vars, args) -> dict:
  """One growth trajectory with growjax; per-round records and the final network."""
  model = MLP(input_dim=64, widths=tuple(args.widths), num_outputs=10, activation="relu")
  variables = init_vars
  state = train.create_state(variables, trainer.tx, args.seed)
  eval_step = trainer.eval_step

  def fit(state, phase, steps):
    for b in phase_batches(splits, phase, steps, args.batch_size, args.seed):
      state, _ = trainer.train_step(model, state, (b.x, b.y))
    return jax.block_until_ready(state)

  def loss_on(model, state, x, y):
    return train.evaluate(eval_step, model, state, Dataset(x, y), batch_size=len(x))

  state = fit(state, 0, args.warmup_steps)
  val = train.evaluate(eval_step, model, state, splits.val)
  seed = {"params": tree.count(state.params), "val_accuracy": val["accuracy"],
          "val_loss": val["loss"]}
  damping = searcher.config.damping
  key = jax.random.key(args.seed)
  rounds = []
  for r in range(args.rounds):
    x, y = stats_batch(splits, r, args.stats_batch, args.seed)
    before = loss_on(model, state, x, y)["loss"]
    val_before = train.evaluate(eval_step, model, state, splits.val)["loss"]
    params_before = tree.count(state.params)
    searcher.seconds.clear()
    c0, x0 = compile_total(), xla_compile_total()
    t0 = time.perf_counter()
    res = grow.grow_round(searcher, model, state.variables(), x, y, damping=damping,
                          rng=jax.random.fold_in(key, r))
    res = res._replace(variables=jax.block_until_ready(res.variables))
    total = time.perf_counter() - t0
    compile_s, xla_s = compile_total() - c0, xla_compile_total() - x0
    damping = res.damping
    applied = [rec for rec in res.records if rec["op"] != "rejected"]
    model = res.model
    state = train.create_state(res.variables, trainer.tx, args.seed)  # fresh Adam, as GroMo's
    after = loss_on(model, state, x, y)["loss"]
    val_after = train.evaluate(eval_step, model, state, splits.val)["loss"]
    ls = searcher.seconds["line_search"]
    rec = {"round": r + 1, "site": ",".join(f"{a['site']}+{a['k']}" for a in applied) or "-",
           "gamma": applied[0]["gamma"] if applied else float("nan"),
           "params_before": params_before, "params_after": tree.count(state.params),
           "loss_before": before, "loss_after": after, "val_loss_before": val_before,
           "val_loss_after": val_after, "predicted": sum(a["predicted"] for a in applied),
           "step_s": total - ls, "step_ls_s": total, "line_search_s": ls,
           "stats_s": searcher.seconds["stats"], "solve_s": searcher.seconds["solve"],
           "apply_s": total - ls - searcher.seconds["stats"] - searcher.seconds["solve"],
           "compile_s": compile_s, "xla_compile_s": xla_s}
    state = fit(state, r + 1, args.train_steps)
    val = train.evaluate(eval_step, model, state, splits.val)
    rec.update({"params_trained": tree.count(state.params), "val_accuracy": val["accuracy"],
                "val_loss": val["loss"]})
    rounds.append(rec)
  return {"framework": "growjax", "method": method, "widths": list(model.widths), "seed": seed,
          "rounds": rounds}


# ---- GroMo --------------------------------------------------------------------------------------

def gromo_model(init_vars, widths):
  """GroMo's ``GrowingMLP`` with growjax's seed weights (flax ``[in, out]`` → torch
  ``[out, in]``)."""
  import torch  # pylint: disable=import-outside-toplevel  (bench extra)
  from gromo.containers.growing_mlp import GrowingMLP  # pylint: disable=import-outside-toplevel

  if len(set(widths)) != 1:
    raise ValueError(f"GroMo's GrowingMLP has one hidden size for all layers; got {widths}.")
  model = GrowingMLP(64, 10, hidden_size=widths[0], number_hidden_layers=len(widths),
                     activation=torch.nn.ReLU())
  params = init_vars["params"]
  names = [f"hidden_{i}" for i in range(len(widths))] + ["head"]
  with torch.no_grad():
    for layer, name in zip(model.layers, names):
      layer.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
      layer.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"]).copy()))
  return model


def gromo_run(method: str, splits, init_vars, args) -> dict:
  """One growth trajectory with GroMo (``method``: ``"tiny"`` preset or ``"tiny+delta"``)."""
  import torch  # pylint: disable=import-outside-toplevel
  from gromo.utils.utils import line_search  # pylint: disable=import-outside-toplevel

  f = torch.nn.functional
  model = gromo_model(init_vars, args.widths)
  compute_delta = method == "tiny+delta"
  sum_loss = torch.nn.CrossEntropyLoss(reduction="sum")  # GroMo averages in its statistics

  def count():
    return sum(p.numel() for p in model.parameters())

  def fit(phase, steps):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # fresh state after every growth
    model.train()
    for b in phase_batches(splits, phase, steps, args.batch_size, args.seed):
      opt.zero_grad()
      loss = f.cross_entropy(model(torch.from_numpy(b.x)), torch.from_numpy(b.y).long())
      loss.backward()
      opt.step()

  @torch.no_grad()
  def evaluate(x, y, extended=False):
    model.eval()
    out = model.extended_forward(x) if extended else model(x)
    return f.cross_entropy(out, y).item(), (out.argmax(-1) == y).float().mean().item()

  xv, yv = torch.from_numpy(splits.val.x), torch.from_numpy(splits.val.y).long()
  fit(0, args.warmup_steps)
  val_loss, val_acc = evaluate(xv, yv)
  seed = {"params": count(), "val_accuracy": val_acc, "val_loss": val_loss}
  rounds = []
  for r in range(args.rounds):
    xn, yn = stats_batch(splits, r, args.stats_batch, args.seed)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn).long()
    before, _ = evaluate(x, y)
    val_before, _ = evaluate(xv, yv)
    params_before = count()
    model.eval()
    t0 = time.perf_counter()
    model.init_computation()
    model.zero_grad()
    sum_loss(model(x), y).backward()
    model.update_computation()
    t1 = time.perf_counter()
    model.compute_optimal_updates(maximum_added_neurons=args.k_max, compute_delta=compute_delta,
                                  use_covariance=True, alpha_zero=False, omega_zero=False,
                                  use_projection=True, ignore_singular_values=False)
    model.reset_computation()
    layer = model.select_best_update()
    t2 = time.perf_counter()
    # Like-for-like line-search cost: growjax's 7 effective scales (GroMo scales both the fan-in
    # and the fan-out by the factor, so the effective scale of the new neurons is its square).
    for g in np.sqrt(GAMMAS):
      model.set_scaling_factor(float(g))
      evaluate(x, y, extended=True)
    t3 = time.perf_counter()

    def cost(factor):
      model.set_scaling_factor(float(factor))
      return evaluate(x, y, extended=True)[0]

    factor, _ = line_search(cost)
    t4 = time.perf_counter()
    k = int(model.currently_updated_layer.eigenvalues_extension.shape[0])
    model.set_scaling_factor(float(factor))
    model.apply_change()
    t5 = time.perf_counter()
    stats_s, solve_s, grid_s, ls_s, apply_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4
    after, _ = evaluate(x, y)
    val_after, _ = evaluate(xv, yv)
    rec = {"round": r + 1, "site": f"hidden_{layer}+{k}", "gamma": float(factor) ** 2,
           "params_before": params_before, "params_after": count(), "loss_before": before,
           "loss_after": after, "val_loss_before": val_before, "val_loss_after": val_after,
           "step_s": stats_s + solve_s + apply_s, "step_ls_s": stats_s + solve_s + apply_s + ls_s,
           "line_search_s": ls_s, "grid7_s": grid_s, "stats_s": stats_s, "solve_s": solve_s,
           "apply_s": apply_s, "compile_s": 0.0, "xla_compile_s": 0.0}
    fit(r + 1, args.train_steps)
    val_loss, val_acc = evaluate(xv, yv)
    rec.update({"params_trained": count(), "val_accuracy": val_acc, "val_loss": val_loss})
    rounds.append(rec)
  widths = [int(l.out_features) for l in model.layers[:-1]]
  return {"framework": "gromo", "method": method, "widths": widths, "seed": seed,
          "rounds": rounds}


# ---- summaries ----------------------------------------------------------------------------------

def quality(run: dict) -> dict:
  """Loss decrease per added parameter and the final (params, validation accuracy)."""
  rs = run["rounds"]
  added = sum(r["params_after"] - r["params_before"] for r in rs)
  dec = sum(r["loss_before"] - r["loss_after"] for r in rs)
  vdec = sum(r["val_loss_before"] - r["val_loss_after"] for r in rs)
  per_round = [(r["loss_before"] - r["loss_after"]) / max(r["params_after"] - r["params_before"], 1)
               for r in rs]
  return {"params": rs[-1]["params_trained"], "widths": run["widths"],
          "val_accuracy": rs[-1]["val_accuracy"], "val_loss": rs[-1]["val_loss"],
          "added_params": added, "loss_decrease": dec, "val_loss_decrease": vdec,
          "decrease_per_param": dec / max(added, 1), "val_decrease_per_param": vdec / max(added, 1),
          "median_round_decrease_per_param": float(np.median(per_round)),
          "sites": [r["site"] for r in rs], "gammas": [r["gamma"] for r in rs],
          "curve": [{"params": run["seed"]["params"], "val_accuracy": run["seed"]["val_accuracy"]}]
                   + [{"params": r["params_trained"], "val_accuracy": r["val_accuracy"]}
                      for r in rs]}


def accuracy_at(curve: list[dict], params: int) -> float:
  """Validation accuracy of a growth curve at ``params`` (linear between its points; NaN
  outside its range)."""
  ps = [pt["params"] for pt in curve]
  if not ps[0] <= params <= ps[-1]:
    return float("nan")
  return float(np.interp(params, ps, [pt["val_accuracy"] for pt in curve]))


def headline(summary: dict, base: str = "gromo tiny") -> dict:
  """The issue's figures as ratios against GroMo's TINY measured in the same run."""
  if base not in summary:
    return {}
  b = summary[base]
  out = {}
  for name, s in summary.items():
    if not name.startswith("growjax"):
      continue
    q, bq = s["quality"], b["quality"]
    out[name] = {
        "warm_step_over_gromo": s["warm"]["step_s"] / b["all"]["step_s"],
        "warm_step_ls_over_gromo_step_ls": s["warm"]["step_ls_s"] / b["all"]["step_ls_s"],
        "warm_step_ls_over_gromo_step_grid7": s["warm"]["step_ls_s"] / (
            b["all"]["step_s"] + b["all"]["grid7_s"]),
        "cold_step_over_gromo": s["cold"]["step_s"] / b["all"]["step_s"],
        "cold_step_ls_over_gromo_step_ls": s["cold"]["step_ls_s"] / b["all"]["step_ls_s"],
        "decrease_per_param_over_gromo": q["decrease_per_param"] / bq["decrease_per_param"],
        "val_decrease_per_param_over_gromo": q["val_decrease_per_param"]
                                             / bq["val_decrease_per_param"],
        "params": q["params"], "val_accuracy": q["val_accuracy"],
        "gromo_val_accuracy_at_same_params": accuracy_at(bq["curve"], q["params"]),
    }
  return out


def median_of(runs: list[dict], key: str) -> float:
  return float(np.median([r[key] for run in runs for r in run["rounds"]]))


def summarise(runs: dict[str, list[dict]]) -> dict:
  """Median per-step stage times per variant over rounds and repetitions (cold = first rep)."""
  keys = ("step_s", "step_ls_s", "stats_s", "solve_s", "apply_s", "line_search_s", "grid7_s",
          "compile_s", "xla_compile_s")
  out = {}
  for name, reps in runs.items():
    s = {}
    groups = {"all": reps}
    if name.startswith("growjax"):
      # warm: the replays (with --reps=1 there is none and "warm" repeats the cold pass).
      groups = {"cold": reps[:1], "warm": reps[1:] or reps[:1]}
    for g, rs in groups.items():
      s[g] = {k: median_of(rs, k) for k in keys if k in rs[0]["rounds"][0]}
      s[g]["total_step_ls_s"] = float(np.median([sum(r["step_ls_s"] for r in run["rounds"])
                                                 for run in rs]))
    s["quality"] = quality(reps[-1])
    first = [r["site"] for r in reps[0]["rounds"]]
    s["deterministic_across_reps"] = all([r["site"] for r in run["rounds"]] == first
                                         for run in reps)
    out[name] = s
  return out


# ---- persistent compilation cache probe ---------------------------------------------------------

def cache_probe(args) -> dict:
  """growjax GN's cold pass in two fresh processes sharing a persistent compilation cache."""
  out = {}
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as tmp:
    for i in (1, 2):
      path = os.path.join(tmp, f"child{i}.json")
      cmd = [sys.executable, os.path.abspath(__file__), "--child", "--reps=1", "--methods=gn",
             "--no_gromo", f"--cache_dir={cache}", f"--out={path}", f"--pin_cpu={args.pin_cpu}",
             f"--rounds={args.rounds}", f"--warmup_steps={args.warmup_steps}",
             f"--train_steps={args.train_steps}"]
      t0 = time.perf_counter()
      subprocess.run(cmd, check=True, capture_output=True, text=True)
      wall = time.perf_counter() - t0
      with open(path, encoding="utf-8") as fh:
        child = json.load(fh)
      cold = child["summary"]["growjax gn"]["cold"]
      files = sum(len(fs) for _, _, fs in os.walk(cache))
      out[f"process_{i}"] = {"step_s": cold["step_s"], "step_ls_s": cold["step_ls_s"],
                             "compile_s": cold["compile_s"], "xla_compile_s": cold["xla_compile_s"],
                             "process_wall_s": wall, "cache_files": files}
  return out


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="4,4")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--k_max", type=int, default=4)
  parser.add_argument("--stats_batch", type=int, default=1024)
  parser.add_argument("--warmup_steps", type=int, default=300, help="Adam steps before round 1")
  parser.add_argument("--train_steps", type=int, default=150, help="Adam steps after each round")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--reps", type=int, default=3, help="repetitions (growjax: 1 cold + warm)")
  parser.add_argument("--methods", default="gn,gn_default,tiny",
                      help="growjax variants (gn: fast GN mode; gn_default: library defaults)")
  parser.add_argument("--width_bucket", type=int, default=16, help="gn: GrowConfig.width_bucket")
  parser.add_argument("--psi_steps", type=int, default=0, help="gn: Adam steps on the fan-in")
  parser.add_argument("--psi_lr", type=float, default=0.1, help="gn: their learning rate")
  parser.add_argument("--fused", type=int, default=1,
                      help="gn: GrowConfig.fused (statistics + learners in one call; its time "
                           "is reported as solve, stats 0)")
  parser.add_argument("--gromo_methods", default="tiny,tiny+delta")
  parser.add_argument("--no_gromo", action="store_true")
  parser.add_argument("--cache_probe", type=int, default=1, help="run the cache probe (0/1)")
  parser.add_argument("--cache_dir", default="", help="JAX persistent compilation cache")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pin_cpu", type=int, default=0, help="-1: no pinning")
  parser.add_argument("--quick", action="store_true", help="smoke run (no JSON written)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "vs_gromo.json"))
  args = parser.parse_args(argv)
  args.widths = [int(w) for w in args.widths.split(",")]
  if args.quick:
    args.rounds, args.warmup_steps, args.train_steps = 2, 50, 20
    args.reps = min(args.reps, 2)
    args.cache_probe = 0
  if args.pin_cpu >= 0 and hasattr(os, "sched_setaffinity"):
    # Before JAX/torch start worker threads (they inherit it): both frameworks on one core.
    os.sched_setaffinity(0, {args.pin_cpu})
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  if not args.no_gromo:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", module="gromo")  # pseudo-inverse notices

  splits = load_digits(seed=args.seed)
  seed_model = MLP(input_dim=64, widths=tuple(args.widths), num_outputs=10, activation="relu")
  init_vars = jax.device_get(host_init(seed_model, jax.random.key(args.seed)))
  trainer = train.make_trainer(optax.adam(args.lr), "softmax_cross_entropy")
  methods = [m for m in args.methods.split(",") if m]
  searchers = {m: TimedSearcher("softmax_cross_entropy", grow_config(m, args)) for m in methods}
  variants = [] if args.no_gromo else [("gromo", m) for m in args.gromo_methods.split(",") if m]
  variants += [("growjax", m) for m in methods]
  runs: dict[str, list[dict]] = {f"{fw} {m}": [] for fw, m in variants}
  for rep in range(args.reps):
    order = variants[rep % len(variants):] + variants[:rep % len(variants)]
    for fw, m in order:
      t0 = time.perf_counter()
      if fw == "gromo":
        run = gromo_run(m, splits, init_vars, args)
      else:
        run = growjax_run(m, searchers[m], trainer, splits, init_vars, args)
      runs[f"{fw} {m}"].append(run)
      print(f"rep {rep} {fw} {m}: {time.perf_counter() - t0:.1f}s "
            f"({run['rounds'][-1]['params_trained']} params, "
            f"val acc {run['rounds'][-1]['val_accuracy']:.3f})", flush=True)
  summary = summarise(runs)
  result = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "gammas": list(GAMMAS), "headline": headline(summary), "summary": summary,
            "runs": runs,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "jax": jax.__version__, "cpu_affinity": sorted(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else None}}
  if args.child:
    with open(args.out, "w", encoding="utf-8") as fh:
      json.dump(result, fh, default=float)
    return result
  if not args.no_gromo:
    import gromo  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    result["machine"].update({"torch": torch.__version__,
                              "gromo": getattr(gromo, "__version__", _version("gromo"))})
  report(result)
  if args.cache_probe:
    result["cache_probe"] = cache_probe(args)
    print("\nPersistent compilation cache (growjax GN cold pass, two fresh processes):")
    print(format_table([{"process": k, **v} for k, v in result["cache_probe"].items()]))
  if not args.quick:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
      json.dump(result, fh, indent=1, default=float)
    print(f"\nwrote {args.out}")
  return result


def grow_config(method: str, args) -> grow.GrowConfig:
  """growjax's configuration of a variant.

  ``gn``: the fast Gauss-Newton mode for small dense networks — exact GN fan-out by a dense
  solve on per-example u-space curvature, fan-in started from the GN-metric SVD and refined by
  ``--psi_steps`` Adam steps, all on a network padded to ``--width_bucket`` (compiled functions
  reused across growth steps). ``gn_default``: the library defaults (CG fan-out, 20 Adam fan-in
  steps from a random start, no padding). ``tiny`` and others: library defaults of that method.
  """
  ks = _ks(args.k_max)
  if method == "gn":
    learn = grow.LearnConfig(fan_out_solver="dense", psi_init="svd", psi_steps=args.psi_steps,
                             psi_lr=args.psi_lr)
    return grow.GrowConfig(method="gn", ks=ks, width_bucket=args.width_bucket,
                           fused=bool(args.fused), learn=learn)
  if method == "gn_default":
    return grow.GrowConfig(method="gn", ks=ks)
  return grow.GrowConfig(method=method, ks=ks)


def _ks(k_max: int) -> tuple[int, ...]:
  """Candidate sizes up to ``k_max`` (1, 2, 4, ...: growjax's default ladder, cut at k_max)."""
  return tuple(k for k in (1, 2, 4, 8, 16, 32) if k <= k_max)


def _version(name: str) -> str:
  from importlib.metadata import version  # pylint: disable=import-outside-toplevel
  return version(name)


def report(result: dict) -> None:
  """Prints the timing and quality tables."""
  summary = result["summary"]
  base = summary.get("gromo tiny", {}).get("all")
  rows = []
  for name, s in summary.items():
    for g in ("all", "cold", "warm"):
      if g not in s:
        continue
      t = s[g]
      row = {"variant": name, "pass": g, "step ms": 1e3 * t["step_s"],
             "+line search ms": 1e3 * t["step_ls_s"], "stats": 1e3 * t["stats_s"],
             "solve": 1e3 * t["solve_s"], "apply": 1e3 * t["apply_s"],
             "line search": 1e3 * t["line_search_s"], "jax trace+compile": 1e3 * t["compile_s"],
             "xla compile": 1e3 * t["xla_compile_s"]}
      if base is not None:
        row["step / GroMo"] = t["step_s"] / base["step_s"]
        row["+ls / GroMo"] = t["step_ls_s"] / base["step_ls_s"]
      rows.append(row)
  print("\nWall time per growth step (medians over rounds and repetitions, ms):")
  print(format_table(rows))
  if base is not None:
    print(f"GroMo evaluating growjax's 7-point grid instead of its own line search: "
          f"{1e3 * base['grid7_s']:.2f} ms per step.")
  qrows = []
  for name, s in summary.items():
    q = s["quality"]
    qrows.append({"variant": name, "params": q["params"], "widths": "-".join(map(str, q["widths"])),
                  "val acc": q["val_accuracy"], "val loss": q["val_loss"],
                  "added": q["added_params"], "dL/param": q["decrease_per_param"],
                  "val dL/param": q["val_decrease_per_param"],
                  "median round dL/param": q["median_round_decrease_per_param"],
                  "sites": " ".join(q["sites"])})
  print("\nQuality after the rounds (loss decrease per added parameter on the statistics batch "
        "and on the validation set, nats):")
  print(format_table(qrows))
  curves = []
  for name, s in summary.items():
    for i, pt in enumerate(s["quality"]["curve"]):
      curves.append({"variant": name, "round": i, **pt})
  print("\nValidation accuracy vs parameters (round 0: the seed after warm-up training; then "
        "after the training that follows each round):")
  print(format_table(curves))
  if result["headline"]:
    print("\nAgainst GroMo's TINY in this run (ratios growjax / GroMo):")
    names = list(result["headline"])
    print(format_table([{"figure": f, **{n: result["headline"][n][f] for n in names}}
                        for f in result["headline"][names[0]]]))


if __name__ == "__main__":
  main()
