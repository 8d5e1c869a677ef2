"""CIFAR-10 / CIFAR-100 from the standard python-pickle archive at a local path.

The archives are those of Krizhevsky (2009), "Learning Multiple Layers of Features from Tiny
Images" (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-python.tar.gz`` (folder
``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``) and
``cifar-100-python.tar.gz`` (folder ``cifar-100-python/`` with ``train``, ``test``, ``meta``).
Each batch is a Python-2 pickle of a dict with byte-string keys: ``b"data"``, a uint8 array
[n, 3072] whose rows hold 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in
row-major order (CHW), and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` / ``b"coarse_labels"``
(CIFAR-100), lists of ints.

growjax never downloads: the user fetches the archive once and passes its path. Pickle files can
run arbitrary code when loaded, so the archive is treated as untrusted: ``_CifarUnpickler`` admits
only the few globals a CIFAR batch needs (numpy array reconstruction and plain builtins) and refuses
everything else before it can be called. Archives are read member by member with ``tarfile``, never
extracted to disk.

``write_tiny_cifar_archive`` writes a small synthetic archive in exactly this format (Python-2
style string opcodes included), for tests and end-to-end runs of CIFAR configs.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from typing import Any, Mapping

import numpy as np

from growjax.data.splits import Dataset, Splits, stratified_split

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

_IMAGE_SHAPE_CHW = (3, 32, 32)
_ROW = 3 * 32 * 32


class _Layout:
  """File names of one CIFAR variant inside its archive."""

  def __init__(self, archive: str, folder: str, train: tuple[str, ...], test: str, meta: str,
               num_fine: int):
    self.archive, self.folder, self.train, self.test, self.meta = archive, folder, train, test, meta
    self.num_fine = num_fine

  @property
  def members(self) -> tuple[str, ...]:
    return self.train + (self.test, self.meta)


_LAYOUTS = {
    "cifar10": _Layout("cifar-10-python.tar.gz", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                       num_fine=10),
    "cifar100": _Layout("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta",
                        num_fine=100),
}
_NUM_COARSE = 20
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")

# The only globals a CIFAR batch references. ``_reconstruct`` is fetched from an array's own
# reduce tuple, so the same object serves the numpy-1 name (in the original Python-2 archives) and
# the numpy-2 name (in pickles written by numpy >= 2), without importing a private module.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("builtins", "__builtin__"):  # Python-2 pickles name the builtins module this way
  for _fn in (dict, list, bytes, str, int, float):
    _ALLOWED_GLOBALS[(_module, _fn.__name__)] = _fn


class _CifarUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals listed in ``_ALLOWED_GLOBALS``."""

  def __init__(self, file, source: str):
    super().__init__(file, encoding="bytes")  # Python-2 ``str`` -> bytes, as the format requires
    self._source = source

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refused global {module}.{name} in {self._source}: a CIFAR batch only needs numpy "
          "array reconstruction and plain builtins, so this file is not a genuine CIFAR pickle "
          f"(re-download it from {CIFAR_URL})") from None


def safe_unpickle(data: bytes, source: str = "<bytes>") -> Any:
  """Unpickles CIFAR-format bytes with the restricted unpickler (``encoding="bytes"``).

  Args:
    data: the pickle stream.
    source: a name for error messages (file or archive member).

  Returns:
    The unpickled object.

  Raises:
    pickle.UnpicklingError: the stream references a global outside the CIFAR allow-list.
  """
  return _CifarUnpickler(io.BytesIO(data), source).load()


def _check_variant(variant: str) -> _Layout:
  if variant not in _LAYOUTS:
    raise ValueError(f"variant={variant!r}; allowed: {sorted(_LAYOUTS)}.")
  return _LAYOUTS[variant]


def _missing(path: str, layout: _Layout, variant: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"No {variant} data at {path!r}. Expected the archive {layout.archive} or its extracted "
      f"folder {layout.folder}/ (with {', '.join(layout.members)}), given directly or inside "
      f"that directory. Download {layout.archive} (the python version) yourself from {CIFAR_URL} "
      "and pass its path; growjax never downloads data.")


def _read_members(path: str, variant: str) -> dict[str, bytes]:
  """Reads the raw bytes of every member ``variant`` needs from an archive or a folder."""
  layout = _check_variant(variant)
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, layout.meta)):
      # A parent directory: look for the extracted folder first, then the archive.
      if os.path.isdir(os.path.join(path, layout.folder)):
        path = os.path.join(path, layout.folder)
      elif os.path.isfile(os.path.join(path, layout.archive)):
        path = os.path.join(path, layout.archive)
      else:
        raise _missing(path, layout, variant)
  elif not os.path.isfile(path):
    raise _missing(path, layout, variant)

  if os.path.isdir(path):
    out = {}
    for name in layout.members:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise _missing(path, layout, variant) from FileNotFoundError(file)
      with open(file, "rb") as f:
        out[name] = f.read()
    return out

  wanted = {f"{layout.folder}/{name}": name for name in layout.members}
  out = {}
  try:
    # One sequential pass: seeking backwards in a gzip stream would re-decompress from the start.
    with tarfile.open(path, mode="r:*") as tar:
      for member in tar:
        name = wanted.get(member.name)
        if name is not None and member.isfile():
          out[name] = tar.extractfile(member).read()
  except tarfile.TarError as e:
    raise ValueError(f"{path!r} is not a readable tar archive ({e}); expected {layout.archive} "
                     f"from {CIFAR_URL}.") from e
  absent = [f"{layout.folder}/{n}" for n in layout.members if n not in out]
  if absent:
    raise FileNotFoundError(f"The archive {path!r} lacks {absent}; expected the {variant} "
                            f"python archive {layout.archive} from {CIFAR_URL}.")
  return out


def _parse_batch(raw: bytes, source: str, label_keys: tuple[bytes, ...],
                 num_classes: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
  """Unpickles one batch and validates it; returns uint8 images [n, 32, 32, 3] and label arrays."""
  batch = safe_unpickle(raw, source)
  if not isinstance(batch, dict):
    raise ValueError(f"{source}: expected a dict batch, got {type(batch).__name__}.")
  data = batch.get(b"data")
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
      data.shape[1] != _ROW):
    desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
            else type(data).__name__)
    raise ValueError(f"{source}: b'data' must be a uint8 array [n, {_ROW}], got {desc}.")
  n = data.shape[0]
  labels = []
  for key, k in zip(label_keys, num_classes):
    if key not in batch:
      raise ValueError(f"{source}: missing key {key!r}; present: {sorted(batch)}.")
    y = np.asarray(batch[key])
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (
        n and (y.min() < 0 or y.max() >= k)):
      raise ValueError(f"{source}: {key!r} must hold {n} integers in [0, {k}), got an array of "
                       f"shape {y.shape} and dtype {y.dtype}.")
    labels.append(y.astype(np.int32))
  # Rows are CHW (1024 R, 1024 G, 1024 B, each 32x32 row-major); growjax models take NHWC.
  images = data.reshape((n,) + _IMAGE_SHAPE_CHW).transpose(0, 2, 3, 1)
  return images, labels


def _label_setup(variant: str, label_mode: str) -> tuple[tuple[bytes, ...], tuple[int, ...], int]:
  """Keys to read, their class counts, and the index of the key used as ``y``."""
  if variant == "cifar10":
    if label_mode != "fine":
      raise ValueError(f"label_mode={label_mode!r} is only meaningful for cifar100; CIFAR-10 "
                       "has one label set: use label_mode='fine'.")
    return (b"labels",), (10,), 0
  if label_mode not in ("fine", "coarse"):
    raise ValueError(f"label_mode={label_mode!r}; allowed for cifar100: 'fine' (100 classes) or "
                     "'coarse' (20 superclasses).")
  return (b"fine_labels", b"coarse_labels"), (100, _NUM_COARSE), int(label_mode == "coarse")


def load_cifar(path: str | os.PathLike, variant: str = "cifar10", *, val_fraction: float = 0.1,
               seed: int = 0, label_mode: str = "fine", normalize: bool = False) -> Splits:
  """Loads CIFAR-10 or CIFAR-100 from a local archive or extracted folder.

  The official test set is kept as ``test``; ``val`` is a stratified, seeded sample of the
  official training set and ``train`` the rest.

  Args:
    path: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, the extracted folder
      (``cifar-10-batches-py/`` / ``cifar-100-python/``), or a directory containing either.
    variant: ``"cifar10"`` or ``"cifar100"``.
    val_fraction: fraction of the training set held out for validation (0 gives an empty val).
    seed: seed of the validation split.
    label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses) for CIFAR-100;
      ``"fine"`` for CIFAR-10.
    normalize: if True, subtract the per-channel mean and divide by the per-channel standard
      deviation of the ``train`` split (applied to all splits); else pixels stay in [0, 1].

  Returns:
    ``Splits`` whose ``x`` are float32 images [n, 32, 32, 3] (NHWC) and ``y`` int32 labels [n].

  Raises:
    FileNotFoundError: no archive/folder at ``path``; the message names the expected files and
      where to download them.
    pickle.UnpicklingError: a batch references a global a CIFAR file never needs.
    ValueError: bad arguments or malformed batches.
  """
  layout = _check_variant(variant)
  keys, counts, which = _label_setup(variant, label_mode)
  raw = _read_members(path, variant)
  parts = [_parse_batch(raw[name], f"{layout.folder}/{name}", keys, counts)
           for name in layout.train]
  x_train = np.concatenate([p[0] for p in parts])
  y_train = np.concatenate([p[1][which] for p in parts])
  x_test, y_test = _parse_batch(raw[layout.test], f"{layout.folder}/{layout.test}", keys, counts)
  y_test = y_test[which]
  num_classes = counts[which]
  # Split on uint8 images: a float32 CIFAR training set is 600 MB, so convert only once, after.
  split = stratified_split(x_train, y_train, num_classes=num_classes, seed=seed,
                           val_fraction=val_fraction, test_fraction=0.0, name=variant)

  def to_float(x):
    return x.astype(np.float32) / np.float32(255.0)

  train = Dataset(to_float(split.train.x), split.train.y)
  val = Dataset(to_float(split.val.x), split.val.y)
  test = Dataset(to_float(x_test), y_test)
  if normalize:
    mean, std = channel_mean_std(train.x)
    train, val, test = (Dataset((d.x - mean) / std, d.y) for d in (train, val, test))
  name = variant if variant == "cifar10" else f"{variant}_{label_mode}"
  return Splits(train, val, test, num_classes=num_classes, name=name)


def channel_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of NHWC images.

  Args:
    x: images [n, h, w, c].

  Returns:
    ``(mean, std)``, float32 arrays [c] (accumulated in float64).
  """
  flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return flat.mean(0).astype(np.float32), np.maximum(flat.std(0), 1e-12).astype(np.float32)


def cifar_label_names(path: str | os.PathLike, variant: str = "cifar10",
                      label_mode: str = "fine") -> list[str]:
  """Class names from the archive's meta file, in label order."""
  layout = _check_variant(variant)
  _label_setup(variant, label_mode)
  meta = safe_unpickle(_read_members(path, variant)[layout.meta], f"{layout.folder}/{layout.meta}")
  key = b"label_names" if variant == "cifar10" else label_mode.encode() + b"_label_names"
  return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


# ----------------------------------------------------------------------------------------------
# Writing a tiny archive in the real format.


class _Py2StylePickler(pickle._Pickler):  # pure-Python pickler: its dispatch table can be extended
  """Protocol-2 pickler writing ``bytes``/``str`` as Python-2 ``str`` (``BINSTRING``) opcodes.

  The original CIFAR files were pickled by Python 2, where byte strings are ``BINSTRING`` opcodes
  (decoded by ``encoding="bytes"``). Python 3's protocol 2 would instead write bytes as a call to
  the global ``_codecs.encode``, which a genuine file never contains and the restricted unpickler
  rightly refuses.
  """

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_py2_str(self, obj):
    raw = obj if isinstance(obj, bytes) else obj.encode("latin-1")
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
    self.memoize(obj)

  dispatch[bytes] = _save_py2_str
  dispatch[str] = _save_py2_str


def _py2_pickle(obj) -> bytes:
  buf = io.BytesIO()
  _Py2StylePickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _tiny_batches(variant: str, n_train: int, n_test: int, seed: int) -> dict[str, Mapping]:
  """Builds the batch dicts of a tiny archive; images depend on the class so they are learnable."""
  layout = _LAYOUTS[variant]
  rng = np.random.default_rng(seed)
  k = layout.num_fine
  templates = rng.integers(0, 256, size=(k, _ROW))
  # Fine -> coarse is a fixed map in the real CIFAR-100 (5 fine classes per superclass).
  coarse_of = rng.permutation(np.arange(k) % _NUM_COARSE)

  def balanced(n):
    return rng.permutation(np.arange(n) % k)  # balanced classes, so stratified splits work

  def make(fine, label):
    n = len(fine)
    noise = rng.integers(0, 256, size=(n, _ROW))
    data = ((templates[fine] + noise) // 2).astype(np.uint8)
    names = [f"tiny_{label.split()[0]}_{i:05d}.png".encode() for i in range(n)]
    d = {b"batch_label": label.encode(), b"data": data, b"filenames": names}
    if variant == "cifar10":
      d[b"labels"] = [int(v) for v in fine]
    else:
      d[b"fine_labels"] = [int(v) for v in fine]
      d[b"coarse_labels"] = [int(v) for v in coarse_of[fine]]
    return d

  out = {}
  if variant == "cifar10":
    parts = np.array_split(balanced(n_train), 5)
    for i, (name, fine) in enumerate(zip(layout.train, parts)):
      out[name] = make(fine, f"training batch {i + 1} of 5")
    out[layout.meta] = {b"num_cases_per_batch": max(len(p) for p in parts), b"num_vis": _ROW,
                        b"label_names": [s.encode() for s in _CIFAR10_NAMES]}
  else:
    out["train"] = make(balanced(n_train), "training batch 1 of 1")
    out[layout.meta] = {b"fine_label_names": [f"fine_{i:03d}".encode() for i in range(k)],
                        b"coarse_label_names": [f"coarse_{i:02d}".encode()
                                                for i in range(_NUM_COARSE)]}
  out[layout.test] = make(balanced(n_test), "testing batch 1 of 1")
  return out


def write_tiny_cifar_archive(path: str | os.PathLike, variant: str = "cifar10", n_train: int = 100,
                             n_test: int = 20, seed: int = 0, packed: bool = True) -> str:
  """Writes a small synthetic CIFAR archive in the real python-pickle format.

  Same member names, keys and layout as the real archive: uint8 ``b"data"`` rows of 3072 values in
  CHW order, ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``/``b"coarse_labels"`` (CIFAR-100),
  ``b"filenames"``, ``b"batch_label"`` and the meta file, pickled with Python-2 string opcodes.
  Images are the average of a per-class random template and noise, so classes are learnable.

  Args:
    path: directory to write into (created if missing).
    variant: ``"cifar10"`` or ``"cifar100"``.
    n_train: training images (split over the 5 CIFAR-10 training batches).
    n_test: test images.
    seed: seed of images and labels.
    packed: write ``<path>/cifar-10-python.tar.gz`` (resp. 100) if True, else the extracted
      folder ``<path>/cifar-10-batches-py/`` (resp. ``cifar-100-python/``).

  Returns:
    The path of the written archive or folder, ready for ``load_cifar``.
  """
  layout = _check_variant(variant)
  if n_train < 0 or n_test < 0:
    raise ValueError(f"n_train={n_train} and n_test={n_test} must be >= 0.")
  path = os.path.expanduser(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  files = {name: _py2_pickle(obj)
           for name, obj in _tiny_batches(variant, n_train, n_test, seed).items()}
  if not packed:
    folder = os.path.join(path, layout.folder)
    os.makedirs(folder, exist_ok=True)
    for name, raw in files.items():
      with open(os.path.join(folder, name), "wb") as f:
        f.write(raw)
    return folder
  archive = os.path.join(path, layout.archive)
  with tarfile.open(archive, "w:gz") as tar:
    info = tarfile.TarInfo(layout.folder)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)
    for name, raw in files.items():
      info = tarfile.TarInfo(f"{layout.folder}/{name}")
      info.size, info.mode = len(raw), 0o644
      tar.addfile(info, io.BytesIO(raw))
  return archive
