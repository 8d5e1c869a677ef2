"""growjax.train: state across growth, trace counting, checkpoints, data parallelism, the loop."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from growjax import data, morph, nets, train, tree


def _digits_state(model, tx, seed=0):
  return train.create_state(nets.common.host_init(model, jax.random.key(seed)), tx)


def _batch(n=64, image=False, seed=0):
  d = data.load_digits(image=image)
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(d.train), n, replace=False)
  return d.train.x[idx], d.train.y[idx]


def test_adam_state_is_carried_across_growth():
  model = nets.MLP(widths=(6,))
  tx = optax.adam(1e-2)
  step = jax.jit(train.make_train_step(tx), static_argnums=0)
  state = _digits_state(model, tx)
  batch = _batch()
  for _ in range(3):
    state, _ = step(model, state, batch)
  grown_model, variables, rec = morph.add_units(model, state.variables(), "hidden_0", 3,
                                                rng=jax.random.key(1))
  grown = train.regrow_state(state, variables, tx)
  old_mu, new_mu = state.opt_state[0].mu, grown.opt_state[0].mu
  old_nu, new_nu = state.opt_state[0].nu, grown.opt_state[0].nu
  for old, new in ((old_mu, new_mu), (old_nu, new_nu)):
    k_old, k_new = old["hidden_0"]["kernel"], new["hidden_0"]["kernel"]
    assert k_new.shape == (64, 9)
    np.testing.assert_array_equal(k_new[:, :6], k_old)
    np.testing.assert_array_equal(k_new[:, 6:], 0.0)
    h_old, h_new = old["head"]["kernel"], new["head"]["kernel"]
    assert h_new.shape == (9, 10)
    np.testing.assert_array_equal(h_new[:6], h_old)
    np.testing.assert_array_equal(h_new[6:], 0.0)
  assert int(grown.opt_state[0].count) == 3
  # Same tree structure and shapes as a fresh optimizer state for the grown params.
  chex.assert_trees_all_equal_shapes(grown.opt_state, tx.init(variables["params"]))
  assert rec["new_width"] == 9


def test_step_retraces_once_per_growth_not_per_step():
  model = nets.MLP(widths=(5,))
  tx = optax.sgd(0.1)
  counted = chex.assert_max_traces(train.make_train_step(tx), n=2)
  step = jax.jit(counted, static_argnums=0)
  state = _digits_state(model, tx)
  batch = _batch()
  for _ in range(4):
    state, _ = step(model, state, batch)
  model, variables, _ = morph.add_units(model, state.variables(), "hidden_0", 2,
                                        rng=jax.random.key(0))
  state = train.regrow_state(state, variables, tx)
  for _ in range(4):
    state, _ = step(model, state, batch)  # second trace: allowed
  model, variables, _ = morph.add_units(model, state.variables(), "hidden_0", 2,
                                        rng=jax.random.key(0))
  state = train.regrow_state(state, variables, tx)
  with pytest.raises(AssertionError, match="traced > 2 times"):
    step(model, state, batch)  # a third model would be a third trace
  chex.clear_trace_counter()


def test_checkpoint_restores_a_grown_network_exactly(tmp_path):
  model = nets.ConvNet(channels=(4, 6))
  tx = optax.adam(1e-3)
  step = jax.jit(train.make_train_step(tx), static_argnums=0)
  state = _digits_state(model, tx)
  batch = _batch(image=True)
  state, _ = step(model, state, batch)
  ckpt = train.Checkpointer(tmp_path / "ckpt")
  history = [{"op": "seed"}]
  ckpt.save(1, model, state, history)
  model, variables, rec = morph.add_units(model, state.variables(), "conv_0", 3,
                                          rng=jax.random.key(0))
  state = train.regrow_state(state, variables, tx)
  state, _ = step(model, state, batch)
  history.append(rec)
  ckpt.save(2, model, state, history, extra={"note": "grown"})
  ckpt.close()

  restored_model, restored, restored_history, extra = train.Checkpointer(
      tmp_path / "ckpt").restore(tx)
  assert restored_model == model and restored_model.channels == (7, 6)
  assert restored_history == history and extra == {"note": "grown"}
  chex.assert_trees_all_equal(restored, state)
  # The restored state keeps training with the same numbers.
  a, _ = step(model, state, batch)
  b, _ = step(restored_model, restored, batch)
  chex.assert_trees_all_close(a.params, b.params, atol=0, rtol=0)
  # An older step restores the pre-growth network.
  old_model, old_state, old_history, _ = train.Checkpointer(tmp_path / "ckpt").restore(tx, 1)
  assert old_model.channels == (4, 6) and old_history == [{"op": "seed"}]
  assert old_state.params["conv_0"]["kernel"].shape == (3, 3, 1, 4)


def test_crash_during_save_leaves_previous_checkpoint_restorable(tmp_path, monkeypatch):
  model = nets.MLP(widths=(4,))
  tx = optax.adam(1e-3)
  state = _digits_state(model, tx)
  ckpt = train.Checkpointer(tmp_path)
  ckpt.save(1, model, state, [{"op": "seed"}])
  grown_model, variables, rec = morph.add_units(model, state.variables(), "hidden_0", 2,
                                                rng=jax.random.key(0))
  grown = train.regrow_state(state, variables, tx)
  real_rename = os.rename

  def crash(src, dst, *args, **kwargs):
    # Crash at the commit of step 2, after its arrays and metadata have been written.
    if os.path.basename(os.fspath(dst)) == "2":
      raise OSError("simulated crash during save")
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "rename", crash)
  with pytest.raises(Exception, match="simulated crash"):
    ckpt.save(2, grown_model, grown, [{"op": "seed"}, rec])
  monkeypatch.setattr(os, "rename", real_rename)
  fresh = train.Checkpointer(tmp_path)
  assert fresh.latest_step() == 1
  restored_model, restored, history, _ = fresh.restore(tx)
  assert restored_model == model and history == [{"op": "seed"}]
  chex.assert_trees_all_equal(restored, state)
  with pytest.raises(FileNotFoundError, match="available steps: \\[1\\]"):
    fresh.restore(tx, step=2)


def test_data_parallel_step_matches_single_device():
  assert len(jax.devices()) == 8
  model = nets.ConvNet(channels=(4, 6), dense_widths=(8,))
  tx = optax.adam(1e-2)
  step = jax.jit(train.make_train_step(tx), static_argnums=0)
  state = _digits_state(model, tx)
  batch = _batch(n=64, image=True)
  mesh = train.make_mesh()
  single, sharded = state, train.replicate(state, mesh)
  for _ in range(3):
    single, m1 = step(model, single, batch)
    sharded, m8 = step(model, sharded, train.shard_batch(batch, mesh))
  assert len(sharded.params["conv_0"]["kernel"].sharding.device_set) == 8
  chex.assert_trees_all_close(jax.device_get(sharded.params), jax.device_get(single.params),
                              atol=1e-5)
  chex.assert_trees_all_close(jax.device_get(sharded.model_state),
                              jax.device_get(single.model_state), atol=1e-5)
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), atol=1e-5)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    train.shard_batch((batch[0][:60], batch[1][:60]), mesh)


def test_fit_grows_logs_checkpoints_and_resumes(tmp_path):
  splits = data.load_digits()
  model = nets.MLP(widths=(6,))
  tx = optax.adam(3e-3)
  trainer = train.make_trainer(tx)

  def hook(step, model, state):
    if step == 40:
      m, v, rec = morph.add_units(model, state.variables(), "hidden_0", 4,
                                  rng=jax.random.key(step))
      return train.Growth(m, v, [rec])
    return None

  res = train.fit(model, _digits_state(model, tx), trainer, splits, steps=60, batch_size=32,
                  workdir=tmp_path, eval_every=30, log_every=20, growth_hook=hook,
                  mesh=train.make_mesh())
  assert res.model.widths == (10,)
  kinds = [r["kind"] for r in train.read_jsonl(tmp_path / "train.jsonl")]
  assert kinds.count("growth") == 1 and kinds.count("eval") == 2
  assert os.path.exists(tmp_path / "train_curves.png")
  assert [r["op"] for r in res.history] == ["add_units"]
  # Resume: the grown model and its state come back from the workdir and training continues.
  model2, state2, history2 = train.restore_or_create(tmp_path, model, lambda: None, tx)
  assert model2 == res.model and int(state2.step) == 60 and history2 == res.history
  res2 = train.fit(model2, state2, trainer, splits, steps=80, batch_size=32, workdir=tmp_path,
                   eval_every=20, history=history2)
  assert int(res2.state.step) == 80
  final = [r for r in res2.metrics if r["kind"] == "eval"][-1]
  assert final["val_accuracy"] > 0.5


def test_fit_bad_input():
  splits = data.load_digits()
  model = nets.MLP(widths=(4,))
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="batch_size=5000 exceeds"):
    train.fit(model, _digits_state(model, tx), train.make_trainer(tx), splits, steps=2,
              batch_size=5000)
