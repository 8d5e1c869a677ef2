"""Calibration of probabilistic classifiers: expected calibration error and reliability bins.

Used to judge the predictive uncertainty of mean-field VI (Bayes-by-backprop, Blundell et al.
2015, arXiv:1505.05424); ECE as in Guo et al. (2017), "On calibration of modern neural
networks", arXiv:1706.04599: equal-width confidence bins, ``sum_b |B_b|/n |acc_b - conf_b|``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class ReliabilityBins(NamedTuple):
  """Per-bin statistics of the top-class confidence.

  Attributes:
    edges: ``[num_bins + 1]`` bin edges on [0, 1].
    confidence: ``[num_bins]`` mean confidence in each bin (0 where empty).
    accuracy: ``[num_bins]`` accuracy in each bin (0 where empty).
    count: ``[num_bins]`` examples per bin.
  """
  edges: Array
  confidence: Array
  accuracy: Array
  count: Array


def reliability_bins(probs: Array, labels: Array, num_bins: int = 15) -> ReliabilityBins:
  """Bins examples by their top-class probability.

  Args:
    probs: ``[n, num_classes]`` predictive probabilities.
    labels: ``[n]`` integer labels.
    num_bins: equal-width bins on [0, 1]; a confidence ``c`` falls in bin ``ceil(c B) - 1``
      (right-closed bins, confidence 1 in the last).

  Returns:
    ``ReliabilityBins``.
  """
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"probs must be [n, classes] and labels [n]; got {probs.shape} and "
                     f"{labels.shape}.")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
  conf = jnp.max(probs, axis=1)
  correct = (jnp.argmax(probs, axis=1) == labels).astype(probs.dtype)
  idx = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jnp.zeros((num_bins,), probs.dtype).at[idx].add(1.0)
  conf_sum = jnp.zeros((num_bins,), probs.dtype).at[idx].add(conf)
  acc_sum = jnp.zeros((num_bins,), probs.dtype).at[idx].add(correct)
  safe = jnp.maximum(count, 1.0)
  edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=probs.dtype)
  return ReliabilityBins(edges, conf_sum / safe, acc_sum / safe, count)


def expected_calibration_error(probs: Array, labels: Array, num_bins: int = 15) -> Array:
  """``ECE = sum_b (|B_b| / n) |accuracy_b - confidence_b|`` over equal-width bins.

  Args:
    probs: ``[n, num_classes]`` predictive probabilities.
    labels: ``[n]`` integer labels.
    num_bins: number of bins.

  Returns:
    Scalar in [0, 1].
  """
  bins = reliability_bins(probs, labels, num_bins)
  n = jnp.sum(bins.count)
  return jnp.sum(bins.count / n * jnp.abs(bins.accuracy - bins.confidence))
