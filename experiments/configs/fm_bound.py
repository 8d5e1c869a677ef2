r"""Config: FM-bound parallel updates vs CAVI as a Gaussian DEF becomes less forest-like.

Lawton, Ver Steeg & Galstyan (UAI 2018), arXiv:1805.06951. 2000 observed children x 1000
Gaussian parents; each child has one strong parent (weight +-1) and 4 weak ones of relative scale
eps in {0, 0.05, 0.2, 0.5, 1} (``growjax.vi.forest_like_model``); noise and prior variance 1.

Command (from the repo root):
  python -m experiments.fm_bound --workdir=/tmp/fm_bound
  python -m experiments.fm_bound --config=experiments/configs/fm_bound.py:quick \
      --workdir=/tmp/fm_bound_quick

Expected on the 2-core CPU machine: default ~1 min. Forest-likeness 1.00 / 0.80 / 0.52 / 0.32 /
0.27. Under the stopping rule FM takes 2 / 6 / 17 / 42 / 76 iterations, sequential CAVI 2 / 4 /
5 / 8 / 12 sweeps, each sweep costing 6-9x an FM iteration; FM is faster than sequential CAVI
at every eps (about 2x / 2.7x / 2.1x / 1.6x / 1.6x in the default run; noisy on a shared
machine, with ~0.15-0.25 ms of fixed cost per solve for every method), but it stops farther
from the optimum (relative gap up to 9e-6 at eps = 1 vs 3e-7). To equal accuracy (gap 1e-6)
its advantage shrinks from ~2.4x at eps = 0.05 to ~1.1x at eps = 1, where block CAVI (a greedy
colouring of the co-parent graph, 11 sweeps) is the fastest. Naive parallel CAVI is the
fastest while it converges and diverges at eps >= 0.5.
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
