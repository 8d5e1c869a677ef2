"""Adapter-only LoRA checkpoints (growjax.peft.save_adapters / load_adapters).

Oracles: the in-memory adapters and the outputs of the LoRA-transformed model before saving; the
byte count of the adapter arrays versus the files on disk (only adapters may be stored).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import peft, quant
from growjax import tree as gtree
from growjax.nets import Transformer

TARGETS = (peft.LoraTarget(r"(query|value)/kernel$", rank=2, alpha=4.0),
           peft.LoraTarget(r"(^|/)out/kernel$", rank=3, alpha=3.0, in_dims=2))


@pytest.fixture(scope="module")
def setup():
  model = Transformer(vocab_size=64, max_len=16, d_model=64, num_layers=2, num_heads=4,
                      head_dim=16, mlp_dim=256)
  params = model.init_variables(jax.random.key(0))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  lo = peft.lora(TARGETS, rslora=True)
  adapters = lo.init(jax.random.key(1), params)
  # Non-zero b, so the adapters change the outputs and a lost or swapped array would show.
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                          adapters)
  x = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)
  return model, params, apply_fn, lo, adapters, x


def _disk_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_round_trip_reproduces_outputs_and_stores_only_adapters(setup, tmp_path):
  _, params, apply_fn, lo, adapters, x = setup
  path = peft.save_adapters(tmp_path / "ckpt", adapters,
                            {"targets": TARGETS, "rslora": True, "step": 7, "base": "tiny"})
  restored, meta = peft.load_adapters(path)
  assert gtree.paths(restored) == gtree.paths(adapters)
  for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta["targets"] == TARGETS and meta["rslora"] and meta["step"] == 7
  lo2 = peft.lora_from_meta(meta)
  before = jax.jit(lo.apply(apply_fn))(params, adapters, x)
  after = jax.jit(lo2.apply(apply_fn))(params, restored, x)
  np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  assert not np.allclose(np.asarray(before), np.asarray(apply_fn(params, x)), atol=1e-3)
  # Size: the checkpoint holds the adapters (plus fixed orbax metadata), not the base.
  adapter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters))
  base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  disk = _disk_bytes(path)
  assert adapter_bytes <= disk < adapter_bytes + 48 * 1024, (disk, adapter_bytes)
  assert disk < base_bytes / 4, (disk, base_bytes)


def test_round_trip_onto_a_quantized_base(setup, tmp_path):
  _, params, apply_fn, lo, adapters, x = setup
  qparams = quant.quantize_tree(params, r"(query|value|out)/kernel$")
  peft.save_adapters(tmp_path / "q", adapters, {"targets": TARGETS, "rslora": True})
  restored, meta = peft.load_adapters(tmp_path / "q")
  f = jax.jit(peft.lora_from_meta(meta).apply(apply_fn))
  np.testing.assert_array_equal(np.asarray(f(qparams, restored, x)),
                                np.asarray(jax.jit(lo.apply(apply_fn))(qparams, adapters, x)))


def test_bad_input_is_a_clear_error(setup, tmp_path):
  _, params, _, _, adapters, _ = setup
  with pytest.raises(ValueError, match="targets"):
    peft.save_adapters(tmp_path / "a", adapters, {"rslora": True})
  with pytest.raises(ValueError, match="adapters only"):
    peft.save_adapters(tmp_path / "b", {"lora": adapters, "base": params}, {"targets": TARGETS})
  with pytest.raises(ValueError, match="rank 2"):
    peft.save_adapters(tmp_path / "c", adapters,
                       {"targets": peft.LoraTarget(r"kernel$", rank=2, in_dims=2)})
  peft.save_adapters(tmp_path / "d", adapters, {"targets": TARGETS})
  with pytest.raises(FileExistsError, match="overwrite"):
    peft.save_adapters(tmp_path / "d", adapters, {"targets": TARGETS})
  peft.save_adapters(tmp_path / "d", adapters, {"targets": TARGETS}, overwrite=True)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    peft.load_adapters(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a growjax adapter checkpoint"):
    peft.load_adapters(tmp_path / "empty")
