"""Growth sites and morphisms: completeness, function preservation, site functions, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import morph, nets, tree

TOL = 1e-5

MODELS = {
    "mlp": nets.MLP(input_dim=10, widths=(7, 5), num_outputs=4),
    "vgg": nets.ConvNet(input_shape=(8, 8, 2), channels=(4, 6), num_outputs=3),
    "mobilenet": nets.ConvNet(input_shape=(8, 8, 2), channels=(4, 5, 6), pool=(True, False, True),
                              block="mobilenet", head="gap", dense_widths=(7,), num_outputs=3),
    "vgg_flat_dense": nets.ConvNet(input_shape=(6, 6, 1), channels=(3,), dense_widths=(5, 4),
                                   num_outputs=3),
    "resnet": nets.ResNet(input_shape=(6, 6, 2), stages=(4, 6), blocks=(2, 1), num_outputs=3),
    "gpt": nets.Transformer(vocab_size=23, max_len=8, d_model=16, num_layers=2, num_heads=2,
                            head_dim=4, mlp_dim=12),
    "llama": nets.Transformer(vocab_size=23, max_len=8, d_model=16, num_layers=2, num_heads=2,
                              head_dim=4, mlp_dim=12, norm="rms", mlp="swiglu",
                              activation="silu", position="rope", use_bias=False,
                              tie_embeddings=False),
    "bert": nets.Transformer(vocab_size=23, max_len=8, d_model=16, num_layers=2, num_heads=2,
                             head_dim=4, mlp_dim=12, causal=False, post_ln=True, embed_norm=True,
                             type_vocab_size=2, num_outputs=3, activation="gelu_exact"),
}


def _setup(name):
  """Model, randomised variables (BatchNorm statistics included) and a batch of inputs."""
  model = MODELS[name]
  v = nets.common.host_init(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  v = jax.tree.map(
      lambda a: jax.device_put((np.asarray(a) + 0.2 * rng.standard_normal(a.shape)).astype(
          a.dtype)), v)
  if "batch_stats" in v:
    # Running statistics away from their (0, 1) init, small enough that ReLUs stay alive.
    v["batch_stats"] = jax.tree.map(
        lambda s: jax.device_put(np.abs(np.asarray(s)) + 0.5 if float(np.mean(s)) > 0.5
                                 else 0.5 * np.asarray(s)), v["batch_stats"])
  if isinstance(model, nets.Transformer):
    x = jax.random.randint(jax.random.key(2), (3, 8), 0, model.vocab_size)
  else:
    x = jax.random.uniform(jax.random.key(2), (4,) + model.example_input().shape[1:])
  return model, v, x


def _apply(model, variables, x):
  # One compilation per grown model is far cheaper than op-by-op dispatch of a new model.
  return jax.jit(model.apply)(variables, x)


def _shapes(variables):
  return {p: np.shape(a) for p, a in tree.flatten(variables).items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sites_list_every_coupled_leaf_and_axis(name):
  """Growing a site's width field by one changes exactly the site's leaves on their axes."""
  model = MODELS[name]
  base = _shapes(jax.eval_shape(model.init_variables, jax.random.key(0)))
  sites = model.growth_sites()
  assert sites, name
  for site in sites.values():
    grown_model = morph.widen_field(model, site.field, site.width + 1)
    grown = _shapes(jax.eval_shape(grown_model.init_variables, jax.random.key(0)))
    assert set(grown) == set(base)
    changed = set()
    for path, shape in grown.items():
      diff = [i for i, (a, b) in enumerate(zip(shape, base[path])) if a != b]
      assert len(diff) <= 1, (site.name, path)
      changed |= {(path, d) for d in diff}
    assert changed == {(l.path, l.axis) for l in site.leaves}, site.name
    for l in site.leaves:
      assert base[l.path][l.axis] == site.width


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_morphism_preserves_the_function(name):
  """add_units at every site, split at every site, a layer at every depth position.

  Each kind of morphism is applied at all sites in sequence (so one compiled forward pass checks
  them all: a non-preserving step anywhere would show in the final output).
  """
  model, v, x = _setup(name)
  y0 = _apply(model, v, x)
  assert float(jnp.max(jnp.abs(y0))) > 0.1  # a non-degenerate output to preserve
  sites = model.growth_sites()

  m, w = model, v
  for site_name, site in sites.items():
    before = tree.count(w["params"])
    m, w, rec = morph.add_units(m, w, site_name, 3, rng=jax.random.key(3))
    assert morph.get_site(m, site_name).width == site.width + 3 == rec["new_width"]
    assert rec["params_after"] - before == tree.count(w["params"]) - before > 0
  err = float(jnp.max(jnp.abs(_apply(m, w, x) - y0)))
  assert err <= TOL, ("add_units", err)

  m, w = model, v
  for site_name, site in sites.items():
    if site.splittable:
      m, w, _ = morph.split_units(m, w, site_name, [0, site.width - 1], ratio=0.3)
      assert morph.get_site(m, site_name).width == site.width + 2
    else:
      with pytest.raises(ValueError, match="cannot be split"):
        morph.split_units(m, w, site_name, [0])
  err = float(jnp.max(jnp.abs(_apply(m, w, x) - y0)))
  assert err <= TOL, ("split_units", err)

  m, w = model, v
  for position in sorted(model.depth_positions(), reverse=True):
    w_before = w
    m, w, rec = morph.insert_layer(m, w, position, rng=jax.random.key(4))
    # The layers after the insertion point kept their values under their new names.
    flat_new = tree.flatten(w)
    for old_path, leaf in tree.flatten(w_before).items():
      np.testing.assert_array_equal(flat_new[tree.rename_path(old_path, rec["renames"])], leaf)
  if model.depth_positions():
    err = float(jnp.max(jnp.abs(_apply(m, w, x) - y0)))
    assert err <= TOL, ("insert_layer", err)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_site_functions_match_the_grown_network(name):
  """fan_out(Ω, fan_in(Ψ, h)) injected at u reproduces the grown network with learned Ω."""
  model, v, x = _setup(name)
  y0, cache = model.apply(v, x, mutable=["intermediates", "perturbations"])
  perturbed = jax.jit(lambda v, pert, x: model.apply({**v, "perturbations": pert}, x))
  for site_name, site in model.growth_sites().items():
    if site.kind != "units":
      continue
    k = 4  # several units, so that not all of them are dead ReLUs on this small batch
    rng = jax.random.key(5)
    omega = {}
    flat = tree.flatten(v)
    for leaf in site.out_leaves:
      shape = list(np.shape(flat[leaf.path]))
      shape[leaf.axis] = k
      omega[leaf.name] = 0.3 * jax.random.normal(rng, tuple(shape))
    m2, v2, _ = morph.add_units(model, v, site_name, k, rng=jax.random.key(6), fan_out=omega)
    psi = nets.sites.new_slices(v2, site, site.width, side=nets.IN)
    h = nets.sites.cached_input(cache, site)
    delta = site.fan_out(omega, site.fan_in(psi, h))
    pert = tree.flatten(cache["perturbations"])
    key = site.u_path[len("perturbations/"):]
    assert pert[key].shape == delta.shape
    pert = tree.unflatten({p: (delta if p == key else jnp.zeros_like(a)) for p, a in pert.items()})
    want = _apply(m2, v2, x)
    got = perturbed(v, pert, x)
    assert float(jnp.max(jnp.abs(want - y0))) > 1e-3  # Ω changed the output
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=site_name)


def test_conv_calibrate_sets_batch_statistics():
  model, v, x = _setup("vgg")
  site = model.growth_sites()["conv_0"]
  _, cache = model.apply(v, x, mutable=["intermediates"])
  h = nets.sites.cached_input(cache, site)
  _, v2, _ = morph.add_units(model, v, "conv_0", 3, rng=jax.random.key(0))
  psi = site.calibrate(nets.sites.new_slices(v2, site, site.width, nets.IN), h)
  y = jax.lax.conv_general_dilated(h, psi["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(psi["bn_mean"], y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(psi["bn_var"], y.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_fan_in_and_fan_out_given_explicitly_land_in_the_new_slices():
  model, v, _ = _setup("mlp")
  psi = {"kernel": jnp.full((10, 2), 0.5), "bias": jnp.array([1.0, 2.0])}
  omega = {"kernel": jnp.full((2, 5), -1.0)}
  m2, v2, _ = morph.add_units(model, v, "hidden_0", 2, rng=jax.random.key(0), fan_in=psi,
                              fan_out=omega)
  assert m2.widths == (9, 5)
  np.testing.assert_array_equal(v2["params"]["hidden_0"]["kernel"][:, 7:], psi["kernel"])
  np.testing.assert_array_equal(v2["params"]["hidden_0"]["bias"][7:], psi["bias"])
  np.testing.assert_array_equal(v2["params"]["hidden_1"]["kernel"][7:], omega["kernel"])
  np.testing.assert_array_equal(v2["params"]["hidden_0"]["kernel"][:, :7],
                                v["params"]["hidden_0"]["kernel"])


def test_add_units_draws_only_the_fresh_entries_it_is_not_given():
  """Every fresh leaf given: nothing is drawn (the key does not matter). Otherwise the fresh
  entries are the default draws of ``new_unit_slices`` for the same key."""
  model, v, _ = _setup("mlp")
  psi = {"kernel": jnp.full((10, 2), 0.5), "bias": jnp.array([1.0, 2.0])}
  omega = {"kernel": jnp.full((2, 5), -1.0)}
  grown = [morph.add_units(model, v, "hidden_0", 2, rng=jax.random.key(i), fan_in=psi,
                           fan_out=omega)[1] for i in (0, 1)]
  jax.tree.map(np.testing.assert_array_equal, grown[0], grown[1])
  key = jax.random.key(5)
  _, _, slices = morph.new_unit_slices(model, v, "hidden_0", 2, key)
  _, v_out, _ = morph.add_units(model, v, "hidden_0", 2, rng=key, fan_out=omega)
  _, v_def, _ = morph.add_units(model, v, "hidden_0", 2, rng=key)
  for vv in (v_out, v_def):
    np.testing.assert_array_equal(vv["params"]["hidden_0"]["kernel"][:, 7:],
                                  slices["params/hidden_0/kernel"])
  assert np.std(slices["params/hidden_0/kernel"]) > 0
  np.testing.assert_array_equal(v_out["params"]["hidden_1"]["kernel"][7:], omega["kernel"])
  np.testing.assert_array_equal(v_def["params"]["hidden_1"]["kernel"][7:], 0.0)


def test_transformer_stream_growth_rescales_norm_epsilon():
  model, v, _ = _setup("gpt")
  m2, _, _ = morph.add_units(model, v, "stream", 4, rng=jax.random.key(0))
  assert m2.d_model == 20
  np.testing.assert_allclose(m2.ln_epsilon, model.ln_epsilon * 16 / 20)


def test_config_round_trip():
  for model in MODELS.values():
    grown, _, _ = morph.add_units(model, nets.common.host_init(model, jax.random.key(0)),
                                  sorted(model.growth_sites())[0], 1, rng=jax.random.key(0))
    again = nets.from_config_dict(nets.config_dict(grown))
    assert again == grown


# ---- bad input ---------------------------------------------------------------------------------

def test_unknown_site_lists_available_sites():
  model, v, _ = _setup("mlp")
  with pytest.raises(KeyError, match=r"available sites: \['hidden_0', 'hidden_1'\]"):
    morph.add_units(model, v, "hidden_7", 1, rng=jax.random.key(0))


def test_fan_in_shape_mismatch_names_both_shapes():
  model, v, _ = _setup("mlp")
  with pytest.raises(ValueError, match=r"must have shape \(10, 2\).*got \(10, 3\)"):
    morph.add_units(model, v, "hidden_0", 2, rng=jax.random.key(0),
                    fan_in={"kernel": jnp.zeros((10, 3))})
  with pytest.raises(KeyError, match="unknown leaves"):
    morph.add_units(model, v, "hidden_0", 2, rng=jax.random.key(0),
                    fan_in={"kernal": jnp.zeros((10, 2))})


def test_variables_of_another_config_are_rejected():
  _, v, _ = _setup("mlp")
  with pytest.raises(ValueError, match="shape .* config says width 8"):
    morph.add_units(nets.MLP(input_dim=10, widths=(8, 5), num_outputs=4), v, "hidden_0", 1,
                    rng=jax.random.key(0))


@pytest.mark.parametrize("model, field", [
    (nets.MLP(widths=(0,)), "widths"),
    (nets.MLP(activation="swish2"), "activation"),
    (nets.ConvNet(block="resnext"), "block"),
    (nets.ConvNet(channels=(4, 4, 4, 4), input_shape=(8, 8, 1)), "pool"),
    (nets.ResNet(blocks=(1,)), "blocks"),
    (nets.Transformer(num_layers=2, num_heads=(2, 2, 2)), "num_heads"),
    (nets.Transformer(norm="batch"), "norm"),
])
def test_invalid_config_names_the_field(model, field):
  with pytest.raises(ValueError, match=field):
    model.init_variables(jax.random.key(0))


def test_depth_errors():
  model, v, _ = _setup("mlp")
  with pytest.raises(ValueError, match=r"positions \[0, 1\]"):
    morph.insert_layer(model, v, 5, rng=jax.random.key(0))
  tanh = nets.MLP(widths=(4,), activation="tanh")
  with pytest.raises(ValueError, match="only for activations"):
    morph.insert_layer(tanh, tanh.init_variables(jax.random.key(0)), 0, rng=jax.random.key(0))
  bert = MODELS["bert"]
  assert bert.depth_positions() == ()
  with pytest.raises(ValueError, match="Post-LN"):
    bert.deepen(0)
  with pytest.raises(ValueError, match="distinct indices"):
    morph.split_units(model, v, "hidden_0", [0, 0])
  with pytest.raises(ValueError, match="positive integer"):
    morph.add_units(model, v, "hidden_0", 0, rng=jax.random.key(0))


@pytest.mark.parametrize("name", ["resnet", "llama", "gpt"])
def test_host_init_matches_flax_init_in_distribution(name):
  """Growth-time host initialisation draws every leaf like the model's flax initialiser."""
  model = MODELS[name]
  ref = tree.flatten(jax.jit(model.init_variables)(jax.random.key(0)))
  host = tree.flatten(nets.common.host_init(model, jax.random.key(1)))
  assert set(ref) == set(host)
  for path, a in ref.items():
    b = host[path]
    assert a.shape == b.shape and a.dtype == b.dtype, path
    sa, sb = float(np.std(a)), float(np.std(b))
    if a.size >= 64:
      assert abs(sa - sb) <= 0.2 * sa + 1e-6, (path, sa, sb)
    else:
      assert (sa == 0) == (sb == 0) and float(np.mean(a)) == pytest.approx(float(np.mean(b)),
                                                                            abs=0.3 * sa + 1e-6)
