"""Tests of growjax.data: CIFAR archives (format, pixel layout, restricted unpickling), teacher-
student data, embedded text corpora, tokenizers and language-model splits."""

import collections
import io
import os
import pickle
import pickletools
import sysconfig
import tarfile

import jax
import numpy as np
import pytest

from growjax import data
from growjax.data import cifar as cifar_mod
from growjax.data import text as text_mod

# ------------------------------------------------------------------------------------------------
# CIFAR


def _raw_batch(archive_or_folder, member):
  """Reads one batch with the plain (unrestricted) pickle module: the files are our own."""
  if os.path.isdir(archive_or_folder):
    with open(os.path.join(archive_or_folder, member.split("/")[-1]), "rb") as f:
      raw = f.read()
  else:
    with tarfile.open(archive_or_folder, "r:gz") as tar:
      raw = tar.extractfile(member).read()
  return raw, pickle.loads(raw, encoding="bytes")


def test_tiny_cifar10_archive_has_the_real_format(tmp_path):
  archive = data.write_tiny_cifar_archive(tmp_path, "cifar10", n_train=53, n_test=7, seed=1)
  assert os.path.basename(archive) == "cifar-10-python.tar.gz"
  with tarfile.open(archive, "r:gz") as tar:
    names = set(tar.getnames())
  expected = {f"cifar-10-batches-py/{n}" for n in
              ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta"]}
  assert expected <= names
  total = 0
  for i in range(1, 6):
    raw, batch = _raw_batch(archive, f"cifar-10-batches-py/data_batch_{i}")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape[1] == 3072
    assert isinstance(batch[b"labels"], list) and len(batch[b"labels"]) == len(batch[b"data"])
    assert batch[b"batch_label"] == f"training batch {i} of 5".encode()
    total += len(batch[b"labels"])
    # Python-2 style stream: only the globals a genuine CIFAR file has (no _codecs.encode).
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_ <= {"numpy._core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert any(op.name == "SHORT_BINSTRING" for op, _, _ in pickletools.genops(raw))
  assert total == 53
  _, meta = _raw_batch(archive, "cifar-10-batches-py/batches.meta")
  assert meta[b"label_names"][0] == b"airplane" and len(meta[b"label_names"]) == 10
  assert data.cifar_label_names(archive)[9] == "truck"


def test_cifar10_pixel_layout_against_hand_computed_chw_index(tmp_path):
  archive = data.write_tiny_cifar_archive(tmp_path, "cifar10", n_train=60, n_test=9, seed=2)
  _, test_batch = _raw_batch(archive, "cifar-10-batches-py/test_batch")
  splits = data.load_cifar(archive, "cifar10", val_fraction=0.2, seed=0)
  assert splits.num_classes == 10 and splits.name == "cifar10"
  assert splits.test.x.shape == (9, 32, 32, 3) and splits.test.x.dtype == np.float32
  assert splits.test.y.dtype == np.int32
  assert len(splits.train) + len(splits.val) == 60 and len(splits.val) == 10
  rows = test_batch[b"data"]
  # Row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major.
  for i, r, c, ch in [(0, 0, 0, 0), (3, 5, 17, 1), (8, 31, 2, 2), (4, 31, 31, 2), (1, 0, 31, 1)]:
    assert splits.test.x[i, r, c, ch] == np.float32(rows[i, ch * 1024 + r * 32 + c]) / 255.0
  np.testing.assert_array_equal(splits.test.y, np.asarray(test_batch[b"labels"]))
  assert splits.test.x.min() >= 0.0 and splits.test.x.max() <= 1.0
  # Train + val is a permutation of the five training batches, labels travelling with images.
  originals = []
  for k in range(1, 6):
    _, b = _raw_batch(archive, f"cifar-10-batches-py/data_batch_{k}")
    originals += [(bytes(row), y) for row, y in zip(b[b"data"], b[b"labels"])]
  loaded = []
  for ds in (splits.train, splits.val):
    u8 = np.round(ds.x * 255).astype(np.uint8).transpose(0, 3, 1, 2).reshape(len(ds), 3072)
    loaded += [(bytes(row), int(y)) for row, y in zip(u8, ds.y)]
  assert sorted(loaded) == sorted(originals)


def test_cifar100_folder_fine_and_coarse(tmp_path):
  folder = data.write_tiny_cifar_archive(tmp_path, "cifar100", n_train=400, n_test=100, seed=3,
                                         packed=False)
  assert os.path.basename(folder) == "cifar-100-python"
  assert sorted(os.listdir(folder)) == ["meta", "test", "train"]
  _, raw_test = _raw_batch(folder, "test")
  assert {b"fine_labels", b"coarse_labels", b"data", b"filenames", b"batch_label"} == set(raw_test)
  fine = data.load_cifar(folder, "cifar100", label_mode="fine", val_fraction=0.25)
  coarse = data.load_cifar(tmp_path, "cifar100", label_mode="coarse", val_fraction=0.25)
  assert (fine.num_classes, coarse.num_classes) == (100, 20)
  assert fine.train.x.shape == (300, 32, 32, 3) and fine.val.x.shape == (100, 32, 32, 3)
  np.testing.assert_array_equal(fine.test.y, raw_test[b"fine_labels"])
  np.testing.assert_array_equal(coarse.test.y, raw_test[b"coarse_labels"])
  np.testing.assert_array_equal(fine.test.x, coarse.test.x)
  # As in the real CIFAR-100, each fine class lies in exactly one superclass.
  pairs = set(zip(fine.test.y.tolist(), coarse.test.y.tolist()))
  assert len({f for f, _ in pairs}) == len(pairs) == 100
  # Stratified by the label in use: the coarse val split holds every superclass equally.
  np.testing.assert_array_equal(np.bincount(coarse.val.y, minlength=20), np.full(20, 5))
  assert len(data.cifar_label_names(folder, "cifar100", "coarse")) == 20


def test_cifar_normalize_uses_train_channel_statistics(tmp_path):
  archive = data.write_tiny_cifar_archive(tmp_path, "cifar10", n_train=50, n_test=10)
  plain = data.load_cifar(archive, val_fraction=0.2)
  norm = data.load_cifar(archive, val_fraction=0.2, normalize=True)
  flat = plain.train.x.reshape(-1, 3).astype(np.float64)
  mean, std = flat.mean(0), flat.std(0)
  np.testing.assert_allclose(norm.train.x.reshape(-1, 3).mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(norm.train.x.reshape(-1, 3).std(0), 1.0, atol=1e-4)
  np.testing.assert_allclose(norm.test.x, (plain.test.x - mean) / std, atol=1e-5)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_malicious_global_and_never_runs_it(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=4)
  with pytest.raises(pickle.UnpicklingError, match=r"refused global (posix|os|nt)\.system"):
    data.safe_unpickle(payload, "evil")
  assert not marker.exists()
  # The same payload inside an otherwise genuine archive is refused by load_cifar.
  folder = data.write_tiny_cifar_archive(tmp_path, "cifar10", n_train=10, n_test=5, packed=False)
  with open(os.path.join(folder, "data_batch_3"), "wb") as f:
    f.write(payload)
  with pytest.raises(pickle.UnpicklingError, match="data_batch_3"):
    data.load_cifar(folder)
  assert not marker.exists()
  # Other code-running globals are refused too, and so is Python 3's _codecs.encode.
  for obj in (collections.OrderedDict(a=1), b"abc"):
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
      data.safe_unpickle(pickle.dumps(obj, protocol=2))
  # Plain stdlib pickle.loads would have run it: the refusal is the unpickler's doing.
  pickle.loads(payload)
  assert marker.exists()


def test_restricted_unpickler_accepts_numpy1_module_name(tmp_path):
  raw = cifar_mod._py2_pickle({b"data": np.arange(3072, dtype=np.uint8)[None, :] % 7,
                               b"labels": [4]})
  legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert legacy != raw
  out = data.safe_unpickle(legacy)
  np.testing.assert_array_equal(out[b"data"], np.arange(3072, dtype=np.uint8)[None, :] % 7)


def test_cifar_missing_path_names_expected_files_and_url(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.load_cifar(tmp_path / "nowhere", "cifar10")
  msg = str(e.value)
  assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg
  assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "nowhere" in msg
  with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
    data.load_cifar(tmp_path, "cifar100")
  # An archive that lacks a member names it.
  bad = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(bad, "w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"abc"))
  with pytest.raises(FileNotFoundError, match="data_batch_1"):
    data.load_cifar(bad)


def test_cifar_bad_arguments(tmp_path):
  archive = data.write_tiny_cifar_archive(tmp_path, "cifar10", n_train=10, n_test=5)
  with pytest.raises(ValueError, match="variant='cifar1000'"):
    data.load_cifar(archive, "cifar1000")
  with pytest.raises(ValueError, match="only meaningful for cifar100"):
    data.load_cifar(archive, "cifar10", label_mode="coarse")
  with pytest.raises(ValueError, match="label_mode='medium'"):
    data.load_cifar(tmp_path, "cifar100", label_mode="medium")


# ------------------------------------------------------------------------------------------------
# Teacher-student


def _forward(teacher, x):
  """Independent forward pass of the returned teacher parameters (numpy, float64)."""
  h = x.astype(np.float64)
  for i, (w, b) in enumerate(zip(teacher.kernels, teacher.biases)):
    h = np.einsum("ni,io->no", h, w) + b
    if i < len(teacher.kernels) - 1:
      h = np.tanh(h) if teacher.activation == "tanh" else np.where(h > 0, h, 0.0)
  return h


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_teacher_student_labels_are_teacher_argmax(activation):
  ts = data.load_teacher_student((6, 12, 9, 4), activation=activation, n_train=300, n_val=50,
                                 n_test=40, seed=5)
  s, teacher = ts.splits, ts.teacher
  assert [k.shape for k in teacher.kernels] == [(6, 12), (12, 9), (9, 4)]
  assert s.num_classes == 4 and s.train.x.dtype == np.float32 and s.train.y.dtype == np.int32
  assert (len(s.train), len(s.val), len(s.test)) == (300, 50, 40)
  for ds in (s.train, s.val, s.test):
    np.testing.assert_array_equal(ds.y, np.argmax(_forward(teacher, ds.x), axis=1))
  assert len(np.unique(s.train.y)) == 4  # balanced output bias: no class is empty


def test_teacher_student_is_deterministic_and_streams_are_independent():
  a = data.load_teacher_student((5, 8, 3), n_train=100, seed=1)
  b = data.load_teacher_student((5, 8, 3), n_train=100, seed=1)
  c = data.load_teacher_student((5, 8, 3), n_train=200, seed=1)
  d = data.load_teacher_student((5, 8, 3), n_train=100, seed=2)
  np.testing.assert_array_equal(a.splits.train.x, b.splits.train.x)
  np.testing.assert_array_equal(a.splits.test.y, b.splits.test.y)
  for ka, kc in zip(a.teacher.kernels, c.teacher.kernels):
    np.testing.assert_array_equal(ka, kc)
  np.testing.assert_array_equal(a.splits.train.x, c.splits.train.x[:100])
  assert not np.array_equal(a.teacher.kernels[0], d.teacher.kernels[0])


def test_teacher_student_sampled_labels_follow_softmax():
  cold = data.load_teacher_student((4, 8, 3), labels="sample", temperature=1e-6, n_train=500,
                                   seed=3)
  np.testing.assert_array_equal(cold.splits.train.y,
                                np.argmax(_forward(cold.teacher, cold.splits.train.x), 1))
  warm = data.load_teacher_student((4, 8, 3), labels="sample", temperature=2.0, n_train=20000,
                                   n_val=0, n_test=0, seed=3)
  z = _forward(warm.teacher, warm.splits.train.x) / 2.0
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  freq = np.bincount(warm.splits.train.y, minlength=3) / 20000
  expected = p.mean(0)
  # Multinomial standard error is below 0.0036 here: 4 sigma.
  np.testing.assert_allclose(freq, expected, atol=0.015)
  assert not np.array_equal(warm.splits.train.y, np.argmax(z, 1))


def test_teacher_student_regression_noise():
  ts = data.load_teacher_student((5, 7, 2), task="regression", noise_std=0.25, n_train=4000,
                                 seed=4)
  assert ts.splits.num_classes == 0 and ts.splits.train.y.shape == (4000, 2)
  resid = ts.splits.train.y - _forward(ts.teacher, ts.splits.train.x)
  assert abs(resid.std() - 0.25) < 0.01 and abs(resid.mean()) < 0.01


def test_teacher_gelu_matches_jax():
  x = np.linspace(-5, 5, 101)
  np.testing.assert_allclose(data.synthetic.ACTIVATIONS["gelu"](x),
                             np.asarray(jax.nn.gelu(x.astype(np.float32))), atol=1e-6)


def test_teacher_student_bad_arguments():
  with pytest.raises(ValueError, match="activation='swish'"):
    data.make_teacher((3, 2), "swish")
  with pytest.raises(ValueError, match="widths"):
    data.make_teacher((3,))
  with pytest.raises(ValueError, match="task='ranking'"):
    data.load_teacher_student(task="ranking")
  with pytest.raises(ValueError, match="temperature"):
    data.load_teacher_student(labels="sample", temperature=0.0)


# ------------------------------------------------------------------------------------------------
# Text corpora and tokenizers


def test_corpora_are_deterministic_bounded_and_clean():
  from pydoc_data.topics import topics

  prose = data.load_documents("prose", max_bytes=None)
  assert [d.name for d in prose] == [f"prose:{k}" for k in sorted(topics)]
  assert prose[0].text == topics[sorted(topics)[0]]
  code = data.load_documents("code", max_bytes=300_000)
  assert code is data.load_documents("code", max_bytes=300_000)  # cached per process
  assert sum(len(d.text.encode()) for d in code) <= 300_000 and len(code) > 5
  names = [d.name for d in code]
  assert names == sorted(names) and len(set(names)) == len(names)
  root = sysconfig.get_paths()["stdlib"]
  for d in code:
    rel = d.name.removeprefix("code:")
    parts = rel.split("/")
    assert not {"test", "tests", "site-packages", "idle_test", "pydoc_data"} & set(parts)
    with open(os.path.join(root, *parts), encoding="utf-8") as f:
      assert f.read() == d.text
  small = data.load_documents("prose", max_bytes=20_000)
  assert 0 < sum(len(d.text.encode()) for d in small) <= 20_000
  with pytest.raises(ValueError, match="domain='poetry'"):
    data.load_documents("poetry")


def test_byte_tokenizer_round_trip():
  tok = data.byte_tokenizer(("<eos>", "<pad>"))
  assert tok.vocab_size == 258 and tok.special_id("<pad>") == 257
  s = "naïve café — 漢字 🙂\tx = {'a': 1}\n"
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and len(ids) == len(s.encode("utf-8"))
  assert tok.decode(ids) == s
  assert tok.decode(np.concatenate([ids, [256]])) == s + "<eos>"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([999])


def _naive_bpe(texts, n_merges, pattern):
  """Oracle: recount every pair from scratch at each step; same tie-break (smallest pair)."""
  import re

  words = collections.Counter()
  for t in texts:
    words.update(re.findall(pattern, t))
  seqs = {w: list(w.encode("utf-8")) for w in words}
  merges = []
  for step in range(n_merges):
    counts = collections.Counter()
    for w, seq in seqs.items():
      for p in zip(seq, seq[1:]):
        counts[p] += words[w]
    if not counts:
      break
    best = min(counts, key=lambda p: (-counts[p], p))
    if counts[best] < 2:
      break
    merges.append(best)
    for w, seq in seqs.items():
      out, i = [], 0
      while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
          out.append(256 + step)
          i += 2
        else:
          out.append(seq[i])
          i += 1
      seqs[w] = out
  return merges


def test_bpe_training_matches_naive_recount():
  docs = [d.text for d in data.load_documents("prose", max_bytes=40_000)]
  tok = data.train_bpe(docs, vocab_size=256 + 120 + 1)
  assert len(tok.merges) == 120 and tok.vocab_size == 377
  assert list(tok.merges) == _naive_bpe(docs, 120, text_mod.DEFAULT_PATTERN)


def test_bpe_round_trip_compression_and_json(tmp_path):
  prose = data.load_documents("prose", max_bytes=None)
  code = data.load_documents("code", max_bytes=200_000)
  train_docs = [d.text for d in prose[::2]]
  tok = data.train_bpe(train_docs, vocab_size=800, special_tokens=("<eos>",))
  assert tok.vocab_size == 800 and tok.special_id("<eos>") == 799
  unicode = "naïve café — 漢字 🙂  x_y__z\r\n"
  samples = [d.text for d in prose[1::2]] + [code[0].text, unicode]
  byte_tok = data.byte_tokenizer()
  for s in samples:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert ids.max() < 799
  held_out = "".join(d.text for d in prose[1::2])
  n_bpe, n_bytes = len(tok.encode(held_out)), len(byte_tok.encode(held_out))
  assert n_bpe < 0.6 * n_bytes  # merges learnt on half the topics compress the other half
  # Each merged token is the concatenation of its parts.
  a, b = tok.merges[0]
  assert tok.token_bytes(256) == tok.token_bytes(a) + tok.token_bytes(b)
  path = tmp_path / "tok.json"
  tok.save(path)
  loaded = data.load_tokenizer(path)
  assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
  np.testing.assert_array_equal(loaded.encode(held_out[:5000]), tok.encode(held_out[:5000]))
  (tmp_path / "other.json").write_text('{"merges": []}')
  with pytest.raises(ValueError, match="not a growjax tokenizer"):
    data.load_tokenizer(tmp_path / "other.json")
  with pytest.raises(ValueError, match="vocab_size=200"):
    data.train_bpe(train_docs, vocab_size=200)


def test_pretokenizer_covers_every_character():
  import re

  for domain in data.DOMAINS:
    text = "".join(d.text for d in data.load_documents(domain, max_bytes=300_000))
    assert "".join(re.findall(text_mod.DEFAULT_PATTERN, text)) == text


# ------------------------------------------------------------------------------------------------
# Language-model splits


def test_lm_splits_by_document_without_overlap():
  lm = data.load_text_lm("prose", seq_len=32, max_bytes=None, val_fraction=0.1,
                         test_fraction=0.1, heldout_domain="code", seed=7)
  prose = data.load_documents("prose", max_bytes=None)
  docs = {k: set(v) for k, v in lm.documents.items()}
  assert not docs["train"] & docs["val"] and not docs["train"] & docs["test"]
  assert not docs["val"] & docs["test"]
  assert docs["train"] | docs["val"] | docs["test"] == {d.name for d in prose}
  assert len(docs["val"]) == round(0.1 * len(prose))
  assert all(n.startswith("code:") for n in lm.documents["heldout"]) and docs["heldout"]
  # Each stream is exactly its documents, each followed by <eos>.
  by_name = {d.name: d.text for d in prose}
  assert lm.tokenizer.decode(lm.streams["val"]) == "".join(
      by_name[n] + "<eos>" for n in lm.documents["val"])
  # Windows: [n, seq_len + 1], stride seq_len slices of the stream.
  for key in ("train", "val", "test", "heldout"):
    w, s = getattr(lm, key), lm.streams[key]
    assert w.shape == ((len(s) - 1) // 32, 33) and w.dtype == np.int32
    np.testing.assert_array_equal(w[1], s[32:65])
    np.testing.assert_array_equal(w[:-1, -1], w[1:, 0])
  # Different seed, different (but again disjoint) assignment.
  other = data.load_text_lm("prose", seq_len=32, max_bytes=None, seed=8)
  assert set(other.documents["val"]) != docs["val"]
  s = data.lm_as_splits(lm)
  assert s.train.x.shape == (len(lm.train), 32) and s.num_classes == 257
  np.testing.assert_array_equal(s.train.y[:, :-1], s.train.x[:, 1:])


def test_lm_two_domains_and_bpe_tokenizer():
  prose = data.load_documents("prose", max_bytes=100_000)
  tok = data.train_bpe([d.text for d in prose], vocab_size=400)
  lm = data.load_text_lm(("prose", "code"), tokenizer=tok, seq_len=16, max_bytes=100_000,
                         seed=1)
  for key in ("train", "val", "test"):
    domains = {n.split(":")[0] for n in lm.documents[key]}
    assert domains == {"prose", "code"}
  assert lm.heldout.shape == (0, 17) and lm.train.max() < tok.vocab_size
  with pytest.raises(ValueError, match="heldout_domain='prose'"):
    data.load_text_lm("prose", heldout_domain="prose")


def test_random_windows_are_seeded_stream_slices():
  stream = np.arange(1000, dtype=np.int32) * 3
  a = list(data.random_windows(stream, 10, 4, seed=3, steps=5))
  b = list(data.random_windows(stream, 10, 4, seed=3, steps=5))
  assert len(a) == 5 and all(x.shape == (4, 11) for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for row in np.concatenate(a):
    start = row[0] // 3
    np.testing.assert_array_equal(row, stream[start:start + 11])
  c = next(data.random_windows(stream, 10, 4, seed=4))
  assert not np.array_equal(a[0], c)
  with pytest.raises(ValueError, match="fewer than seq_len"):
    next(data.random_windows(stream[:5], 10, 2))
