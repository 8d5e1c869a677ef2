"""Train-step throughput: growjax's jitted step vs a hand-written flax + optax step, same run.

growjax side: ``jax.jit(growjax.train.make_train_step(tx), static_argnums=0,
donate_argnums=(1,))``, exactly what ``growjax.train.make_trainer`` builds, called as
``state, metrics = step(model, state, (x, y))``. Baseline: the most direct code a user writes,
``@jax.jit def step(params, batch_stats, opt_state, x, y)`` with ``model.apply`` (BatchNorm
statistics as a mutable collection), ``optax.softmax_cross_entropy_with_integer_labels`` and
``optax.adam``, donating params, statistics and optimizer state. Same flax module, same initial
variables, same optimizer (Adam, lr 1e-3), same float32 device-resident digits batches.

Each case alternates repetitions of N steps of the two (the first of the pair alternates too)
and reports medians of steps/s. The headline ratio is growjax's speed over the hand-written
step's, the median over repetitions of the ratio within each adjacent pair (robust to the load
drifting on this shared machine; >= 0.95 means growjax adds no measurable overhead); the ratios
of the two medians, of the two fastest repetitions and of process CPU times are reported beside.
A parity check runs both from the same variables on the same batches and reports the largest
parameter difference. With ``--ablate`` a second interleaved run attributes the difference.

Models (digits, 10 classes): MLP 64-256-256-10 and ConvNet (VGG-style, BatchNorm, channels
(32, 64), 8x8x1 inputs) at several batch sizes, and the 64-8-8-10 MLP that the growth
experiments start from, whose step is dominated by fixed per-call costs. ``--ablate`` (on by
default) attributes growjax's extra work on that seed MLP and on the big MLP: each variant is the
hand-written step plus ONE thing growjax's step does (rng split and a dropout key passed to
``apply``; an accuracy metric; growjax's cross-entropy; optax extra-args support with the
``model_fn`` closure; all four), plus a lazily derived key (``fold_in(key, step)``, unused keys
are removed by XLA), so costs read as differences in microseconds per step. growjax's own step
jitted with the model closed over (no static argument) separates the per-call cost of hashing
and comparing the static flax module from that of the TrainState call (pytree, step counter).

To measure a modified growjax (e.g. a proposed patch in a copy of the package), put the folder
holding that copy first on ``PYTHONPATH``: the script imports whichever growjax is importable
and records its path.

The process is pinned to one CPU (``--pin_cpu``, default 0, -1 for none) before JAX starts its
worker threads, as in benchmarks/fm_bound.py: on this loaded 2-core machine a hand-off to a
worker on the other core adds tens of microseconds of noise per call.

Run: ``python benchmarks/train_step.py`` (about 3 minutes on the 2-core CPU; ``--quick`` for a
smoke run that writes nothing). Writes ``benchmarks/results/train_step.json``.

Method context: the growth loop of Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855)
trains between growth rounds with this step; its cost is the cost of growjax's training.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=31, help="interleaved repetitions per case")
  parser.add_argument("--rep_seconds", type=float, default=0.12,
                      help="target duration of one repetition (sets N steps per repetition)")
  parser.add_argument("--ablate", type=int, default=1, help="1: run the cost attribution")
  parser.add_argument("--pin_cpu", type=int, default=0,
                      help="pin the process to this CPU (-1: no pinning); see the docstring")
  parser.add_argument("--quick", action="store_true", help="small smoke run (no JSON written)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "train_step.json"))
  return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.pin_cpu >= 0 and hasattr(os, "sched_setaffinity"):
  os.sched_setaffinity(0, {ARGS.pin_cpu})  # before JAX starts its threads (they inherit it)

import importlib.util  # noqa: E402

if importlib.util.find_spec("growjax") is None:  # run from a checkout without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import growjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from growjax import data as gdata  # noqa: E402
from growjax import nets, train, tree  # noqa: E402
from growjax.curvature.losses import get_loss  # noqa: E402
from growjax.nets.common import host_init  # noqa: E402

LR = 1e-3
NUM_BATCHES = 8  # distinct device-resident batches cycled through (same list for both sides)
XENT = get_loss("softmax_cross_entropy")


# ----------------------------------------------------------------------------- the two steps

def hand_step(model, tx, *, rng_split=False, fold_in=False, accuracy=False,
              growjax_loss=False, extra_args=False):
  """The hand-written step; the keyword flags each add one thing growjax's step does.

  Signature ``step(params, batch_stats, opt_state, aux, x, y) -> (params, batch_stats,
  opt_state, aux, metrics)``; ``aux`` is ``(key, step)`` (untouched by the plain step).
  """
  txe = optax.with_extra_args_support(tx) if extra_args else tx

  def step(params, batch_stats, opt_state, aux, x, y):
    key, count = aux
    rngs = None
    if rng_split:
      key, drop = jax.random.split(key)
      rngs = {"dropout": drop}
    if fold_in:
      rngs = {"dropout": jax.random.fold_in(key, count)}
      count = count + 1

    def loss_fn(p):
      if batch_stats:
        logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"], rngs=rngs)
        new_bs = upd["batch_stats"]
      else:
        logits, new_bs = model.apply({"params": p}, x, train=True, rngs=rngs), batch_stats
      if growjax_loss:
        value = jnp.mean(XENT.value(logits, y))
      else:
        value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return value, (logits, new_bs)

    (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if extra_args:
      model_fn = lambda p: model.apply({"params": p, "batch_stats": batch_stats}, x)
      updates, opt_state = txe.update(grads, opt_state, params, model_fn=model_fn, targets=y)
    else:
      updates, opt_state = txe.update(grads, opt_state, params)
    metrics = {"loss": loss}
    if accuracy:
      metrics["accuracy"] = jnp.mean(XENT.correct(logits, y))
    return optax.apply_updates(params, updates), new_bs, opt_state, (key, count), metrics

  return jax.jit(step, donate_argnums=(0, 1, 2, 3))


class Runner:
  """Runs ``n`` steps of one step function from its own copy of the initial variables."""

  def __init__(self, kind, fn, model, variables, tx, xs, ys):
    self.kind, self.fn, self.model, self.xs, self.ys = kind, fn, model, xs, ys
    copy = jax.tree.map(jnp.array, variables)  # own buffers: the steps donate them
    if kind in ("growjax", "closure"):
      self.state = train.create_state(copy, tx)
    else:
      self.state = (copy["params"], copy.get("batch_stats", {}), tx.init(copy["params"]),
                    (jax.random.PRNGKey(0), jnp.zeros((), jnp.int32)))

  def __call__(self, n: int) -> None:
    s, xs, ys, m = self.state, self.xs, self.ys, len(self.xs)
    if self.kind == "growjax":
      for i in range(n):
        s, _ = self.fn(self.model, s, (xs[i % m], ys[i % m]))
    elif self.kind == "closure":
      for i in range(n):
        s, _ = self.fn(s, (xs[i % m], ys[i % m]))
    else:
      for i in range(n):
        *s, _ = self.fn(*s, xs[i % m], ys[i % m])
    self.state = s
    jax.block_until_ready(s)

  def params(self):
    return self.state[0] if self.kind == "hand" else self.state.params


def interleaved(runners: dict, n: int, reps: int) -> dict:
  """Alternating repetitions of ``n`` steps (the order rotates each repetition).

  Returns per runner: median wall and CPU seconds per step, and the raw lists.
  """
  names = list(runners)
  for r in runners.values():
    r(max(n // 4, 2))  # warm-up (compilation happened at calibration)
  wall = {k: [] for k in names}
  cpu = {k: [] for k in names}
  for rep in range(reps):
    order = names[rep % len(names):] + names[:rep % len(names)]
    for k in order:
      c0, t0 = time.process_time(), time.perf_counter()
      runners[k](n)
      wall[k].append((time.perf_counter() - t0) / n)
      cpu[k].append((time.process_time() - c0) / n)
  return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k]),
              "walls": wall[k], "cpus": cpu[k]} for k in names}


def calibrate(runner, rep_seconds: float) -> int:
  runner(3)  # compiles
  t0 = time.perf_counter()
  runner(10)
  per = (time.perf_counter() - t0) / 10
  return int(min(max(rep_seconds / per, 10), 3000))


def paired_ratio(times: dict, base: str, other: str, key: str) -> float:
  """Median over repetitions of base_time / other_time (other's speed relative to base)."""
  return statistics.median(b / o for b, o in zip(times[base][key], times[other][key]))


# ----------------------------------------------------------------------------- cases

def make_data(image: bool, batch: int):
  splits = gdata.load_digits(seed=0, image=image)
  it = gdata.batches(splits.train, batch, seed=0)
  bs = [next(it) for _ in range(NUM_BATCHES)]
  return [jax.device_put(b.x) for b in bs], [jax.device_put(b.y) for b in bs]


def parity(model, variables, tx, xs, ys, steps: int = 20) -> float:
  """Max |params difference| after ``steps`` of both steps from the same variables."""
  g = Runner("growjax", jax.jit(train.make_train_step(tx), static_argnums=0), model, variables,
             tx, xs, ys)
  h = Runner("hand", hand_step(model, tx), model, variables, tx, xs, ys)
  g(steps)
  h(steps)
  return float(max(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                                g.params(), h.params()))))


def _ablation_fns(model, tx) -> tuple[dict, dict]:
  """The attribution variants: ``({name: jitted step}, {name: Runner kind})``."""
  fns = {
      # growjax's own step with the model closed over instead of a static argument.
      "growjax, model closed over": jax.jit(
          functools.partial(train.make_train_step(tx), model), donate_argnums=(0,)),
      "+rng split": hand_step(model, tx, rng_split=True),
      "+accuracy": hand_step(model, tx, accuracy=True),
      "+growjax loss": hand_step(model, tx, growjax_loss=True),
      "+extra args": hand_step(model, tx, extra_args=True),
      "+all four": hand_step(model, tx, rng_split=True, accuracy=True, growjax_loss=True,
                             extra_args=True),
      "+fold_in key": hand_step(model, tx, fold_in=True),
      "+all, fold_in key": hand_step(model, tx, fold_in=True, accuracy=True,
                                     growjax_loss=True, extra_args=True),
  }
  return fns, {"growjax, model closed over": "closure"}


def run_case(name, model, image, batch, args, ablate=False):
  """Headline (hand vs growjax alone, so each pair is adjacent in time), then attribution."""
  tx = optax.adam(LR)
  xs, ys = make_data(image, batch)
  variables = host_init(model, jax.random.key(0))
  fns = {"hand": hand_step(model, tx),
         "growjax": jax.jit(train.make_train_step(tx), static_argnums=0, donate_argnums=(1,))}
  kinds = {"growjax": "growjax"}
  make = lambda fns: {k: Runner(kinds.get(k, "hand"), f, model, variables, tx, xs, ys)
                      for k, f in fns.items()}
  runners = make(fns)
  n = calibrate(runners["hand"], args.rep_seconds)
  runners["growjax"](3)
  times = interleaved(runners, n, args.reps)
  h, g = times["hand"], times["growjax"]
  row = {
      "case": name, "batch": batch, "params": tree.count(variables["params"]),
      "steps_per_rep": n, "hand_steps_s": 1.0 / h["wall"], "growjax_steps_s": 1.0 / g["wall"],
      "ratio": paired_ratio(times, "hand", "growjax", "walls"),
      "ratio_of_medians": h["wall"] / g["wall"],
      "ratio_of_minima": min(h["walls"]) / min(g["walls"]), "ratio_cpu": h["cpu"] / g["cpu"],
      "hand_us": 1e6 * h["wall"], "growjax_us": 1e6 * g["wall"],
      "max_param_diff": parity(model, variables, tx, xs, ys),
  }
  if not ablate:
    return row, None
  more, more_kinds = _ablation_fns(model, tx)
  kinds.update(more_kinds)
  runners = make({**fns, **more})
  for r in runners.values():
    r(3)
  times = interleaved(runners, n, args.reps)
  # Median over repetitions of (variant - hand) within the same repetition: close in time, so
  # a drifting load cancels.
  extra = lambda k, key: 1e6 * statistics.median(
      v - b for v, b in zip(times[k][key], times["hand"][key]))
  abl = {"case": name, "batch": batch, "hand_cpu_us": 1e6 * times["hand"]["cpu"],
         "hand_wall_us": 1e6 * times["hand"]["wall"],
         "extra_cpu_us": {k: extra(k, "cpus") for k in times if k != "hand"},
         "extra_wall_us": {k: extra(k, "walls") for k in times if k != "hand"}}
  return row, abl


def main(args) -> dict:
  if args.quick:
    args.reps, args.rep_seconds = 3, 0.03
  info = {"python": platform.python_version(), "jax": jax.__version__,
          "growjax": os.path.dirname(growjax.__file__),
          "flax": flax.__version__, "optax": optax.__version__,
          "device": str(jax.devices()[0]), "platform": jax.default_backend(),
          "cpus": os.cpu_count(), "pinned_cpu": args.pin_cpu,
          "load_avg_start": os.getloadavg()[0], "reps": args.reps,
          "rep_seconds": args.rep_seconds, "optimizer": f"adam(lr={LR})", "dtype": "float32"}
  print(f"[train_step bench] {info}", flush=True)
  mlp = nets.MLP(input_dim=64, widths=(256, 256), num_outputs=10)
  seed = nets.MLP(input_dim=64, widths=(8, 8), num_outputs=10)
  conv = nets.ConvNet(input_shape=(8, 8, 1), channels=(32, 64), num_outputs=10)
  cases = [("MLP 64-256-256-10", mlp, False, b, b == 32) for b in (32, 128, 512)]
  cases += [("ConvNet (32, 64) BN", conv, True, b, False) for b in (32, 128)]
  cases += [("MLP 64-8-8-10 (growth seed)", seed, False, 64, True)]
  if args.quick:
    cases = [cases[0], cases[3], cases[-1]]
  rows, ablations = [], []
  for name, model, image, batch, ablate in cases:
    row, abl = run_case(name, model, image, batch, args, ablate=ablate and bool(args.ablate))
    rows.append(row)
    print(f"  {name} batch {batch}: hand {row['hand_steps_s']:.0f} steps/s, growjax "
          f"{row['growjax_steps_s']:.0f} steps/s, ratio {row['ratio']:.3f} (of medians "
          f"{row['ratio_of_medians']:.3f}, cpu {row['ratio_cpu']:.3f})", flush=True)
    if abl is not None:
      ablations.append(abl)
  columns = ["case", "batch", "params", "hand_steps_s", "growjax_steps_s", "ratio",
             "ratio_of_medians", "ratio_of_minima", "ratio_cpu", "max_param_diff"]
  print("\nSteps/s (medians of interleaved repetitions); ratio = growjax / hand-written speed "
        "(median of adjacent-pair ratios):")
  print(train.format_table(rows, columns))
  for abl in ablations:
    print(f"\nCost attribution, {abl['case']} batch {abl['batch']}: hand-written step "
          f"{abl['hand_cpu_us']:.1f} us CPU ({abl['hand_wall_us']:.1f} us wall); extra us/step "
          "over it (median of same-repetition differences; CPU time, wall beside):")
    print(train.format_table([{"variant": k, "cpu_us": v, "wall_us": abl["extra_wall_us"][k]}
                              for k, v in abl["extra_cpu_us"].items()]))
  result = {"benchmark": "train_step", "command": "python benchmarks/train_step.py",
            "info": info, "target_ratio": 0.95, "results": rows, "ablations": ablations}
  if not args.quick:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"\nWrote {args.out}")
  return result


if __name__ == "__main__":
  main(ARGS)
