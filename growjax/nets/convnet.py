"""VGG-style ConvNet with BatchNorm, with a MobileNet-style depthwise-separable option.

The CIFAR seeds of Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855) are VGG- and
MobileNet-style networks. Layer ``i`` is

* ``block="vgg"``: ``conv_i`` (k×k) → ``bn_i`` → ReLU → [2×2 max-pool];
* ``block="mobilenet"``: layer 0 as VGG (the stem); layers ``i ≥ 1`` are depthwise-separable:
  ``dw_i`` (k×k depthwise) → ``dwbn_i`` → ReLU → ``conv_i`` (1×1 pointwise) → ``bn_i`` → ReLU →
  [pool];

followed by a head: ``flatten`` (a ``DenseGeneral`` whose kernel keeps the [H, W, C, out] layout so
that growing C appends along axis 2 — no interleaving, so ``transplant`` stays a corner copy) or
``gap`` (global average pool), then optional hidden ``dense_j`` layers and the ``head``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growjax.nets import common
from growjax.nets.sites import IN, OUT, Leaf, Site


def _conv_unit(psi, h, *, pool, dw, linear=False):
  """New channels: conv → BN(eval) → ReLU → [pool] → [depthwise → BN → ReLU].

  ``linear``: BatchNorm and ReLU replaced by the identity (the linearisation used by the
  first-order baselines); pooling kept.
  """
  y = common.conv(h, psi["kernel"])
  if not linear:
    y = common.batch_norm_eval(y, psi["bn_scale"], psi["bn_bias"], psi["bn_mean"], psi["bn_var"])
    y = nn.relu(y)
  if pool:
    y = common.max_pool(y)
  if dw:
    y = common.conv(y, psi["dw_kernel"], groups=y.shape[-1])
    if not linear:
      y = common.batch_norm_eval(y, psi["dwbn_scale"], psi["dwbn_bias"], psi["dwbn_mean"],
                                 psi["dwbn_var"])
      y = nn.relu(y)
  return y


def _conv_calibrate(psi, h, *, pool, dw):
  """Sets the new channels' BN running statistics to their statistics on ``h``'s batch."""
  psi = dict(psi)
  y = common.conv(h, psi["kernel"])
  psi["bn_mean"], psi["bn_var"] = common.batch_moments(y)
  if dw:
    y = common.batch_norm_eval(y, psi["bn_scale"], psi["bn_bias"], psi["bn_mean"], psi["bn_var"])
    y = nn.relu(y)
    if pool:
      y = common.max_pool(y)
    y = common.conv(y, psi["dw_kernel"], groups=y.shape[-1])
    psi["dwbn_mean"], psi["dwbn_var"] = common.batch_moments(y)
  return psi


def _fan_out_conv(omega, a):
  return common.conv(a, omega["kernel"])


def _fan_out_flatten(omega, a):
  return jnp.einsum("bhwk,hwko->bo", a, omega["kernel"])


def _fan_out_gap(omega, a):
  return jnp.matmul(jnp.mean(a, axis=(1, 2)), omega["kernel"])


def _fan_out_dense(omega, a):
  return common.dense(a, omega["kernel"])


def _dense_unit(psi, h, *, flat_input, linear=False):
  if flat_input:
    y = jnp.einsum("bhwc,hwck->bk", h, psi["kernel"]) + common.expand_to(psi["bias"], 2)
  else:
    y = common.dense(h, psi["kernel"], psi["bias"])
  return y if linear else nn.relu(y)


@common.register
class ConvNet(nn.Module, common.Growable):
  """VGG/MobileNet-style ConvNet with BatchNorm (NHWC inputs).

  Attributes:
    input_shape: (H, W, C) of one example.
    channels: output channels per conv layer (one growth site each).
    pool: per layer, whether a 2×2 max-pool follows (None: pool after every layer).
    block: ``"vgg"`` or ``"mobilenet"``.
    head: ``"flatten"`` or ``"gap"``.
    dense_widths: hidden dense layers between the conv trunk and the head (growth sites too).
    num_outputs: number of logits.
    kernel_size: spatial size of the k×k (and depthwise) kernels.
  """
  input_shape: tuple[int, int, int] = (8, 8, 1)
  channels: tuple[int, ...] = (16, 32)
  pool: tuple[bool, ...] | None = None
  block: str = "vgg"
  head: str = "flatten"
  dense_widths: tuple[int, ...] = ()
  num_outputs: int = 10
  kernel_size: int = 3

  # ---- config -----------------------------------------------------------------------------

  def _pools(self) -> tuple[bool, ...]:
    return tuple(True for _ in self.channels) if self.pool is None else tuple(self.pool)

  def validate(self) -> None:
    if not self.channels:
      raise ValueError("ConvNet.channels must list at least one conv layer.")
    common.check_positive(self, "channels", "num_outputs", "kernel_size", "input_shape")
    if self.dense_widths:
      common.check_positive(self, "dense_widths")
    if self.block not in ("vgg", "mobilenet"):
      raise ValueError(f"ConvNet.block must be 'vgg' or 'mobilenet', got {self.block!r}.")
    if self.head not in ("flatten", "gap"):
      raise ValueError(f"ConvNet.head must be 'flatten' or 'gap', got {self.head!r}.")
    if len(self.input_shape) != 3:
      raise ValueError(f"ConvNet.input_shape must be (H, W, C), got {self.input_shape!r}.")
    if len(self._pools()) != len(self.channels):
      raise ValueError(f"ConvNet.pool has {len(self._pools())} entries for "
                       f"{len(self.channels)} conv layers.")
    h, w = self._spatial()[-1]
    if h < 1 or w < 1:
      raise ValueError(f"ConvNet.pool: {sum(self._pools())} poolings shrink the "
                       f"{self.input_shape[:2]} input below 1×1; pool fewer layers.")

  def _spatial(self) -> list[tuple[int, int]]:
    """[(H, W)] at the input of layer 0, ..., and after the last layer (pooled)."""
    h, w = self.input_shape[:2]
    out = [(h, w)]
    for p in self._pools():
      if p:
        h, w = h // 2, w // 2
      out.append((h, w))
    return out

  def example_input(self, batch: int = 1) -> jax.Array:
    return jnp.zeros((batch, *self.input_shape), jnp.float32)

  def _dw(self, i: int) -> bool:
    return self.block == "mobilenet" and i >= 1

  # ---- forward ----------------------------------------------------------------------------

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [batch, H, W, C] -> logits [batch, num_outputs]."""
    if tuple(x.shape[1:]) != tuple(self.input_shape):
      raise ValueError(f"ConvNet expects inputs [batch, {', '.join(map(str, self.input_shape))}]"
                       f", got {x.shape}.")
    k = self.kernel_size
    pools = self._pools()
    n = len(self.channels)
    for i, c in enumerate(self.channels):
      if self._dw(i):
        x = nn.Conv(x.shape[-1], (k, k), feature_group_count=x.shape[-1], use_bias=False,
                    name=f"dw_{i}")(x)
        x = nn.relu(common.make_batch_norm(train, f"dwbn_{i}")(x))
        size = (1, 1)
      else:
        size = (k, k)
      self.sow("intermediates", f"h_conv_{i}", x)
      x = nn.Conv(c, size, use_bias=False, name=f"conv_{i}")(x)
      if i > 0:
        x = self.perturb(f"u_conv_{i - 1}", x)
      x = nn.relu(common.make_batch_norm(train, f"bn_{i}")(x))
      if pools[i]:
        x = common.max_pool(x)
    prev_site = f"conv_{n - 1}"
    if self.head == "gap":
      x = jnp.mean(x, axis=(1, 2))
    dims = tuple(self.dense_widths) + (self.num_outputs,)
    for j, d in enumerate(dims):
      last = j == len(dims) - 1
      name = "head" if last else f"dense_{j}"
      if not last:
        self.sow("intermediates", f"h_{name}", x)
      if x.ndim == 4:
        x = nn.DenseGeneral(d, axis=(-3, -2, -1), name=name)(x)
      else:
        x = nn.Dense(d, name=name)(x)
      x = self.perturb(f"u_{prev_site}", x)
      if not last:
        x = nn.relu(x)
      prev_site = name
    return x

  # ---- growth -----------------------------------------------------------------------------

  def growth_sites(self) -> dict[str, Site]:
    sites = {}
    n = len(self.channels)
    pools = self._pools()
    spatial = self._spatial()
    for i, c in enumerate(self.channels):
      name = f"conv_{i}"
      hw = spatial[i][0] * spatial[i][1]
      leaves = [Leaf("kernel", f"params/{name}/kernel", 3, IN, positions=hw),
                Leaf("bn_scale", f"params/bn_{i}/scale", 0, IN),
                Leaf("bn_bias", f"params/bn_{i}/bias", 0, IN),
                Leaf("bn_mean", f"batch_stats/bn_{i}/mean", 0, IN),
                Leaf("bn_var", f"batch_stats/bn_{i}/var", 0, IN)]
      next_dw = i + 1 < n and self._dw(i + 1)
      if i + 1 < n:
        hw_next = spatial[i + 1][0] * spatial[i + 1][1]
        if next_dw:
          leaves += [Leaf("dw_kernel", f"params/dw_{i + 1}/kernel", 3, IN, positions=hw_next),
                     Leaf("dwbn_scale", f"params/dwbn_{i + 1}/scale", 0, IN),
                     Leaf("dwbn_bias", f"params/dwbn_{i + 1}/bias", 0, IN),
                     Leaf("dwbn_mean", f"batch_stats/dwbn_{i + 1}/mean", 0, IN),
                     Leaf("dwbn_var", f"batch_stats/dwbn_{i + 1}/var", 0, IN)]
        leaves.append(Leaf("kernel", f"params/conv_{i + 1}/kernel", 2, OUT, add="zero",
                           positions=hw_next))
        fan_out = _fan_out_conv
      else:
        consumer = "dense_0" if self.dense_widths else "head"
        axis = 2 if self.head == "flatten" else 0
        leaves.append(Leaf("kernel", f"params/{consumer}/kernel", axis, OUT, add="zero"))
        fan_out = _fan_out_flatten if self.head == "flatten" else _fan_out_gap
      sites[name] = Site(
          name=name, field=("channels", i), width=c, leaves=tuple(leaves),
          h_path=f"intermediates/h_{name}", u_path=f"perturbations/u_{name}",
          fan_in=functools.partial(_conv_unit, pool=pools[i], dw=next_dw),
          fan_out=fan_out,
          calibrate=functools.partial(_conv_calibrate, pool=pools[i], dw=next_dw))
    for j, w in enumerate(self.dense_widths):
      name = f"dense_{j}"
      consumer = f"dense_{j + 1}" if j + 1 < len(self.dense_widths) else "head"
      flat_input = j == 0 and self.head == "flatten"
      sites[name] = Site(
          name=name, field=("dense_widths", j), width=w,
          leaves=(Leaf("kernel", f"params/{name}/kernel", 3 if flat_input else 1, IN),
                  Leaf("bias", f"params/{name}/bias", 0, IN),
                  Leaf("kernel", f"params/{consumer}/kernel", 0, OUT, add="zero")),
          h_path=f"intermediates/h_{name}", u_path=f"perturbations/u_{name}",
          fan_in=functools.partial(_dense_unit, flat_input=flat_input),
          fan_out=_fan_out_dense)
    return sites

  def depth_positions(self) -> tuple[int, ...]:
    return tuple(range(len(self.channels)))

  def deepen(self, position: int):
    """Inserts a conv layer (same channels, no pooling) after conv layer ``position``."""
    if position not in self.depth_positions():
      raise ValueError(f"ConvNet.deepen: position {position} not in {self.depth_positions()}.")
    p = position
    channels = self.channels[:p + 1] + (self.channels[p],) + self.channels[p + 1:]
    pools = self._pools()
    pools = pools[:p + 1] + (False,) + pools[p + 1:]
    renames = {}
    for j in range(len(self.channels) - 1, p, -1):
      for prefix in ("conv", "bn", "dw", "dwbn"):
        renames[f"{prefix}_{j}"] = f"{prefix}_{j + 1}"
    return self.clone(channels=channels, pool=pools), renames

  def identity_layer(self, variables, position: int):
    i = position + 1
    c = self.channels[i]
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    dtype = params[f"conv_{i}"]["kernel"].dtype
    k = self.kernel_size
    put = jax.device_put  # host-built constants: no per-shape compilation
    if self._dw(i):
      dw = np.zeros((k, k, 1, c), dtype)
      dw[k // 2, k // 2, 0, :] = 1.0
      params[f"dw_{i}"] = {"kernel": put(dw)}
      params[f"conv_{i}"] = {"kernel": put(np.eye(c, dtype=dtype).reshape(1, 1, c, c))}
      bns = (f"dwbn_{i}", f"bn_{i}")
    else:
      kern = np.zeros((k, k, c, c), dtype)
      kern[k // 2, k // 2] = np.eye(c, dtype=dtype)
      params[f"conv_{i}"] = {"kernel": put(kern)}
      bns = (f"bn_{i}",)
    for bn in bns:
      params[bn] = {"scale": put(np.ones((c,), dtype)), "bias": put(np.zeros((c,), dtype))}
      # var + eps = 1 exactly, so eval-mode BatchNorm is the identity.
      stats[bn] = {"mean": put(np.zeros((c,), dtype)),
                   "var": put(np.full((c,), 1.0 - common.BN_EPSILON, dtype))}
    return {**variables, "params": params, "batch_stats": stats}
