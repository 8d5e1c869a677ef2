"""The embedded default vision dataset: scikit-learn's 8x8 handwritten digits.

1,797 images of 8x8 pixels with 16 grey levels, 10 classes; shipped inside scikit-learn, so it
needs no download. Split deterministically (stratified, seeded) into train/val/test.
"""

from __future__ import annotations

import numpy as np

from growjax.data.splits import Dataset, Splits, stratified_split


def load_digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                image: bool = False) -> Splits:
  """Loads the digits dataset as float32 features in [0, 1] and int32 labels.

  Args:
    seed: seed of the stratified split.
    val_fraction: fraction of examples held out for validation.
    test_fraction: fraction of examples held out for testing.
    image: if True, ``x`` has shape [n, 8, 8, 1] (NHWC, for convnets); else [n, 64].

  Returns:
    ``Splits(train, val, test)``, each a ``Dataset(x, y)`` with ``num_classes = 10``.
  """
  from sklearn.datasets import load_digits as _sk_load  # local: sklearn import is slow

  raw = _sk_load()
  x = (raw.data.astype(np.float32) / 16.0)
  if image:
    x = x.reshape(-1, 8, 8, 1)
  y = raw.target.astype(np.int32)
  return stratified_split(x, y, num_classes=10, seed=seed, val_fraction=val_fraction,
                          test_fraction=test_fraction, name="digits")
