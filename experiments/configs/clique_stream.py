r"""Config: replay a gate-scheduling conflict stream through the dynamic clique index.

Flights occupy airport gates over time intervals; two flights conflict (cannot share a gate) when
their intervals overlap. Delays stream in: a late departure stretches an interval (new conflicts:
edge insertions); a late arrival shifts it (conflicts gained and lost: insertions and deletions).
The clique index (Lawton 2014, arXiv:1412.4620) is updated per edge; the clique number is the
number of gates needed (interval graphs are perfect), a colouring is a gate assignment.

Command (from the repo root):
  python -m experiments.clique_stream --workdir=/tmp/clique_stream
  python -m experiments.clique_stream --config=experiments/configs/clique_stream.py:quick \
      --workdir=/tmp/clique_stream_quick

Expected on the 2-core CPU machine: default ~70 s (3000 flights over a week, 4000 delays giving
~28.5k edge insertions and ~8.6k deletions, checked against networkx at 11 checkpoints): median
~180 us (CPU) per insertion and ~110 us per deletion vs ~1 s for a networkx recomputation of all
maximal cliques (~6000x per edge update, ~500x per delay event); the gates needed (clique number)
grow from 45 to 56 as delays pile up and the greedy colouring uses at most 2 more. `quick`
(150 flights, 150 delays): ~5 s.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` selects a variant: None (default) or "quick"."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_flights = 3000  # vertices of the conflict graph
  c.horizon_min = 7 * 24 * 60.0  # schedule span (minutes): a week of operations
  c.mean_turnaround_min = 90.0  # mean time a flight holds a gate (exponential + 30 min floor)
  c.min_turnaround_min = 30.0
  c.num_delays = 4000  # delay events in the stream
  c.mean_delay_min = 25.0  # exponential delay size
  c.shift_fraction = 0.3  # share of delays that are late arrivals (interval shifts)
  c.checkpoints = 10  # networkx recomputation + exact comparison this many times
  c.check_exact = True  # compare with networkx at every checkpoint (fails loudly on mismatch)
  if arg == "quick":
    c.num_flights = 150
    c.horizon_min = 24 * 60.0
    c.num_delays = 150
    c.checkpoints = 3
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use none or 'quick'.")
  return c
