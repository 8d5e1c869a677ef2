"""Dataset containers, stratified splits and minibatch iteration shared by all loaders."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """In-memory examples: ``x`` [n, ...] and integer labels ``y`` [n] (or targets [n, ...])."""
  x: np.ndarray
  y: np.ndarray

  def __len__(self) -> int:
    return int(self.x.shape[0])


class Splits(NamedTuple):
  """Train / validation / test datasets and metadata."""
  train: Dataset
  val: Dataset
  test: Dataset
  num_classes: int
  name: str


def stratified_split(x: np.ndarray, y: np.ndarray, *, num_classes: int, seed: int,
                     val_fraction: float, test_fraction: float, name: str) -> Splits:
  """Splits ``(x, y)`` into train/val/test keeping class proportions, deterministically."""
  if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
    raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in "
                     "[0, 1) with a sum below 1.")
  rng = np.random.default_rng(seed)
  parts = {"train": [], "val": [], "test": []}
  for c in range(num_classes):
    idx = np.flatnonzero(y == c)
    rng.shuffle(idx)
    n_val = int(round(val_fraction * len(idx)))
    n_test = int(round(test_fraction * len(idx)))
    parts["val"].append(idx[:n_val])
    parts["test"].append(idx[n_val:n_val + n_test])
    parts["train"].append(idx[n_val + n_test:])
  out = {}
  for k, chunks in parts.items():
    idx = np.concatenate(chunks)
    rng.shuffle(idx)
    out[k] = Dataset(x[idx], y[idx])
  return Splits(out["train"], out["val"], out["test"], num_classes=num_classes, name=name)


def batches(data: Dataset, batch_size: int, *, seed: int | None = None, epochs: int | None = None,
            drop_remainder: bool = True) -> Iterator[Dataset]:
  """Yields minibatches; shuffled per epoch when ``seed`` is given; forever if ``epochs`` is None.

  With ``drop_remainder`` every batch has exactly ``batch_size`` rows, so a jitted step compiles
  once.
  """
  n = len(data)
  if batch_size > n and drop_remainder:
    raise ValueError(f"batch_size={batch_size} exceeds the dataset size {n}; lower batch_size.")
  rng = np.random.default_rng(seed) if seed is not None else None
  epoch = 0
  while epochs is None or epoch < epochs:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - batch_size + 1 if drop_remainder else n
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      yield Dataset(data.x[idx], data.y[idx])
    epoch += 1
