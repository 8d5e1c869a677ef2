"""Pre-activation ResNet with zero-gated residual blocks.

He, Zhang, Ren & Sun (2016, arXiv:1603.05027) pre-activation blocks
``x + g · conv2(relu(bn2(conv1(relu(bn1(x))))))``, with a learnable scalar gate ``g`` (1 at
initialisation): inserting a block with ``g = 0`` is an exact morphism (the zero-gated residual
block insertion of Lawton, Galstyan & Ver Steeg 2024, arXiv:2411.05855). Growth sites: each
block's inner width, and each stage's residual stream (every writer, per-channel BatchNorm and
reader listed; new stream channels start at zero, which BatchNorm-before-conv keeps at zero).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growjax.nets import common
from growjax.nets.sites import IN, OUT, Leaf, Site


class PreActBlock(nn.Module):
  """One pre-activation block; ``stride``/``project`` only for a stage's first block."""
  width: int
  out: int
  stride: int = 1
  project: bool = False
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = self.kernel_size
    pre = nn.relu(common.make_batch_norm(train, "bn1")(x))
    if self.project:
      shortcut = nn.Conv(self.out, (1, 1), strides=self.stride, use_bias=False, name="proj")(pre)
    else:
      shortcut = x
    self.sow("intermediates", "h_inner", pre)
    y = nn.Conv(self.width, (k, k), strides=self.stride, use_bias=False, name="conv1")(pre)
    y = nn.relu(common.make_batch_norm(train, "bn2")(y))
    y = nn.Conv(self.out, (k, k), use_bias=False, name="conv2")(y)
    y = self.perturb("u_inner", y)
    gate = self.param("gate", nn.initializers.ones, (), jnp.float32)
    return shortcut + gate * y


def _inner_fan_in(psi, h, *, stride, linear=False):
  y = common.conv(h, psi["kernel"], strides=stride)
  if linear:
    return y
  y = common.batch_norm_eval(y, psi["bn_scale"], psi["bn_bias"], psi["bn_mean"], psi["bn_var"])
  return nn.relu(y)


def _inner_calibrate(psi, h, *, stride):
  psi = dict(psi)
  psi["bn_mean"], psi["bn_var"] = common.batch_moments(common.conv(h, psi["kernel"],
                                                                   strides=stride))
  return psi


def _inner_fan_out(omega, a):
  return common.conv(a, omega["kernel"])


def _bn_leaves(prefix: str, name: str) -> list[Leaf]:
  return [Leaf(f"{name}_scale", f"params/{prefix}/scale", 0, IN),
          Leaf(f"{name}_bias", f"params/{prefix}/bias", 0, IN),
          Leaf(f"{name}_mean", f"batch_stats/{prefix}/mean", 0, IN),
          Leaf(f"{name}_var", f"batch_stats/{prefix}/var", 0, IN)]


@common.register
class ResNet(nn.Module, common.Growable):
  """Pre-activation ResNet: stem conv, stages of blocks, BN-ReLU-GAP-dense head.

  Attributes:
    input_shape: (H, W, C) of one example.
    stages: residual-stream channels per stage (stage ``s > 0`` starts with a stride-2 block).
    blocks: number of blocks per stage.
    block_widths: inner width of each block (all stages, in order); None: the stage width.
    num_outputs: number of logits.
    kernel_size: conv kernel size.
  """
  input_shape: tuple[int, int, int] = (8, 8, 1)
  stages: tuple[int, ...] = (16, 32)
  blocks: tuple[int, ...] = (1, 1)
  block_widths: tuple[int, ...] | None = None
  num_outputs: int = 10
  kernel_size: int = 3

  def _block_stage(self) -> list[int]:
    return [s for s, n in enumerate(self.blocks) for _ in range(n)]

  def _widths(self) -> tuple[int, ...]:
    if self.block_widths is None:
      return tuple(self.stages[s] for s in self._block_stage())
    return tuple(self.block_widths)

  def _first_of_stage(self) -> dict[int, int]:
    first, j = {}, 0
    for s, n in enumerate(self.blocks):
      first[s] = j
      j += n
    return first

  def validate(self) -> None:
    if not self.stages:
      raise ValueError("ResNet.stages must list at least one stage.")
    common.check_positive(self, "stages", "blocks", "num_outputs", "kernel_size", "input_shape")
    if len(self.blocks) != len(self.stages):
      raise ValueError(f"ResNet.blocks has {len(self.blocks)} entries for {len(self.stages)} "
                       "stages; give the number of blocks of every stage.")
    if self.block_widths is not None:
      common.check_positive(self, "block_widths")
      if len(self.block_widths) != sum(self.blocks):
        raise ValueError(f"ResNet.block_widths has {len(self.block_widths)} entries for "
                         f"{sum(self.blocks)} blocks.")

  def example_input(self, batch: int = 1) -> jax.Array:
    return jnp.zeros((batch, *self.input_shape), jnp.float32)

  def _spatial(self) -> list[int]:
    """Spatial positions (H*W) at each block's output."""
    h, w = self.input_shape[:2]
    first = set(self._first_of_stage()[s] for s in range(1, len(self.stages)))
    out = []
    for j in range(sum(self.blocks)):
      if j in first:
        h, w = -(-h // 2), -(-w // 2)
      out.append(h * w)
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [batch, H, W, C] -> logits [batch, num_outputs]."""
    if tuple(x.shape[1:]) != tuple(self.input_shape):
      raise ValueError(f"ResNet expects inputs [batch, {', '.join(map(str, self.input_shape))}]"
                       f", got {x.shape}.")
    k = self.kernel_size
    x = nn.Conv(self.stages[0], (k, k), use_bias=False, name="stem")(x)
    first = self._first_of_stage()
    widths = self._widths()
    for j, s in enumerate(self._block_stage()):
      downsample = s > 0 and first[s] == j
      x = PreActBlock(widths[j], self.stages[s], stride=2 if downsample else 1,
                      project=downsample, kernel_size=k, name=f"block_{j}")(x, train)
    x = nn.relu(common.make_batch_norm(train, "bn_final")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_outputs, name="head")(x)

  def growth_sites(self) -> dict[str, Site]:
    sites = {}
    first = self._first_of_stage()
    stage_of = self._block_stage()
    spatial = self._spatial()
    widths = self._widths()
    for j, w in enumerate(widths):
      b = f"block_{j}"
      stride = 2 if (stage_of[j] > 0 and first[stage_of[j]] == j) else 1
      sites[b] = Site(
          name=b, field=("block_widths", j), width=w,
          leaves=(Leaf("kernel", f"params/{b}/conv1/kernel", 3, IN, positions=spatial[j]),
                  *_bn_leaves(f"{b}/bn2", "bn"),
                  Leaf("kernel", f"params/{b}/conv2/kernel", 2, OUT, add="zero",
                       positions=spatial[j])),
          h_path=f"intermediates/{b}/h_inner", u_path=f"perturbations/{b}/u_inner",
          fan_in=functools.partial(_inner_fan_in, stride=stride), fan_out=_inner_fan_out,
          calibrate=functools.partial(_inner_calibrate, stride=stride))
    n_stages = len(self.stages)
    for s, c in enumerate(self.stages):
      blocks = [j for j in range(len(widths)) if stage_of[j] == s]
      readers = [j for j in blocks if not (s > 0 and j == first[s])]
      leaves = []
      # Writers: new stream channels must start at exactly zero.
      if s == 0:
        leaves.append(Leaf("stem", "params/stem/kernel", 3, IN, add="zero"))
      else:
        leaves.append(Leaf(f"block_{first[s]}_proj", f"params/block_{first[s]}/proj/kernel", 3,
                           IN, add="zero"))
      for j in blocks:
        leaves.append(Leaf(f"block_{j}_conv2", f"params/block_{j}/conv2/kernel", 3, IN,
                           add="zero", positions=spatial[j]))
      # Readers: BatchNorm of the new (zero) channels gives zero, so their weights are free.
      for j in readers:
        leaves += _bn_leaves(f"block_{j}/bn1", f"block_{j}_bn1")
        leaves.append(Leaf(f"block_{j}_conv1", f"params/block_{j}/conv1/kernel", 2, OUT,
                           positions=spatial[j]))
      if s + 1 < n_stages:
        j = first[s + 1]
        leaves += _bn_leaves(f"block_{j}/bn1", f"block_{j}_bn1")
        leaves.append(Leaf(f"block_{j}_conv1", f"params/block_{j}/conv1/kernel", 2, OUT,
                           positions=spatial[j]))
        leaves.append(Leaf(f"block_{j}_proj", f"params/block_{j}/proj/kernel", 2, OUT,
                           positions=spatial[j]))
      else:
        leaves += _bn_leaves("bn_final", "bn_final")
        leaves.append(Leaf("head", "params/head/kernel", 0, OUT))
      sites[f"stage_{s}"] = Site(name=f"stage_{s}", field=("stages", s), width=c,
                                 leaves=tuple(leaves), kind="stream")
    return sites

  def concrete(self):
    # ``block_widths=None`` means "the stage widths"; growing a stage must not grow the blocks.
    return self.clone(block_widths=self._widths())

  def depth_positions(self) -> tuple[int, ...]:
    return tuple(range(sum(self.blocks)))

  def deepen(self, position: int):
    """Inserts a zero-gated block (stage width, inner width = stage width) after ``position``."""
    if position not in self.depth_positions():
      raise ValueError(f"ResNet.deepen: position {position} not in {self.depth_positions()}.")
    s = self._block_stage()[position]
    blocks = tuple(n + 1 if i == s else n for i, n in enumerate(self.blocks))
    widths = self._widths()
    widths = widths[:position + 1] + (self.stages[s],) + widths[position + 1:]
    renames = {f"block_{j}": f"block_{j + 1}"
               for j in range(sum(self.blocks) - 1, position, -1)}
    return self.clone(blocks=blocks, block_widths=widths), renames

  def identity_layer(self, variables, position: int):
    params = dict(variables["params"])
    b = f"block_{position + 1}"
    params[b] = {**params[b], "gate": jax.device_put(np.zeros((), params[b]["gate"].dtype))}
    return {**variables, "params": params}
