"""Key-path utilities for parameter trees: get/set, regex masks and ``transplant``.

Parameters in growjax are plain nested dicts (flax ``variables``); a leaf is addressed by its key
path written with ``/`` separators, e.g. ``"params/hidden_0/kernel"``. Optimizer states, EMA trees,
VI variances and LoRA adapters are trees whose leaves carry the same key paths (possibly below a
prefix such as ``"0/mu"`` inside an optax state), which is what lets one rule carry all of them
across growth:

    transplant(fresh, old): every leaf of ``fresh`` whose key path exists in ``old`` receives the
    old values in its leading corner; everything else keeps its fresh value.

Growth appends units at the end of the unit axis (see ``growjax.morph``), so the leading corner is
exactly where the old units live; no code ever has to guess which axis grew.

This module follows the growth convention of Lawton, Galstyan & Ver Steeg (2024),
"Growing Efficient Accurate and Robust Neural Networks on the Edge" / arXiv:2411.05855 (growing by
network morphisms that append units), and is shared by every other subpackage.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Path = str


def _key_str(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: Iterable[Any]) -> Path:
  """Joins a jax key path (tuple of DictKey/GetAttrKey/...) into ``"a/b/c"``."""
  return "/".join(_key_str(k) for k in key_path)


def flatten(tree: PyTree) -> dict[Path, Any]:
  """Flattens a pytree into an ordered ``{path: leaf}`` dict (tree-flatten order)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(kp): leaf for kp, leaf in leaves}


def paths(tree: PyTree) -> list[Path]:
  """All leaf key paths of ``tree`` in flatten order."""
  return list(flatten(tree))


def unflatten(flat: Mapping[Path, Any]) -> dict:
  """Rebuilds a nested dict from ``{"a/b/c": leaf}`` (inverse of ``flatten`` for dict trees)."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"Path {path!r} conflicts with a leaf at {part!r}.")
    node[parts[-1]] = leaf
  return out


def _unknown_path_error(path: Path, available: Iterable[Path]) -> KeyError:
  available = list(available)
  listing = "\n  ".join(available[:200])
  more = "" if len(available) <= 200 else f"\n  ... and {len(available) - 200} more"
  return KeyError(
      f"Unknown parameter path {path!r}. Available paths ({len(available)}):\n  {listing}{more}")


def get(tree: PyTree, path: Path) -> Any:
  """Returns the leaf at ``path``; a clear KeyError lists the available paths otherwise."""
  node = tree
  for part in path.split("/"):  # fast path: walk nested mappings without flattening
    if not isinstance(node, Mapping) or part not in node:
      break
    node = node[part]
  else:
    if not isinstance(node, Mapping):
      return node
  flat = flatten(tree)
  if path not in flat:
    raise _unknown_path_error(path, flat)
  return flat[path]


def set(tree: Mapping, path: Path, value: Any, *, check_shape: bool = True) -> dict:  # pylint: disable=redefined-builtin
  """Returns a copy of the nested-dict ``tree`` with the leaf at ``path`` replaced.

  Args:
    tree: nested dict.
    path: existing leaf path (``"params/dense/kernel"``).
    value: new leaf.
    check_shape: if True, the new value must have the old leaf's shape.

  Raises:
    KeyError: unknown path (lists what exists).
    ValueError: shape mismatch (names both shapes).
  """
  flat = flatten(tree)
  if path not in flat:
    raise _unknown_path_error(path, flat)
  old = flat[path]
  if check_shape and np.shape(old) != np.shape(value):
    raise ValueError(
        f"Shape mismatch at {path!r}: the tree holds {np.shape(old)}, the new value has "
        f"{np.shape(value)}. Pass check_shape=False to change the shape deliberately.")
  flat[path] = value
  return unflatten(flat)


def mask(tree: PyTree, include: str | Iterable[str], exclude: str | Iterable[str] = (),
         *, must_match: bool = True) -> PyTree:
  """Boolean tree: True where a leaf's key path matches an ``include`` regex and no ``exclude``.

  Regexes are applied with ``re.search`` to the ``/``-joined key path, so ``"kernel$"`` selects
  every kernel and ``"attn/(query|value)/kernel"`` two projections of every attention layer.

  Args:
    tree: any pytree.
    include: regex or list of regexes.
    exclude: regex or list of regexes removed from the selection.
    must_match: raise if ``include`` selects nothing (a typo should not silently train nothing).

  Returns:
    A tree of Python bools with the structure of ``tree`` (usable as an optax mask).
  """
  inc = [include] if isinstance(include, str) else list(include)
  exc = [exclude] if isinstance(exclude, str) else list(exclude)
  inc_re = [re.compile(r) for r in inc]
  exc_re = [re.compile(r) for r in exc]

  def select(kp, _):
    p = path_str(kp)
    return any(r.search(p) for r in inc_re) and not any(r.search(p) for r in exc_re)

  out = jax.tree_util.tree_map_with_path(select, tree)
  if must_match and not any(jax.tree_util.tree_leaves(out)):
    raise _unknown_path_error(f"<regex {inc} minus {exc}>", paths(tree))
  return out


def select(tree: PyTree, include: str | Iterable[str], exclude: str | Iterable[str] = ()
           ) -> dict[Path, Any]:
  """``{path: leaf}`` for the leaves selected by ``mask(tree, include, exclude)``."""
  m = flatten(mask(tree, include, exclude))
  return {p: leaf for p, leaf in flatten(tree).items() if m[p]}


def rename_path(path: Path, renames: Mapping[Path, Path] | None) -> Path:
  """Applies the first matching ``{old_prefix: new_prefix}`` rename to ``path``.

  Prefixes match whole path components (``"params/h1"`` renames ``"params/h1/kernel"`` but not
  ``"params/h10/kernel"``); a prefix may also occur after leading components, so a rename of
  ``"params/h1"`` also applies to ``"0/mu/params/h1/kernel"`` inside an optax state.
  """
  if not renames:
    return path
  parts = path.split("/")
  for old, new in renames.items():
    old_parts = old.split("/")
    n = len(old_parts)
    for start in range(len(parts) - n + 1):
      if parts[start:start + n] == old_parts:
        return "/".join(parts[:start] + new.split("/") + parts[start + n:])
  return path


def transplant(fresh: PyTree, old: PyTree, renames: Mapping[Path, Path] | None = None) -> PyTree:
  """Copies the leaves of ``old`` into the leading corner of the matching leaves of ``fresh``.

  The one rule that carries any params-shaped state across growth: build the state for the
  grown parameters (``fresh``; e.g. ``optimizer.init(grown_params)``), then transplant the old
  state into it. Leaves are matched by key path (after ``renames``, which maps old path prefixes
  to new ones, e.g. when a depth morphism shifts layer names). Old leaves with no match in
  ``fresh`` are dropped (the layer was removed).

  Args:
    fresh: the tree with the new shapes; its leaves outside the old corner are kept.
    old: the tree whose values are carried over.
    renames: optional ``{old_prefix: new_prefix}`` map applied to old key paths.

  Returns:
    A tree with the structure, shapes and dtypes of ``fresh``.

  Raises:
    ValueError: a matched leaf shrank or changed rank (the message gives both shapes).
  """
  old_flat = {rename_path(p, renames): leaf for p, leaf in flatten(old).items()}

  def put(kp, new_leaf):
    p = path_str(kp)
    if p not in old_flat:
      return new_leaf
    old_leaf = old_flat[p]
    new_shape, old_shape = np.shape(new_leaf), np.shape(old_leaf)
    if len(new_shape) != len(old_shape) or any(o > n for o, n in zip(old_shape, new_shape)):
      raise ValueError(
          f"transplant: leaf {p!r} has shape {old_shape} in the old tree and {new_shape} in the "
          f"fresh tree; growth may only append along axes (every old dim <= new dim, same rank).")
    if not _is_array(new_leaf):
      return old_leaf
    dtype = np.dtype(new_leaf.dtype)
    if new_shape == old_shape:
      return old_leaf if np.dtype(old_leaf.dtype) == dtype else jax.device_put(
          np.asarray(old_leaf, dtype))
    # Host-side copy: growth happens between jitted steps, and numpy avoids compiling a
    # scatter for every new shape (jnp's .at[].set would).
    out = np.array(new_leaf)
    out[tuple(slice(0, s) for s in old_shape)] = np.asarray(old_leaf, dtype)
    return jax.device_put(out)

  return jax.tree_util.tree_map_with_path(put, fresh)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def count(tree: PyTree) -> int:
  """Number of scalar entries in the array leaves of ``tree``."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def map_selected(fn: Callable[[Path, Any], Any], tree: PyTree, include: str | Iterable[str],
                 exclude: str | Iterable[str] = ()) -> PyTree:
  """Applies ``fn(path, leaf)`` to the leaves selected by regex; other leaves pass through."""
  m = mask(tree, include, exclude)
  return jax.tree_util.tree_map_with_path(
      lambda kp, leaf, sel: fn(path_str(kp), leaf) if sel else leaf, tree, m)
