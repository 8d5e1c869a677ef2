"""Metrics as JSON lines, a progress line with ETA, and PNG plots for experiment workdirs.

Every long run in growjax writes ``<workdir>/metrics.jsonl`` (one JSON object per line, values
converted to plain Python numbers) and shows progress through absl logging, so runs in a
terminal, under a scheduler or in a Colab cell all look the same.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging


def _plain(value: Any) -> Any:
  """Converts numpy/jax scalars and arrays to JSON-serialisable Python values."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "tolist"):
    value = np.asarray(value).tolist()
    return _plain(value) if isinstance(value, list) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the information as text.
  return value


class MetricWriter:
  """Appends records to ``<workdir>/<name>.jsonl``; each record is flushed immediately."""

  def __init__(self, workdir: str | os.PathLike, name: str = "metrics"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(os.fspath(workdir), f"{name}.jsonl")

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(_plain(dict(record)), sort_keys=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a JSON-lines file written by ``MetricWriter``."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Periodic progress lines ``[name] step 120/1000 (12%) loss=0.53 | 3.1 it/s, ETA 4m41s``.

  Logs through absl (stderr in binaries, visible in notebooks) at most every ``every_s`` seconds,
  and always on the last step.
  """

  def __init__(self, total: int, name: str = "train", every_s: float = 5.0, start: int = 0):
    self.total, self.name, self.every_s = int(total), name, float(every_s)
    self.start_step = start
    self.t0 = time.perf_counter()
    self.last = -float("inf")

  def update(self, step: int, **values: float) -> None:
    now = time.perf_counter()
    if now - self.last < self.every_s and step < self.total:
      return
    self.last = now
    done = max(step - self.start_step, 1)
    rate = done / max(now - self.t0, 1e-9)
    remaining = max(self.total - step, 0) / rate
    vals = " ".join(f"{k}={float(v):.4g}" for k, v in values.items())
    pct = 100.0 * step / max(self.total, 1)
    logging.info("[%s] step %d/%d (%.0f%%) %s | %.2f it/s, ETA %s", self.name, step, self.total,
                 pct, vals, rate, format_seconds(remaining))


def format_seconds(s: float) -> str:
  s = int(round(s))
  if s >= 3600:
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
  if s >= 60:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s}s"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """Renders records as a fixed-width text table (numbers with 4 significant digits)."""
  if not rows:
    return "(no rows)"
  columns = list(columns or rows[0].keys())

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
  sep = "  ".join("-" * w for w in widths)
  body = "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
  return f"{line}\n{sep}\n{body}"


def save_figure(fig, path: str | os.PathLike) -> str:
  """Saves a matplotlib figure as PNG (creating the folder) and closes it; returns the path."""
  import matplotlib.pyplot as plt  # local: matplotlib import is slow and only plots need it
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return os.fspath(path)
