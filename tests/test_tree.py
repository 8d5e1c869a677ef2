"""growjax.tree: key paths, masks, get/set and transplant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from growjax import tree


def _params():
  return {"params": {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)},
                     "head": {"kernel": jnp.ones((3, 2))}}}


def test_flatten_unflatten_round_trip_and_paths():
  p = _params()
  flat = tree.flatten(p)
  assert list(flat) == ["params/dense/bias", "params/dense/kernel", "params/head/kernel"]
  back = tree.unflatten(flat)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), back, p))


def test_get_and_set_with_clear_errors():
  p = _params()
  np.testing.assert_array_equal(tree.get(p, "params/head/kernel"), jnp.ones((3, 2)))
  with pytest.raises(KeyError, match="params/dense/kernel"):
    tree.get(p, "params/dense/kernal")
  q = tree.set(p, "params/dense/bias", jnp.zeros(3))
  np.testing.assert_array_equal(q["params"]["dense"]["bias"], jnp.zeros(3))
  np.testing.assert_array_equal(p["params"]["dense"]["bias"], jnp.ones(3))  # pure
  with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
    tree.set(p, "params/dense/bias", jnp.zeros(4))


def test_mask_by_regex():
  m = tree.mask(_params(), "kernel$", exclude="head")
  assert tree.flatten(m) == {"params/dense/bias": False, "params/dense/kernel": True,
                             "params/head/kernel": False}
  with pytest.raises(KeyError, match="Available paths"):
    tree.mask(_params(), "attention")


def test_transplant_copies_old_values_into_the_leading_corner():
  old = _params()
  fresh = {"params": {"dense": {"kernel": jnp.full((2, 5), -1.0), "bias": jnp.full(5, -1.0)},
                      "head": {"kernel": jnp.full((5, 2), -1.0)},
                      "new": {"kernel": jnp.full((2,), 7.0)}}}
  out = tree.transplant(fresh, old)
  k = out["params"]["dense"]["kernel"]
  np.testing.assert_array_equal(k[:, :3], old["params"]["dense"]["kernel"])
  np.testing.assert_array_equal(k[:, 3:], -1.0)
  np.testing.assert_array_equal(out["params"]["head"]["kernel"][:3], 1.0)
  np.testing.assert_array_equal(out["params"]["head"]["kernel"][3:], -1.0)
  np.testing.assert_array_equal(out["params"]["new"]["kernel"], 7.0)


def test_transplant_carries_optax_state_and_renames():
  old_p = {"h1": {"w": jnp.ones((2, 2))}, "h2": {"w": jnp.ones((2, 3))}}
  opt = optax.adam(1e-3)
  state = opt.init(old_p)
  state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
  new_p = {"h1": {"w": jnp.zeros((2, 2))}, "h2": {"w": jnp.zeros((2, 2))},
           "h3": {"w": jnp.zeros((2, 4))}}
  carried = tree.transplant(opt.init(new_p), state, renames={"h2": "h3"})
  mu = carried[0].mu
  np.testing.assert_array_equal(mu["h3"]["w"][:, :3], 1.0)  # zeros + 1
  np.testing.assert_array_equal(mu["h3"]["w"][:, 3:], 0.0)
  np.testing.assert_array_equal(mu["h2"]["w"], 0.0)  # nothing was renamed into h2
  np.testing.assert_array_equal(mu["h1"]["w"], 1.0)


def test_transplant_rejects_shrinking():
  with pytest.raises(ValueError, match=r"\(3,\) in the old tree and \(2,\)"):
    tree.transplant({"a": jnp.zeros(2)}, {"a": jnp.zeros(3)})


def test_rename_path_matches_whole_components():
  assert tree.rename_path("params/h1/kernel", {"h1": "h2"}) == "params/h2/kernel"
  assert tree.rename_path("params/h10/kernel", {"h1": "h2"}) == "params/h10/kernel"
  assert tree.rename_path("0/mu/h1/kernel", {"h1": "h2"}) == "0/mu/h2/kernel"
