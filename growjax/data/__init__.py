"""Datasets: embedded defaults (digits, text corpora), synthetic tasks, local archives (CIFAR)."""

from growjax.data.digits import load_digits
from growjax.data.splits import Dataset, Splits, batches, stratified_split

__all__ = ["Dataset", "Splits", "batches", "load_digits", "stratified_split"]
