r"""Config: FM-bound parallel updates vs CAVI as a Gaussian DEF becomes less forest-like.

Lawton, Ver Steeg & Galstyan (UAI 2018), arXiv:1805.06951. 2000 observed children x 1000
Gaussian parents; each child has one strong parent (weight +-1) and 4 weak ones of relative scale
eps in {0, 0.05, 0.2, 0.5, 1} (``growjax.vi.forest_like_model``); noise and prior variance 1.

Command (from the repo root):
  python -m experiments.fm_bound --workdir=/tmp/fm_bound
  python -m experiments.fm_bound --config=experiments/configs/fm_bound.py:quick \
      --workdir=/tmp/fm_bound_quick

Expected on the 2-core CPU machine: default ~1 min. Forest-likeness 1.00 / 0.80 / 0.52 / 0.32 /
0.27. Under the stopping rule FM takes 2 / 6 / 17 / 42 / 76 iterations, FM with the exact line
search (``fm_ls``) 2 / 4 / 9 / 17 / 28, conjugate FM directions (``fm_cg``) 2 / 4 / 7 / 10 / 13,
sequential CAVI 2 / 4 / 5 / 8 / 11-12 sweeps, each sweep costing 4-7x an FM iteration. End to
end (run of 2026-12-07, 7 noisy repetitions): plain FM 1.8 / 2.3 / 1.7 / 1.4 / 0.8x sequential
CAVI's speed, ``fm_ls`` 1.8 / 2.5 / 1.9 / 2.1 / 1.7x;
plain FM stops farther from the optimum (relative gap up to 9e-6 at eps = 1, ``fm_ls`` 2e-6,
sequential 3e-7). To equal accuracy (gap 1e-6) plain FM's advantage shrinks to ~1x at eps >= 0.5,
``fm_ls`` keeps 1.3-1.8x. Naive parallel CAVI is the fastest while it converges and diverges at
eps >= 0.5. ``fm_cg`` (added after that run) needs the fewest iterations of the FM methods at
every eps and is the fastest of them at eps >= 0.2. The tuned, pinned figures (all three FM
methods, end to end and prepared once) are benchmarks/fm_bound.py's
(benchmarks/results/fm_bound.json, BUILD_NOTES.md).
`quick` (300 x 150, eps 0 / 1, 2 repetitions): ~30 s.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` selects a variant: None (default) or "quick"."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.eps = (0.0, 0.05, 0.2, 0.5, 1.0)  # relative scale of the weak parents
  c.num_children = 2000  # observed units
  c.num_parents = 1000  # latent units
  c.num_weak = 4  # weak parents per child
  c.noise_variance = 1.0
  c.tol = 1e-6  # stopping rule: relative ELBO change
  c.gap_tol = 1e-6  # equal-accuracy target: relative gap to the exact optimum's ELBO
  c.max_iters = 5000
  c.trace_iters = 400  # length of the ELBO trace drawn (and searched for the gap)
  c.reps = 7  # interleaved timing repetitions (medians)
  c.sequential_unroll = 1  # scan unroll of sequential CAVI (1 was fastest here, see benchmark)
  if arg == "quick":
    c.eps = (0.0, 1.0)
    c.num_children = 300
    c.num_parents = 150
    c.trace_iters = 300
    c.reps = 2
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use none or 'quick'.")
  return c
