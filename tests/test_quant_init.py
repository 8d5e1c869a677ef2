"""Tests for the quantization-aware LoRA initialisations and calibration capture (growjax.quant).

Oracles: the Eckart–Young theorem (numpy SVD, numpy Cholesky) for the closed-form QuAILoRA optimum
and truncated SVDs; explicit activations of a flax model for the captured Gram matrices.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import quant
from growjax import tree as gtree
from growjax.data import load_digits
from growjax.nets import MLP


def _problem(seed=0, d_in=48, d_out=40, rows=300):
  rng = np.random.default_rng(seed)
  W = rng.standard_normal((d_in, d_out)) * 0.05
  X = rng.standard_normal((rows, d_in)) @ (np.eye(d_in) + 0.3 * rng.standard_normal((d_in, d_in)))
  X[:, 3] *= 10.0  # an outlier input feature, as in transformer activations
  return W, X.T @ X


def test_quailora_als_reaches_closed_form_optimum():
  with jax.enable_x64(True):
    W, G = _problem()
    qz = quant.quantizer("nf3", 16)
    ctx = quant.InitContext(rank=4, scale=2.0, gram=jnp.asarray(G))
    Q, a_cf, b_cf = jax.jit(lambda w, c: quant.quailora("closed_form")(w, qz, c))(W, ctx)
    Q2, a_als, b_als = jax.jit(lambda w, c: quant.quailora("als", iters=50)(w, qz, c))(W, ctx)
    Wq = qz.dequantize(Q)
    np.testing.assert_array_equal(np.asarray(Wq), np.asarray(qz.dequantize(Q2)))
    H = quant.damped_gram(jnp.asarray(G), 48, 1e-2)
    e_cf = float(quant.calibrated_error(W, Wq, a_cf, b_cf, 2.0, H))
    e_als = float(quant.calibrated_error(W, Wq, a_als, b_als, 2.0, H))
    assert abs(e_als - e_cf) <= 1e-4 * e_cf
    # Eckart–Young oracle in numpy: the optimum is the tail energy of R·E, H = RᵀR.
    E = W - np.asarray(Wq)
    R = np.linalg.cholesky(np.asarray(H)).T
    sv = np.linalg.svd(R @ E, compute_uv=False)
    assert np.isclose(e_cf, np.sum(sv[4:] ** 2), rtol=1e-9)


def test_loftq1_and_pissa_are_truncated_svds():
  with jax.enable_x64(True):
    W, _ = _problem(1)
    qz = quant.quantizer("nf4", 16)
    ctx = quant.InitContext(rank=5, scale=0.5)
    Q, a, b = quant.loftq(1)(jnp.asarray(W), qz, ctx)
    E = W - np.asarray(qz.dequantize(Q))
    u, s, vt = np.linalg.svd(E)
    np.testing.assert_allclose(0.5 * np.asarray(a @ b), (u[:, :5] * s[:5]) @ vt[:5], atol=1e-12)
    # PiSSA without quantization: adapters = top-5 part, base = exact residual.
    R, a, b = quant.pissa()(jnp.asarray(W), None, ctx)
    u, s, vt = np.linalg.svd(W)
    top = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(0.5 * np.asarray(a @ b), top, atol=1e-12)
    np.testing.assert_allclose(np.asarray(R), W - top, atol=1e-12)
    # QPiSSA: the base is the quantized residual.
    Qp, a, b = quant.pissa()(jnp.asarray(W), qz, ctx)
    resid = W - 0.5 * np.asarray(a @ b)
    np.testing.assert_array_equal(np.asarray(qz.dequantize(Qp)),
                                  np.asarray(qz.dequantize(qz.quantize(jnp.asarray(resid)))))
    # More LoftQ rounds never do worse than plain QLoRA in Frobenius norm.
    Q5, a5, b5 = quant.loftq(5)(jnp.asarray(W), qz, ctx)
    err5 = np.linalg.norm(W - np.asarray(qz.dequantize(Q5)) - 0.5 * np.asarray(a5 @ b5))
    assert err5 < np.linalg.norm(W - np.asarray(qz.dequantize(qz.quantize(jnp.asarray(W)))))


def test_qlora_init():
  W = jnp.asarray(np.random.default_rng(2).standard_normal((64, 32)), jnp.float32)
  qz = quant.quantizer("nf4")
  Q, a, b = jax.jit(lambda w, c: quant.qlora()(w, qz, c))(
      W, quant.InitContext(rank=8, key=jax.random.key(0)))
  np.testing.assert_array_equal(np.asarray(Q.codes), np.asarray(qz.quantize(W).codes))
  assert a.shape == (64, 8) and b.shape == (8, 32) and not np.any(np.asarray(b))
  assert float(jnp.max(jnp.abs(a))) <= 1 / 8 and float(jnp.std(a)) > 0.03


def test_weighted_low_rank_is_optimal_for_its_weights():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    M = rng.standard_normal((30, 20))
    r, c = rng.uniform(0.2, 3.0, 30), rng.uniform(0.2, 3.0, 20)
    A, B = quant.low_rank(jnp.asarray(M), 4, jnp.asarray(r), jnp.asarray(c))
    err = np.sum((r[:, None] * (M - np.asarray(A @ B)) * c[None, :]) ** 2)
    sv = np.linalg.svd(r[:, None] * M * c[None, :], compute_uv=False)
    assert np.isclose(err, np.sum(sv[4:] ** 2), rtol=1e-10)
    A1, B1 = quant.low_rank(jnp.asarray(M), 4, jnp.full(30, 2.0), jnp.full(20, 0.5))
    A0, B0 = quant.low_rank(jnp.asarray(M), 4)
    np.testing.assert_allclose(np.asarray(A1 @ B1), np.asarray(A0 @ B0), atol=1e-12)


def test_calibrated_error_ordering_quailora_loftq_qlora():
  """On real calibration inputs (digits) through a flax MLP: QuAILoRA ≤ LoftQ-1 ≤ QLoRA."""
  x = jnp.asarray(load_digits().train.x[:512], jnp.float32).reshape(512, -1)
  # Square [64, 64] kernels: one compilation per initialisation serves every layer.
  model = MLP(input_dim=64, widths=(64, 64), num_outputs=64)
  variables = {"params": model.init(jax.random.key(0), x[:2])["params"]}
  cap = quant.gram_capture(model)
  state = cap.init(variables, x[:128])
  step = jax.jit(cap.update)
  for i in range(0, 512, 128):
    state = step(state, variables, x[i:i + 128])
  qz = quant.quantizer("nf3", 32)
  params = variables["params"]
  inits = {name: jax.jit(lambda w, c, fn=fn: fn(w, qz, c)) for name, fn in [
      ("qlora", quant.qlora()), ("loftq1", quant.loftq(1)),
      ("quailora", quant.quailora(damping=1e-3))]}
  error = jax.jit(lambda w, q, a, b, g: quant.calibrated_error(w, qz.dequantize(q), a, b, 2.0, g))
  for path, gram in state.grams.items():
    W = gtree.get(params, path)
    ctx = quant.InitContext(rank=4, scale=2.0, key=jax.random.key(1), gram=gram)
    errs = {name: float(error(W, *fn(W, ctx), gram)) for name, fn in inits.items()}
    assert errs["quailora"] <= errs["loftq1"] <= errs["qlora"], (path, errs)
    assert errs["quailora"] < 0.9 * errs["qlora"], (path, errs)


def test_init_bad_inputs():
  W = jnp.ones((16, 8))
  qz = quant.quantizer("nf4", 16)
  with pytest.raises(ValueError, match=r"rank=9 must be an integer in \[1, min\(d_in, d_out\)\]"):
    quant.loftq()(W, qz, quant.InitContext(rank=9))
  with pytest.raises(ValueError, match=r"must be \[d_in, d_in\] = \[16, 16\]"):
    quant.quailora()(W, qz, quant.InitContext(rank=2, gram=jnp.eye(8)))
  with pytest.raises(ValueError, match="context.gram"):
    quant.quailora()(W, qz, quant.InitContext(rank=2))
  with pytest.raises(TypeError, match="floating-point"):
    quant.pissa()(jnp.ones((16, 8), jnp.int32), None, quant.InitContext(rank=2))
  with pytest.raises(ValueError, match="Quantizer"):
    quant.qlora()(W, None, quant.InitContext(rank=2, key=jax.random.key(0)))
  with pytest.raises(ValueError, match="2-D kernel"):
    quant.loftq()(jnp.ones((2, 16, 8)), qz, quant.InitContext(rank=2))


class _Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(12, name="shared")
    h = shared(x)
    h = shared(h[..., :x.shape[-1]])  # the same layer called twice: both calls are captured
    q = nn.DenseGeneral((2, 3), name="query")(h)                 # kernel [12, 2, 3]
    return nn.DenseGeneral(5, axis=(-2, -1), name="out")(q)      # kernel [2, 3, 5]


def test_gram_capture_matches_explicit_activations():
  rng = np.random.default_rng(4)
  xs = [jnp.asarray(rng.standard_normal((3, 7, 12)), jnp.float32) for _ in range(3)]
  model = _Attn()
  variables = model.init(jax.random.key(0), xs[0])
  p = variables["params"]
  cap = quant.gram_capture(model)
  state = cap.init(variables, xs[0])
  assert set(state.grams) == {"shared/kernel", "query/kernel", "out/kernel"}
  assert set(state.grams) <= set(gtree.paths(p))
  step = jax.jit(cap.update)
  for x in xs:
    state = step(state, variables, x)
  expect = {"shared/kernel": 0, "query/kernel": 0, "out/kernel": 0}
  for x in xs:  # explicit forward pass in numpy float64
    x = np.asarray(x, np.float64)
    ks = {k: np.asarray(gtree.get(p, k), np.float64) for k in expect}
    bs = {k: np.asarray(gtree.get(p, k.replace("kernel", "bias")), np.float64) for k in expect}
    h1 = x @ ks["shared/kernel"] + bs["shared/kernel"]
    h2in = h1[..., :12]
    h2 = h2in @ ks["shared/kernel"] + bs["shared/kernel"]
    q = np.einsum("btd,dhe->bthe", h2, ks["query/kernel"]) + bs["query/kernel"]
    rows = lambda a, d: a.reshape(-1, d)
    expect["shared/kernel"] += rows(x, 12).T @ rows(x, 12) + rows(h2in, 12).T @ rows(h2in, 12)
    expect["query/kernel"] += rows(h2, 12).T @ rows(h2, 12)
    expect["out/kernel"] += rows(q, 6).T @ rows(q, 6)
  for k, g in expect.items():
    np.testing.assert_allclose(np.asarray(state.grams[k]), g, rtol=2e-5, atol=1e-3)
  assert int(state.counts["shared/kernel"]) == 2 * 3 * 21 and int(state.counts["out/kernel"]) == 63
  norm = quant.normalized(state)
  np.testing.assert_allclose(np.asarray(norm["out/kernel"]), expect["out/kernel"] / 63, rtol=2e-5,
                             atol=1e-4)
