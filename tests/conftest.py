"""Test configuration shared by every test module.

Fakes 8 CPU devices (sharded code is tested on CPU) and turns on strict dtype and rank
promotion, so library code cannot rely on implicit float64 upcasts or rank broadcasting.
Must run before JAX initialises its backends, hence the environment variable at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
