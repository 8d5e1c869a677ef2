r"""Config: train a fixed-size network (the baseline growth is compared with).

Command (from the repo root):
  python -m experiments.train                       # MLP 64-32-10 on digits
  python -m experiments.train --config=experiments/configs/train.py:digits_conv
  python -m experiments.train --config=experiments/configs/train.py:quick --workdir=/tmp/t

Expected on the 2-core CPU machine: default ~20 s, validation accuracy ~0.97; `quick` ~5 s.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: None (MLP on digits), "digits_conv", "quick"."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict({"name": "digits", "seed": 0})
  c.model = ml_collections.ConfigDict({"kind": "mlp", "widths": (32,), "activation": "relu"})
  c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
  c.steps = 2000
  c.batch_size = 64
  c.eval_every = 250
  c.log_every = 50
  c.data_parallel = True  # shard batches over all devices (jax.sharding)
  if arg == "digits_conv":
    c.data.name = "digits_image"
    c.model = ml_collections.ConfigDict({"kind": "convnet", "channels": (8, 16),
                                         "pool": (True, True)})
  elif arg == "quick":
    c.model.widths = (8,)
    c.steps = 100
    c.eval_every = 50
  elif arg not in (None, ""):
    raise ValueError(f"Unknown variant {arg!r}; use none, 'digits_conv' or 'quick'.")
  return c
