"""Tests for growjax.peft LoRA as a transform of pure apply functions.

Oracles: the untransformed apply function with explicitly written effective weights
(numpy ``W + s·a@b``), unrolled loops for ``lax.scan``, unsharded runs for sharded ones.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from growjax import peft, quant
from growjax import tree as gtree
from growjax.nets import MLP


@pytest.fixture(scope="module")
def mlp():
  # Layers hidden_0 [24, 32], hidden_1 [32, 32], head [32, 8].
  model = MLP(input_dim=24, widths=(32, 32), num_outputs=8, activation="gelu")
  x = jax.random.normal(jax.random.key(0), (16, 24))
  params = model.init(jax.random.key(1), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  return apply_fn, params, x


def _randomize_b(adapters, key):
  flat = gtree.flatten(adapters)
  out = {p: (jax.random.normal(jax.random.fold_in(key, i), v.shape) * 0.1 if p.endswith("/b") else v)
         for i, (p, v) in enumerate(flat.items())}
  return gtree.unflatten(out)


def test_zero_b_leaves_outputs_unchanged_and_scaling(mlp):
  apply_fn, params, x = mlp
  lo = peft.lora([peft.LoraTarget("hidden_0/kernel", rank=4, alpha=8.0),
                  peft.LoraTarget("kernel$", rank=2, alpha=3.0)], rslora=True)
  adapters = lo.init(jax.random.key(2), params)
  assert adapters["hidden_0"]["kernel"]["a"].shape == (24, 4)   # first matching target wins
  assert adapters["head"]["kernel"]["b"].shape == (2, 8)
  f = jax.jit(lo.apply(apply_fn))
  np.testing.assert_array_equal(np.asarray(f(params, adapters, x)),
                                np.asarray(jax.jit(apply_fn)(params, x)))
  # Non-zero b: equals the plain model with explicit W + s·a@b (rsLoRA s = α/√r).
  adapters = _randomize_b(adapters, jax.random.key(3))
  explicit = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  for name, (r, alpha) in {"hidden_0": (4, 8.0), "hidden_1": (2, 3.0), "head": (2, 3.0)}.items():
    ab = adapters[name]["kernel"]
    explicit[name]["kernel"] = explicit[name]["kernel"] + alpha / math.sqrt(r) * (
        np.asarray(ab["a"], np.float64) @ np.asarray(ab["b"], np.float64))
  expect = apply_fn(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), explicit), x)
  np.testing.assert_allclose(np.asarray(f(params, adapters, x)), np.asarray(expect), atol=2e-5)
  assert lo.sites(params)["hidden_1/kernel"].scale == 3.0 / math.sqrt(2)


def test_only_adapters_get_gradients_and_optimizer_state(mlp):
  apply_fn, params, x = mlp
  lo = peft.lora(peft.LoraTarget("kernel$", rank=4, alpha=4.0))
  adapters = lo.init(jax.random.key(2), params)
  loss = lambda p, ad: jnp.mean(lo.apply(apply_fn)(p, ad, x) ** 2)
  g_params, g_adapters = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, adapters)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_params))
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(
      jax.tree.map(lambda d: d["b"], g_adapters, is_leaf=lambda d: isinstance(d, dict) and "b" in d)))
  # lora.value_and_grad gives the same value and adapter gradients.
  value, g = jax.jit(lo.value_and_grad(lambda p, xb: jnp.mean(apply_fn(p, xb) ** 2)))(
      params, adapters, x)
  np.testing.assert_allclose(float(value), float(loss(params, adapters)), rtol=1e-6)
  for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_adapters)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
  assert jax.tree.structure(g) == jax.tree.structure(adapters)
  # Separate adapter tree: the optimizer state only holds adapter-shaped moments.
  tx = optax.adam(1e-2)
  state = tx.init(adapters)
  assert gtree.count(state) == 2 * gtree.count(adapters) + 1
  # Combined tree with optax masks: zero updates and no state for the base.
  combined = {"base": params, "lora": adapters}
  tx2 = peft.adapters_only(tx)
  state2 = tx2.init(combined)
  assert gtree.count(state2) == 2 * gtree.count(adapters) + 1
  grads = {"base": g_params, "lora": g_adapters}
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float ** int32
    updates, _ = tx2.update(jax.tree.map(lambda g: g + 1.0, grads), state2, combined)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["base"]))
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates["lora"]))


def test_merge_equals_transformed_call_and_unmerge_restores(mlp):
  apply_fn, params, x = mlp
  lo = peft.lora(peft.LoraTarget("hidden_[01]/kernel", rank=3, alpha=6.0))
  adapters = _randomize_b(lo.init(jax.random.key(4), params), jax.random.key(5))
  merged, report = lo.merge(params, adapters)
  np.testing.assert_allclose(np.asarray(apply_fn(merged, x)),
                             np.asarray(lo.apply(apply_fn)(params, adapters, x)), atol=1e-5)
  assert set(report) == {"hidden_0/kernel", "hidden_1/kernel"}
  assert all(float(r["rel_error"]) < 1e-6 and not r["quantized"] for r in report.values())
  restored, _ = lo.unmerge(merged, adapters)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_quantized_base_dequantized_on_the_fly_and_merge_error_reported(mlp):
  apply_fn, params, x = mlp
  qparams = quant.quantize_tree(params, "hidden_[01]/kernel", quant.QuantConfig("nf4", 32))
  lo = peft.lora(peft.LoraTarget("kernel$", rank=4, alpha=8.0))
  adapters = _randomize_b(lo.init(jax.random.key(6), qparams), jax.random.key(7))
  f = jax.jit(lo.apply(apply_fn))
  dense = quant.dequantize_tree(qparams)
  np.testing.assert_allclose(np.asarray(f(qparams, adapters, x)),
                             np.asarray(lo.apply(apply_fn)(dense, adapters, x)), atol=1e-6)
  merged, report = lo.merge(qparams, adapters)
  assert quant.is_quantized(merged["hidden_0"]["kernel"]) and not quant.is_quantized(merged["head"]["kernel"])
  for name in ("hidden_0", "hidden_1"):
    path, ab = f"{name}/kernel", adapters[name]["kernel"]
    target = np.asarray(dense[name]["kernel"]) + 2.0 * np.asarray(ab["a"] @ ab["b"])
    recon = np.asarray(quant.dequantize(merged[name]["kernel"]))
    rel = np.linalg.norm(recon - target) / np.linalg.norm(target)
    assert report[path]["quantized"] and np.isclose(float(report[path]["rel_error"]), rel, rtol=1e-4)
    assert 1e-3 < rel < 0.2  # re-quantizing at 4 bits introduces a visible, bounded error
  assert float(report["head/kernel"]["rel_error"]) < 1e-6


def test_dropout_masks_adapter_inputs_with_explicit_rng(mlp):
  apply_fn, params, x = mlp
  p = 0.5
  lo = peft.lora(peft.LoraTarget("hidden_1/kernel", rank=4, alpha=4.0), dropout=p)
  adapters = _randomize_b(lo.init(jax.random.key(8), params), jax.random.key(9))
  a, b = adapters["hidden_1"]["kernel"]["a"], adapters["hidden_1"]["kernel"]["b"]
  eff0 = lo.effective_params(params, adapters)  # no rng: no dropout
  np.testing.assert_allclose(np.asarray(eff0["hidden_1"]["kernel"] - params["hidden_1"]["kernel"]),
                             np.asarray(a @ b), atol=1e-6)
  eff1 = lo.effective_params(params, adapters, jax.random.key(10))
  eff2 = lo.effective_params(params, adapters, jax.random.key(11))
  delta = np.asarray(eff1["hidden_1"]["kernel"] - params["hidden_1"]["kernel"], np.float64)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  # Each input row of a is either dropped or scaled by 1/(1-p).
  kept = np.array([np.allclose(delta[i], a64[i] @ b64 / (1 - p), atol=1e-5) for i in range(32)])
  dropped = np.array([np.allclose(delta[i], 0.0, atol=1e-7) for i in range(32)])
  assert np.all(kept ^ dropped) and 0 < dropped.sum() < 32
  assert not np.allclose(np.asarray(eff1["hidden_1"]["kernel"]), np.asarray(eff2["hidden_1"]["kernel"]))
  out = jax.jit(lo.apply(apply_fn))(params, adapters, x, rng=jax.random.key(10))
  np.testing.assert_allclose(np.asarray(out), np.asarray(apply_fn(eff1, x)), atol=1e-6)


def _stacked_apply(p, x):
  def body(h, layer):
    return jnp.tanh(h @ layer["kernel"] + layer["bias"][None, :]), None
  return jax.lax.scan(body, x, p["layers"])[0] @ p["head"]["kernel"]


def test_scan_over_stacked_layers_vmap_and_quantized_stack():
  rng = np.random.default_rng(0)
  L, d = 3, 32
  params = {"layers": {"kernel": jnp.asarray(rng.standard_normal((L, d, d)) / 6, jnp.float32),
                       "bias": jnp.zeros((L, d))},
            "head": {"kernel": jnp.asarray(rng.standard_normal((d, 4)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((5, d)), jnp.float32)
  lo = peft.lora(peft.LoraTarget("layers/kernel", rank=4, alpha=4.0, batch_dims=1))
  adapters = _randomize_b(lo.init(jax.random.key(0), params), jax.random.key(1))
  assert adapters["layers"]["kernel"]["a"].shape == (L, d, 4)
  f = jax.jit(lo.apply(_stacked_apply))

  def unrolled(p, ad):
    h = x
    for i in range(L):
      w = p["layers"]["kernel"][i] + ad["layers"]["kernel"]["a"][i] @ ad["layers"]["kernel"]["b"][i]
      h = jnp.tanh(h @ w + p["layers"]["bias"][i][None, :])
    return h @ p["head"]["kernel"]

  np.testing.assert_allclose(np.asarray(f(params, adapters, x)), np.asarray(unrolled(params, adapters)),
                             atol=1e-5)
  # vmap over an ensemble of adapter sets.
  ens = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), adapters)
  out = jax.jit(jax.vmap(lo.apply(_stacked_apply), in_axes=(None, 0, None)))(params, ens, x)
  np.testing.assert_allclose(np.asarray(out[1]),
                             np.asarray(unrolled(params, jax.tree.map(lambda v: 2 * v, adapters))),
                             atol=1e-5)
  # A quantized stacked base (per-layer blocks) inside the scanned model, with gradients.
  qparams = quant.quantize_tree(params, "layers/kernel", quant.QuantConfig("nf4", 64),
                                batch_dims=1)
  dense = quant.dequantize_tree(qparams)
  np.testing.assert_allclose(np.asarray(f(qparams, adapters, x)), np.asarray(unrolled(dense, adapters)),
                             atol=1e-5)
  g = jax.jit(jax.grad(lambda ad: jnp.sum(f(qparams, ad, x) ** 2)))(adapters)
  g_ref = jax.grad(lambda ad: jnp.sum(unrolled(dense, ad) ** 2))(adapters)
  for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)


def test_sharded_train_step_matches_unsharded(mlp):
  apply_fn, params, x = mlp
  assert len(jax.devices()) >= 8
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  qparams = quant.quantize_tree(params, "hidden_0/kernel", quant.QuantConfig("nf4", 32))
  lo = peft.lora(peft.LoraTarget("kernel$", rank=4, alpha=8.0))
  adapters = _randomize_b(lo.init(jax.random.key(0), qparams), jax.random.key(1))
  y = jnp.arange(16) % 8
  tx = optax.adam(1e-2)

  def step(p, ad, opt, xb, yb):
    def loss(ad):
      logits = lo.apply(apply_fn)(p, ad, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    value, g = jax.value_and_grad(loss)(ad)
    updates, opt = tx.update(g, opt, ad)
    return optax.apply_updates(ad, updates), opt, value

  opt = tx.init(adapters)
  step = jax.jit(step)
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float ** int32
    ref = step(qparams, adapters, opt, x, y)
  # Batch over "data", dense kernels' output units over "model", the rest replicated.
  def place(path, v):
    if not hasattr(v, "ndim"):
      return v
    spec = P(None, "model") if (path.endswith("kernel") and v.ndim == 2) else P()
    return jax.device_put(v, NamedSharding(mesh, spec))
  sp = jax.tree_util.tree_map_with_path(lambda kp, v: place(gtree.path_str(kp), v), qparams)
  sx = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  sy = jax.device_put(y, NamedSharding(mesh, P("data")))
  with jax.numpy_dtype_promotion("standard"):
    out = step(sp, adapters, opt, sx, sy)
  assert len(sx.sharding.device_set) == 8
  for u, v in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_init_from_quantization_aware_init_over_a_tree():
  rng = np.random.default_rng(1)
  params = {"attn": {"query": {"kernel": jnp.asarray(rng.standard_normal((32, 2, 16)), jnp.float32)},
                     "out": {"kernel": jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)}},
            "layers": {"kernel": jnp.asarray(rng.standard_normal((2, 32, 32)), jnp.float32)}}
  lo = peft.lora([peft.LoraTarget("query/kernel", rank=4, alpha=8.0),
                  peft.LoraTarget("attn/out/kernel", rank=4, alpha=8.0, in_dims=2),
                  peft.LoraTarget("layers/kernel", rank=2, alpha=2.0, batch_dims=1)])
  qz = quant.quantizer("nf4", 32)
  qparams, adapters = lo.init_from(params, quant.loftq(1), qz, key=jax.random.key(0))
  assert adapters["attn"]["out"]["kernel"]["a"].shape == (32, 4)
  assert adapters["layers"]["kernel"]["b"].shape == (2, 2, 32)
  eff = lo.effective_params(qparams, adapters)
  for path in ("attn/query/kernel", "attn/out/kernel", "layers/kernel"):
    W, Q = gtree.get(params, path), gtree.get(quant.dequantize_tree(qparams), path)
    assert Q.shape == W.shape
    err_q = float(jnp.linalg.norm(W - Q))
    err_lora = float(jnp.linalg.norm(W - gtree.get(eff, path)))
    assert err_lora < err_q  # LoftQ's adapters cancel part of the quantization error
  # PiSSA with a float base reproduces the weights exactly.
  fparams, fad = lo.init_from(params, quant.pissa(), None, key=jax.random.key(0))
  for path in ("attn/query/kernel", "attn/out/kernel", "layers/kernel"):
    np.testing.assert_allclose(np.asarray(gtree.get(lo.effective_params(fparams, fad), path)),
                               np.asarray(gtree.get(params, path)), atol=1e-5)


def test_bad_inputs(mlp):
  apply_fn, params, x = mlp
  with pytest.raises(ValueError, match=r"LoRA rank 64 for 'head/kernel' must be in \[1, min"):
    peft.lora(peft.LoraTarget("head/kernel", rank=64)).init(jax.random.key(0), params)
  with pytest.raises(KeyError, match="Available paths"):
    peft.lora(peft.LoraTarget("no_such/kernel")).init(jax.random.key(0), params)
  with pytest.raises(TypeError, match="only floating kernels"):
    peft.lora(peft.LoraTarget("steps")).init(jax.random.key(0), {"steps": jnp.ones((4, 4), jnp.int32)})
  lo = peft.lora(peft.LoraTarget("hidden_0/kernel", rank=2))
  other = peft.lora(peft.LoraTarget("hidden_1/kernel", rank=2)).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="Adapters do not match"):
    lo.apply(apply_fn)(params, other, x)
  with pytest.raises(ValueError, match="at least 3 axes"):
    peft.lora(peft.LoraTarget("hidden_0/kernel", batch_dims=1)).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="dropout"):
    peft.lora(peft.LoraTarget("hidden_0/kernel"), dropout=1.0)
