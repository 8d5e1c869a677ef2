"""Adapter-only LoRA checkpoints: the adapter arrays plus the LoRA configuration, nothing else.

A fine-tuned LoRA is a few megabytes next to a base of gigabytes (Hu et al. 2021, LoRA,
arXiv:2106.09685; Dettmers et al. 2023, QLoRA, arXiv:2305.14314), so only the adapters are
written. A checkpoint is one orbax directory with two items, written atomically (orbax writes a
temporary directory and renames it when complete, as ``growjax.train.Checkpointer`` does):

* ``adapters``: the adapter tree (``{"<kernel path>": {"a": [.., d_in, r], "b": [.., r, d_out]}}``
  nested like the parameters) through orbax's StandardSave;
* ``meta``: JSON with the LoRA targets (include/exclude regexes, rank, α, batch and input axes),
  rsLoRA and dropout settings, every array's shape and dtype (so restoring needs no template),
  and the caller's extra information (base model name, step, metrics, ...).

``lora_from_meta(meta)`` rebuilds the same ``Lora`` transform, so
``lora_from_meta(meta).apply(apply_fn)(base_params, adapters, x)`` reproduces the fine-tuned
model given the base parameters (full precision or quantized).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from growjax import tree as gtree
from growjax.peft.lora import Lora, LoraTarget, lora

FORMAT = "growjax.lora_adapters"
VERSION = 1
_KNOWN = ("targets", "rslora", "dropout")


def _as_tuple(v) -> tuple:
  return (v,) if isinstance(v, str) else tuple(v)


def _targets(value) -> tuple[LoraTarget, ...]:
  """LoraTargets from a LoraTarget, a sequence of them, or their JSON dicts."""
  items = (value,) if isinstance(value, (LoraTarget, Mapping)) else tuple(value or ())
  out = []
  for t in items:
    if isinstance(t, Mapping):
      t = LoraTarget(**{k: (_as_tuple(v) if k in ("include", "exclude") and not isinstance(v, str)
                            else v) for k, v in t.items()})
    if not isinstance(t, LoraTarget):
      raise TypeError(f"meta['targets'] must hold growjax.peft.LoraTarget values, got "
                      f"{type(t).__name__}.")
    out.append(t)
  if not out:
    raise ValueError("meta['targets'] is required: the LoraTarget(s) the adapters were built "
                     "with (regexes, rank, alpha), so the checkpoint can rebuild the LoRA.")
  return tuple(out)


def _target_json(t: LoraTarget) -> dict:
  # A single regex stays a string and several a list, so the target round-trips equal.
  regexes = lambda v: v if isinstance(v, str) else list(v)
  return {"include": regexes(t.include), "rank": int(t.rank), "alpha": float(t.alpha),
          "batch_dims": int(t.batch_dims), "in_dims": int(t.in_dims),
          "exclude": regexes(t.exclude)}


def _target_of(stem: str, targets: Sequence[LoraTarget]) -> LoraTarget | None:
  """The first target selecting ``stem`` (``growjax.tree.mask`` semantics: re.search)."""
  for t in targets:
    if any(re.search(p, stem) for p in _as_tuple(t.include)) and not any(
        re.search(p, stem) for p in _as_tuple(t.exclude)):
      return t
  return None


def _check_adapters(adapters, targets: Sequence[LoraTarget]) -> dict[str, Any]:
  """Flat ``{path: array}``; every leaf must be an ``a``/``b`` factor of a target's kernel."""
  flat = gtree.flatten(adapters)
  if not flat:
    raise ValueError("save_adapters: the adapter tree is empty.")
  problems = []
  for path, x in flat.items():
    stem, _, leaf = path.rpartition("/")
    if leaf not in ("a", "b") or not hasattr(x, "dtype") or not jnp.issubdtype(
        x.dtype, jnp.floating):
      problems.append(f"{path} (not a floating a/b adapter factor: {type(x).__name__})")
      continue
    t = _target_of(stem, targets)
    if t is None:
      problems.append(f"{path} (no target in meta['targets'] selects {stem!r})")
    elif x.shape[-1 if leaf == "a" else -2] != t.rank:
      problems.append(f"{path} (shape {tuple(x.shape)} does not have the target's rank {t.rank})")
  if problems:
    raise ValueError("save_adapters stores LoRA adapters only (the tree from lora.init / "
                     "init_from / training, not the base parameters); offending leaves: "
                     + "; ".join(problems[:20]) + ("" if len(problems) <= 20 else
                                                   f"; and {len(problems) - 20} more"))
  return flat


def save_adapters(path: str | os.PathLike, adapters, meta: Mapping[str, Any], *,
                  overwrite: bool = False) -> str:
  """Writes an adapter-only checkpoint (atomic).

  Args:
    path: the checkpoint directory (created; must not exist unless ``overwrite``).
    adapters: the adapter tree of a ``growjax.peft.lora`` transform.
    meta: ``{"targets": LoraTarget or [LoraTarget, ...], "rslora": bool, "dropout": float,
      **extra}``; ``targets`` is required, ``extra`` must be JSON-serialisable.
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    The absolute checkpoint path.

  Raises:
    ValueError: missing targets, or leaves that are not adapters of those targets.
    FileExistsError: ``path`` exists and ``overwrite`` is False.
  """
  path = os.path.abspath(os.fspath(path))
  targets = _targets(meta.get("targets"))
  flat = _check_adapters(adapters, targets)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")
  record = {"format": FORMAT, "version": VERSION,
            "targets": [_target_json(t) for t in targets],
            "rslora": bool(meta.get("rslora", False)), "dropout": float(meta.get("dropout", 0.0)),
            "arrays": {p: {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}
                       for p, x in flat.items()},
            "extra": {k: v for k, v in meta.items() if k not in _KNOWN}}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(path, args=ocp.args.Composite(adapters=ocp.args.StandardSave(adapters),
                                            meta=ocp.args.JsonSave(record)), force=overwrite)
  return path


def load_adapters(path: str | os.PathLike) -> tuple[dict, dict]:
  """Reads an adapter-only checkpoint.

  Returns:
    ``(adapters, meta)`` where ``meta`` has ``targets`` (a tuple of ``LoraTarget``), ``rslora``,
    ``dropout``, ``arrays`` (shapes and dtypes) and the saved ``extra`` keys at the top level.

  Raises:
    FileNotFoundError: no checkpoint at ``path``. ValueError: not a growjax adapter checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No adapter checkpoint at {path!r} (write one with "
                            f"growjax.peft.save_adapters).")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    try:
      record = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise ValueError(f"{path!r} is not a growjax adapter checkpoint: {e}") from e
    if not isinstance(record, Mapping) or record.get("format") != FORMAT:
      raise ValueError(f"{path!r} is not a growjax adapter checkpoint (meta format "
                       f"{record.get('format') if isinstance(record, Mapping) else record!r}).")
    abstract = gtree.unflatten({p: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"]))
                                for p, v in record["arrays"].items()})
    adapters = ckpt.restore(path, args=ocp.args.Composite(
        adapters=ocp.args.StandardRestore(abstract)))["adapters"]
  meta = {**record["extra"], "targets": _targets(record["targets"]), "rslora": record["rslora"],
          "dropout": record["dropout"], "arrays": record["arrays"]}
  return adapters, meta


def lora_from_meta(meta: Mapping[str, Any]) -> Lora:
  """The ``Lora`` transform a checkpoint's ``meta`` describes (targets, rsLoRA, dropout)."""
  return lora(_targets(meta.get("targets")), rslora=bool(meta.get("rslora", False)),
              dropout=float(meta.get("dropout", 0.0)))
