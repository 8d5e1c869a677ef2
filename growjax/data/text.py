"""Embedded text corpora (no download), byte-level and BPE tokenizers, language-model windows.

Two domains ship with every Python installation, which makes them useful for learn-vs-forget
studies (fine-tune on one, measure the other):

* ``"prose"``: English prose of the standard library's own documentation, the help topics in
  ``pydoc_data.topics.topics`` (one document per topic, sorted by topic name).
* ``"code"``: Python source of the standard library (``.py`` files under
  ``sysconfig.get_paths()["stdlib"]`` in sorted path order, without test folders, site-packages,
  the machine-specific ``_sysconfigdata*`` and ``pydoc_data``, which is the prose domain).

Both are bounded by ``max_bytes`` and cached in memory per process (never on disk).

The tokenizer is byte-level BPE in the style of GPT-2 (Radford et al., 2019) after Sennrich,
Haddow & Birch (2016), "Neural Machine Translation of Rare Words with Subword Units",
arXiv:1508.07909: ids 0..255 are bytes, each merge adds one id, special tokens come last. With no
merges it is the plain byte-level tokenizer. Text is first split by a regular expression into
chunks (words with their leading space, digit runs, punctuation runs, whitespace) that merges never
cross; encode/decode round-trips exactly.

Language-model data are contiguous token windows [n, seq_len + 1] (inputs ``w[:, :-1]``, targets
``w[:, 1:]``), split into train/val/test by document, never by window, so no text is shared across
splits.
"""

from __future__ import annotations

import collections
import functools
import heapq
import json
import os
import re
import sysconfig
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from growjax.data.splits import Dataset, Splits

DOMAINS = ("prose", "code")
DEFAULT_MAX_BYTES = 1_000_000

# Chunks merges may not cross: letters (with one leading space), digits, punctuation (underscore
# included, since ``\w`` contains it), whitespace (the last space of a run joins the next word).
# Every character falls in some alternative, so the chunks concatenate back to the text.
DEFAULT_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__", "pydoc_data"})


class Document(NamedTuple):
  """One document of a corpus: a stable ``name`` (``"prose:<topic>"``, ``"code:<path>"``)."""
  name: str
  text: str


@functools.lru_cache(maxsize=16)
def _prose_documents(max_bytes: int) -> tuple[Document, ...]:
  from pydoc_data.topics import topics  # local: a 0.5 MB module, loaded only when asked for

  docs, total = [], 0
  for key in sorted(topics):
    size = len(topics[key].encode("utf-8"))
    if total + size > max_bytes:
      continue
    docs.append(Document(f"prose:{key}", topics[key]))
    total += size
  return tuple(docs)


@functools.lru_cache(maxsize=16)
def _code_documents(max_bytes: int) -> tuple[Document, ...]:
  root = sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise FileNotFoundError(f"The standard library folder {root!r} (sysconfig stdlib path) does "
                            "not exist, so the 'code' corpus is unavailable in this Python.")
  candidates = []
  for folder, dirs, files in os.walk(root):
    # Prune in place so os.walk never descends into (large) site-packages or test suites.
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-")]
    for f in files:
      if f.endswith(".py") and not f.startswith("_sysconfigdata"):
        full = os.path.join(folder, f)
        candidates.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
  docs, total = [], 0
  for rel, full in sorted(candidates):
    size = os.path.getsize(full)
    if size == 0 or total + size > max_bytes:
      continue  # skip what does not fit; smaller later files may still fit the budget
    with open(full, "rb") as fh:
      raw = fh.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue
    docs.append(Document(f"code:{rel}", text))
    total += size
  return tuple(docs)


def load_documents(domain: str, max_bytes: int | None = DEFAULT_MAX_BYTES) -> tuple[Document, ...]:
  """The documents of an embedded corpus, in a deterministic order, at most ``max_bytes`` of UTF-8.

  Whole documents are kept or skipped (never cut), in order, while they fit the budget. Cached per
  process.

  Args:
    domain: ``"prose"`` (standard-library documentation topics) or ``"code"`` (standard-library
      Python source).
    max_bytes: budget in UTF-8 bytes; None for the whole corpus (about 0.5 MB of prose, 12 MB of
      code).

  Returns:
    A tuple of ``Document(name, text)``.
  """
  if domain not in DOMAINS:
    raise ValueError(f"domain={domain!r}; allowed: {DOMAINS}.")
  if max_bytes is not None and max_bytes < 0:
    raise ValueError(f"max_bytes={max_bytes} must be >= 0 (or None for no limit).")
  budget = 1 << 62 if max_bytes is None else int(max_bytes)
  return (_prose_documents if domain == "prose" else _code_documents)(budget)


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
  """Replaces each non-overlapping ``pair`` in ``ids`` (left to right) by ``new_id``."""
  out, i, n = [], 0, len(ids)
  while i < n:
    if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
      out.append(new_id)
      i += 2
    else:
      out.append(ids[i])
      i += 1
  return out


class Tokenizer:
  """Byte-level BPE tokenizer: ids 0..255 bytes, ``256 + i`` merge ``i``, then special tokens.

  Immutable apart from an encode cache of chunk -> ids. Build it with ``byte_tokenizer`` (no
  merges) or ``train_bpe``; persist with ``save`` / ``load_tokenizer``.

  Attributes:
    merges: pairs of ids ``(a, b)``; merge ``i`` creates id ``256 + i``.
    special_tokens: strings whose ids follow the merges (e.g. ``"<eos>"``, added between
      documents); ``encode`` never produces them from text.
    pattern: the pre-tokenization regular expression.
  """

  _CACHE_LIMIT = 200_000

  def __init__(self, merges: Sequence[tuple[int, int]] = (),
               special_tokens: Sequence[str] = ("<eos>",), pattern: str = DEFAULT_PATTERN):
    self.merges = tuple((int(a), int(b)) for a, b in merges)
    self.special_tokens = tuple(special_tokens)
    self.pattern = pattern
    if len(set(self.special_tokens)) != len(self.special_tokens):
      raise ValueError(f"special_tokens={self.special_tokens} has duplicates.")
    pieces = [bytes([i]) for i in range(256)]
    for i, (a, b) in enumerate(self.merges):
      if not (0 <= a < 256 + i and 0 <= b < 256 + i):
        raise ValueError(f"merge {i} = ({a}, {b}) refers to an id that does not exist yet "
                         f"(ids before it are 0..{256 + i - 1}).")
      pieces.append(pieces[a] + pieces[b])
    self._pieces = pieces
    self._ranks = {pair: i for i, pair in enumerate(self.merges)}
    self._regex = re.compile(pattern)
    self._cache: dict[str, tuple[int, ...]] = {}

  @property
  def vocab_size(self) -> int:
    return 256 + len(self.merges) + len(self.special_tokens)

  def special_id(self, token: str) -> int:
    """The id of a special token."""
    if token not in self.special_tokens:
      raise KeyError(f"{token!r} is not a special token; this tokenizer has "
                     f"{self.special_tokens}.")
    return 256 + len(self.merges) + self.special_tokens.index(token)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={self.special_tokens})")

  def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
    ids = list(chunk.encode("utf-8"))
    ranks = self._ranks
    while len(ids) > 1:
      # Apply the earliest-learned merge present, as training did (GPT-2's rule).
      best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
      rank = ranks.get(best)
      if rank is None:
        break
      ids = _merge_pair(ids, best, 256 + rank)
    return tuple(ids)

  def encode(self, text: str) -> np.ndarray:
    """Token ids [n] (int32) of ``text``."""
    if not self.merges:
      return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    cache, out = self._cache, []
    if len(cache) > self._CACHE_LIMIT:
      cache.clear()
    for chunk in self._regex.findall(text):
      ids = cache.get(chunk)
      if ids is None:
        ids = cache[chunk] = self._encode_chunk(chunk)
      out.extend(ids)
    return np.asarray(out, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of token ids [n]; special tokens appear as their strings.

    Invalid UTF-8 (a window cut inside a multi-byte character) is replaced by U+FFFD; the ids of a
    whole ``encode`` always decode to the original text.
    """
    n_base, parts, buf = len(self._pieces), [], bytearray()
    for t in np.asarray(ids).reshape(-1).tolist():
      if 0 <= t < n_base:
        buf += self._pieces[t]
      elif n_base <= t < self.vocab_size:
        parts.append(buf.decode("utf-8", errors="replace"))
        parts.append(self.special_tokens[t - n_base])
        buf = bytearray()
      else:
        raise ValueError(f"token id {t} is outside the vocabulary [0, {self.vocab_size}).")
    parts.append(buf.decode("utf-8", errors="replace"))
    return "".join(parts)

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes a (non-special) token stands for."""
    return self._pieces[token_id]

  def to_json(self) -> dict:
    return {"format": "growjax.tokenizer", "version": 1, "merges": [list(m) for m in self.merges],
            "special_tokens": list(self.special_tokens), "pattern": self.pattern}

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer as JSON."""
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer written by ``Tokenizer.save``."""
  with open(path, encoding="utf-8") as f:
    d = json.load(f)
  if not isinstance(d, dict) or d.get("format") != "growjax.tokenizer":
    raise ValueError(f"{path!r} is not a growjax tokenizer file (expected a JSON object with "
                     "format='growjax.tokenizer', written by Tokenizer.save).")
  return Tokenizer([tuple(m) for m in d["merges"]], d["special_tokens"], d["pattern"])


def byte_tokenizer(special_tokens: Sequence[str] = ("<eos>",)) -> Tokenizer:
  """The byte-level tokenizer: vocabulary 256 + ``len(special_tokens)``."""
  return Tokenizer((), special_tokens)


def train_bpe(texts: Sequence[str], vocab_size: int, *,
              special_tokens: Sequence[str] = ("<eos>",), pattern: str = DEFAULT_PATTERN,
              min_frequency: int = 2) -> Tokenizer:
  """Learns byte-level BPE merges on ``texts``, deterministically.

  Each step merges the most frequent adjacent pair of ids within chunks (ties: the smallest pair).
  Pair counts are updated incrementally, touching only chunks that contain the merged pair.

  Args:
    texts: training documents.
    vocab_size: total vocabulary size including the 256 bytes and the special tokens.
    special_tokens: special tokens (see ``Tokenizer``).
    pattern: pre-tokenization regular expression.
    min_frequency: stop early when the best pair occurs fewer times (the vocabulary may then be
      smaller than ``vocab_size``).

  Returns:
    The trained ``Tokenizer``.
  """
  n_merges = vocab_size - 256 - len(special_tokens)
  if n_merges < 0:
    raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(special_tokens)} special "
                     f"tokens = {256 + len(special_tokens)}.")
  regex = re.compile(pattern)
  counts = collections.Counter()
  for text in texts:
    counts.update(regex.findall(text))
  # Sorted so ids (and tie-breaks through set iteration order) never depend on hash seeds.
  words = [list(chunk.encode("utf-8")) for chunk in sorted(counts)]
  freqs = [counts[chunk] for chunk in sorted(counts)]
  pair_counts: dict[tuple[int, int], int] = collections.defaultdict(int)
  where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
  for i, (w, f) in enumerate(zip(words, freqs)):
    for pair in zip(w, w[1:]):
      pair_counts[pair] += f
      where[pair].add(i)
  heap = [(-c, p) for p, c in pair_counts.items()]
  heapq.heapify(heap)
  merges = []
  while len(merges) < n_merges and heap:
    neg, pair = heapq.heappop(heap)
    if pair_counts.get(pair, 0) != -neg:
      continue  # stale heap entry: the count changed after it was pushed
    if -neg < min_frequency:
      break
    new_id = 256 + len(merges)
    merges.append(pair)
    changed = set()
    # ``where`` may list chunks that lost the pair since; they merge to themselves (no change).
    for i in sorted(where.pop(pair)):
      w, f = words[i], freqs[i]
      out = _merge_pair(w, pair, new_id)
      if len(out) == len(w):
        continue
      for q in zip(w, w[1:]):
        pair_counts[q] -= f
        changed.add(q)
      for q in zip(out, out[1:]):
        pair_counts[q] += f
        where[q].add(i)
        changed.add(q)
      words[i] = out
    pair_counts.pop(pair, None)
    changed.discard(pair)
    for q in changed:
      c = pair_counts[q]
      if c > 0:
        heapq.heappush(heap, (-c, q))
      else:
        del pair_counts[q]
  return Tokenizer(merges, special_tokens, pattern)


# ----------------------------------------------------------------------------------------------
# Language-model datasets.


class LMSplits(NamedTuple):
  """Language-model data split by document.

  Attributes:
    train: windows [n_train, seq_len + 1] (int32); inputs ``w[:, :-1]``, targets ``w[:, 1:]``.
    val: windows [n_val, seq_len + 1].
    test: windows [n_test, seq_len + 1].
    heldout: windows of the held-out domain [n_heldout, seq_len + 1] ([0, seq_len + 1] if none).
    streams: the 1-D token stream of each split (``"train"``, ``"val"``, ``"test"``,
      ``"heldout"``): its documents' tokens, each followed by ``<eos>`` when the tokenizer has it.
    documents: the document names of each split, in stream order.
    tokenizer: the tokenizer used.
    seq_len: window length (inputs).
    name: e.g. ``"text_prose"``.
  """
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  heldout: np.ndarray
  streams: dict[str, np.ndarray]
  documents: dict[str, tuple[str, ...]]
  tokenizer: Tokenizer
  seq_len: int
  name: str


def lm_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows [n, seq_len + 1] of a token stream [t] (stride ``seq_len``).

  Consecutive windows share one token (the last target of one is the first input of the next), so
  every token after the first is a target exactly once. A trailing remainder is dropped.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  stream = np.asarray(stream, np.int32).reshape(-1)
  n = max(0, (stream.shape[0] - 1) // seq_len)
  starts = np.arange(n) * seq_len
  return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def random_windows(stream: np.ndarray, seq_len: int, batch_size: int, *, seed: int = 0,
                   steps: int | None = None) -> Iterator[np.ndarray]:
  """Yields batches of windows [batch_size, seq_len + 1] at uniformly random offsets of ``stream``.

  Args:
    stream: token stream [t] (e.g. ``LMSplits.streams["train"]``).
    seq_len: input length of each window.
    batch_size: windows per batch.
    seed: seed of the offsets (same seed, same batches).
    steps: number of batches; None for an endless iterator.
  """
  stream = np.asarray(stream, np.int32).reshape(-1)
  if stream.shape[0] < seq_len + 1:
    raise ValueError(f"The stream has {stream.shape[0]} tokens, fewer than seq_len + 1 = "
                     f"{seq_len + 1}; lower seq_len or raise max_bytes.")
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)[None, :]
  step = 0
  while steps is None or step < steps:
    starts = rng.integers(0, stream.shape[0] - seq_len, size=(batch_size, 1))
    yield stream[starts + offsets]
    step += 1


def _split_documents(n: int, val_fraction: float, test_fraction: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Document indices of each split (sorted); a positive fraction gets at least one document."""
  order = rng.permutation(n)
  counts = {}
  for key, frac in (("val", val_fraction), ("test", test_fraction)):
    counts[key] = max(1, int(round(frac * n))) if frac > 0 else 0
  if counts["val"] + counts["test"] >= n:
    raise ValueError(f"{n} documents cannot give val_fraction={val_fraction} and test_fraction="
                     f"{test_fraction} with at least one training document; raise max_bytes or "
                     "lower the fractions.")
  val = order[:counts["val"]]
  test = order[counts["val"]:counts["val"] + counts["test"]]
  train = order[counts["val"] + counts["test"]:]
  return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _stream(docs: Sequence[Document], tokenizer: Tokenizer) -> np.ndarray:
  eos = ([tokenizer.special_id("<eos>")] if "<eos>" in tokenizer.special_tokens else [])
  parts = []
  for d in docs:
    parts.append(tokenizer.encode(d.text))
    parts.append(np.asarray(eos, np.int32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def load_text_lm(domains: str | Sequence[str] = ("prose",), *, tokenizer: Tokenizer | None = None,
                 seq_len: int = 128, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 heldout_domain: str | None = None, seed: int = 0) -> LMSplits:
  """Language-model windows of the embedded corpora, split by document.

  Each domain's documents are split separately (so every split holds every domain), then the
  splits' streams are concatenated in domain order.

  Args:
    domains: one or more of ``DOMAINS``.
    tokenizer: default ``byte_tokenizer()``. A BPE tokenizer may be trained on
      ``load_documents(...)`` beforehand (train it on training documents only to avoid leakage).
    seq_len: window length (inputs); windows carry one more token for the targets.
    max_bytes: UTF-8 budget per domain (see ``load_documents``).
    val_fraction: fraction of documents held out for validation.
    test_fraction: fraction of documents held out for testing.
    heldout_domain: a domain outside ``domains`` whose documents (all of them, within
      ``max_bytes``) fill ``heldout``, e.g. to measure forgetting or transfer.
    seed: seed of the document split.

  Returns:
    ``LMSplits``.
  """
  domains = (domains,) if isinstance(domains, str) else tuple(domains)
  if not domains or any(d not in DOMAINS for d in domains) or len(set(domains)) != len(domains):
    raise ValueError(f"domains={domains}; allowed: distinct entries of {DOMAINS}.")
  if heldout_domain is not None and (heldout_domain not in DOMAINS or heldout_domain in domains):
    raise ValueError(f"heldout_domain={heldout_domain!r} must be a domain of {DOMAINS} not in "
                     f"domains={domains}.")
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
    raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in "
                     "[0, 1).")
  tokenizer = byte_tokenizer() if tokenizer is None else tokenizer
  rng = np.random.default_rng(seed)
  split_docs: dict[str, list[Document]] = {"train": [], "val": [], "test": [], "heldout": []}
  for domain in domains:
    docs = load_documents(domain, max_bytes)
    for key, idx in _split_documents(len(docs), val_fraction, test_fraction, rng).items():
      split_docs[key].extend(docs[i] for i in idx)
  if heldout_domain is not None:
    split_docs["heldout"] = list(load_documents(heldout_domain, max_bytes))
  streams = {key: _stream(docs, tokenizer) for key, docs in split_docs.items()}
  windows = {key: lm_windows(s, seq_len) for key, s in streams.items()}
  name = "text_" + "+".join(domains)
  return LMSplits(windows["train"], windows["val"], windows["test"], windows["heldout"], streams,
                  {key: tuple(d.name for d in docs) for key, docs in split_docs.items()},
                  tokenizer, seq_len, name)


def lm_as_splits(lm: LMSplits) -> Splits:
  """Views ``LMSplits`` as ``Splits`` for the generic loop: ``x`` = ``w[:, :-1]``, ``y`` =
  ``w[:, 1:]`` (both [n, seq_len] int32 views, no copy), ``num_classes`` = vocabulary size."""

  def ds(w):
    return Dataset(w[:, :-1], w[:, 1:])

  return Splits(ds(lm.train), ds(lm.val), ds(lm.test), num_classes=lm.tokenizer.vocab_size,
                name=lm.name)
