"""GPT-style decoder and BERT-style encoder with per-layer growable heads and MLP width.

One module covers GPT-2 (pre-LN, learned positions, GELU, tied embeddings), LLaMA (pre-RMSNorm,
rotary positions, SwiGLU, no biases, untied head) and BERT (post-LN, embedding LayerNorm,
token types, exact GELU) through config fields, so pretrained checkpoints in those namings load
into it (``growjax.nets.checkpoints``) and LoRA / quantization / LiGO act on one parameter layout:

    params/wte/embedding [V, d], params/wpe/embedding [T, d], params/wtt/embedding [types, d]
    params/block_l/ln1, params/block_l/{query,key,value}/kernel [d, H_l, hd] (bias [H_l, hd])
    params/block_l/out/kernel [H_l, hd, d], params/block_l/ln2
    params/block_l/{fc_in,fc_gate}/kernel [d, F_l], params/block_l/fc_out/kernel [F_l, d]
    params/ln_f, params/head/kernel [d, V or num_outputs]

Growth sites (Lawton, Galstyan & Ver Steeg 2024, arXiv:2411.05855; LiGO, Wang et al. 2023,
arXiv:2303.00980): ``block_l/mlp`` (hidden width), ``block_l/heads`` (attention heads, units of
``head_dim``), and for pre-norm models without an embedding norm the residual ``stream``. The
stream is normalised over all its dimensions, so zero-initialised new dimensions would change
every LayerNorm; instead every writer gives a new dimension the *mean* of the old ones (LayerNorm)
or zero (RMSNorm), the old norm scales are multiplied by sqrt(d/(d+k)) and the norm epsilon by
d/(d+k), which together leave every normalised old dimension unchanged exactly and every new one
at zero.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growjax.nets import common
from growjax.nets.sites import IN, OUT, Leaf, Site, per_layer


# ---- pure pieces shared by the module and its growth sites ----------------------------------

def rope(x: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention (Hugging Face LLaMA). x [B, T, H, hd]."""
  t, hd = x.shape[1], x.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
  ang = jnp.concatenate([ang, ang], axis=-1)  # [T, hd]
  cos = jnp.cos(ang).astype(x.dtype).reshape(1, t, 1, hd)
  sin = jnp.sin(ang).astype(x.dtype).reshape(1, t, 1, hd)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def attend(q, k, v, *, causal: bool, mask=None):
  """Scaled dot-product attention. q, k, v [B, T, H, hd]; mask [B, T] (True = keep) -> [B, T, H, hd]."""
  hd = q.shape[-1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.asarray(math.sqrt(hd), q.dtype)
  t = q.shape[1]
  keep = None
  if causal:
    keep = jnp.tril(jnp.ones((t, t), bool)).reshape(1, 1, t, t)
  if mask is not None:
    m = mask.astype(bool).reshape(mask.shape[0], 1, 1, t)
    keep = m if keep is None else jnp.logical_and(keep, m)
  if keep is not None:
    scores = jnp.where(keep, scores, jnp.asarray(jnp.finfo(scores.dtype).min, scores.dtype))
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _proj(h, kernel, bias):
  y = jnp.einsum("btd,dhe->bthe", h, kernel)
  return y if bias is None else y + bias.reshape(1, 1, *bias.shape)


def _heads_fan_in(psi, h, *, causal, rope_theta, linear=False):
  v = _proj(h, psi["v_kernel"], psi.get("v_bias"))
  if linear:
    # Linearised at Ψ = 0: q = k = 0, so attention is uniform over the visible positions.
    zeros = jnp.zeros_like(v)
    return attend(zeros, zeros, v, causal=causal)
  q = _proj(h, psi["q_kernel"], psi.get("q_bias"))
  k = _proj(h, psi["k_kernel"], psi.get("k_bias"))
  if rope_theta:
    q, k = rope(q, rope_theta), rope(k, rope_theta)
  return attend(q, k, v, causal=causal)


def _heads_fan_out(omega, a):
  return jnp.einsum("bthe,hed->btd", a, omega["kernel"])


def _mlp_fan_in(psi, h, *, act, linear=False):
  y = common.dense(h, psi["kernel"], psi.get("bias"))
  if linear:
    # For SwiGLU the product act(x W_g)(x W_in) is second order at Ψ = 0; keep its linear part.
    return y
  if "gate_kernel" in psi:
    return act(common.dense(h, psi["gate_kernel"], psi.get("gate_bias"))) * y
  return act(y)


def _mlp_fan_out(omega, a):
  return common.dense(a, omega["kernel"])


# ---- modules ---------------------------------------------------------------------------------

class BlockConfig(NamedTuple):
  """The Transformer fields a block needs (a plain hashable record, not a module)."""
  d_model: int
  head_dim: int
  causal: bool
  post_ln: bool
  norm: str
  mlp: str
  activation: str
  position: str
  rope_theta: float
  use_bias: bool
  ln_epsilon: float
  dropout_rate: float


class Block(nn.Module):
  """One transformer layer (pre- or post-norm)."""
  cfg: BlockConfig
  num_heads: int
  mlp_dim: int

  def _norm(self, name):
    c = self.cfg
    if c.norm == "rms":
      return nn.RMSNorm(epsilon=c.ln_epsilon, name=name)
    return nn.LayerNorm(epsilon=c.ln_epsilon, name=name)

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    c = self.cfg
    drop = nn.Dropout(c.dropout_rate, deterministic=not train)
    # -- attention
    h = x if c.post_ln else self._norm("ln1")(x)
    self.sow("intermediates", "h_heads", h)
    hd = c.head_dim
    proj = functools.partial(nn.DenseGeneral, features=(self.num_heads, hd), axis=-1,
                             use_bias=c.use_bias)
    q, k, v = proj(name="query")(h), proj(name="key")(h), proj(name="value")(h)
    if c.position == "rope":
      q, k = rope(q, c.rope_theta), rope(k, c.rope_theta)
    o = attend(q, k, v, causal=c.causal, mask=mask)
    y = nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=c.use_bias, name="out")(o)
    y = self.perturb("u_heads", y)
    x = x + drop(y)
    if c.post_ln:
      x = self._norm("ln1")(x)
    # -- MLP
    h = x if c.post_ln else self._norm("ln2")(x)
    self.sow("intermediates", "h_mlp", h)
    act = common.activation(c.activation)
    y = nn.Dense(self.mlp_dim, use_bias=c.use_bias, name="fc_in")(h)
    if c.mlp == "swiglu":
      y = act(nn.Dense(self.mlp_dim, use_bias=c.use_bias, name="fc_gate")(h)) * y
    else:
      y = act(y)
    y = nn.Dense(c.d_model, use_bias=c.use_bias, name="fc_out")(y)
    y = self.perturb("u_mlp", y)
    x = x + drop(y)
    if c.post_ln:
      x = self._norm("ln2")(x)
    return x


@common.register
class Transformer(nn.Module, common.Growable):
  """GPT-style decoder (``causal=True``) or BERT-style encoder (``causal=False``).

  Attributes:
    vocab_size: token vocabulary size.
    max_len: maximum sequence length (size of the learned position table).
    d_model: residual-stream width.
    num_layers: number of blocks.
    num_heads: heads per layer (int or per-layer tuple; grows per layer).
    head_dim: width of one head.
    mlp_dim: MLP hidden width (int or per-layer tuple; grows per layer).
    causal: causal self-attention (decoder) or bidirectional (encoder).
    post_ln: post-norm blocks (BERT) instead of pre-norm (GPT, LLaMA).
    norm: ``"layer"`` or ``"rms"``.
    mlp: ``"plain"`` (act(x W_in) W_out) or ``"swiglu"`` (act(x W_gate) * (x W_in)).
    activation: MLP activation name.
    position: ``"learned"``, ``"rope"`` or ``"none"``.
    rope_theta: rotary base.
    use_bias: biases in attention and MLP projections.
    tie_embeddings: LM head = token embedding transposed.
    embed_norm: a norm on the summed embeddings (BERT).
    type_vocab_size: token-type embeddings (BERT segments); 0 = none.
    num_outputs: if set, a classification head on the first (encoder) or last (decoder)
      position instead of the LM head.
    ln_epsilon: epsilon of every norm.
    dropout_rate: dropout on residual branches and embeddings in train mode.
  """
  vocab_size: int = 256
  max_len: int = 128
  d_model: int = 64
  num_layers: int = 2
  num_heads: int | tuple[int, ...] = 4
  head_dim: int = 16
  mlp_dim: int | tuple[int, ...] = 256
  causal: bool = True
  post_ln: bool = False
  norm: str = "layer"
  mlp: str = "plain"
  activation: str = "gelu"
  position: str = "learned"
  rope_theta: float = 10000.0
  use_bias: bool = True
  tie_embeddings: bool = True
  embed_norm: bool = False
  type_vocab_size: int = 0
  num_outputs: int | None = None
  ln_epsilon: float = 1e-5
  dropout_rate: float = 0.0

  def validate(self) -> None:
    common.check_positive(self, "vocab_size", "max_len", "d_model", "num_layers", "head_dim")
    per_layer(self.num_heads, self.num_layers, "num_heads")
    per_layer(self.mlp_dim, self.num_layers, "mlp_dim")
    choices = {"norm": ("layer", "rms"), "mlp": ("plain", "swiglu"),
               "position": ("learned", "rope", "none")}
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"Transformer.{field} must be one of {allowed}, got "
                         f"{getattr(self, field)!r}.")
    common.activation(self.activation)
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"Transformer.head_dim must be even for rotary positions, got "
                       f"{self.head_dim}.")
    if not self.ln_epsilon > 0:
      raise ValueError(f"Transformer.ln_epsilon must be positive, got {self.ln_epsilon}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"Transformer.dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    if self.num_outputs is not None:
      common.check_positive(self, "num_outputs")

  def example_input(self, batch: int = 1) -> jax.Array:
    return jnp.zeros((batch, min(8, self.max_len)), jnp.int32)

  def heads(self) -> tuple[int, ...]:
    return per_layer(self.num_heads, self.num_layers, "num_heads")

  def mlp_dims(self) -> tuple[int, ...]:
    return per_layer(self.mlp_dim, self.num_layers, "mlp_dim")

  def field_values(self, attr: str) -> tuple[int, ...]:
    if attr == "num_heads":
      return self.heads()
    if attr == "mlp_dim":
      return self.mlp_dims()
    return super().field_values(attr)

  def _norm(self, name):
    if self.norm == "rms":
      return nn.RMSNorm(epsilon=self.ln_epsilon, name=name)
    return nn.LayerNorm(epsilon=self.ln_epsilon, name=name)

  def init_rule(self, path: str) -> dict:
    # q/k/v kernels [d, H, hd]: flax's DenseGeneral takes the fan-in over the contracted axis.
    if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
      return {"fan_in_axes": (0,)}
    if path.endswith("wpe/embedding"):
      return {"std": 0.01}
    return {}

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False, mask: jax.Array | None = None,
               token_types: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] (or [B, num_outputs] with a classifier head).

    Args:
      tokens: token ids.
      train: enables dropout (needs a ``"dropout"`` rng when ``dropout_rate > 0``).
      mask: optional [B, T] attention mask (True/1 = real token).
      token_types: optional [B, T] segment ids (BERT).
    """
    b, t = tokens.shape
    if t > self.max_len and self.position == "learned":
      raise ValueError(f"Sequence length {t} exceeds max_len={self.max_len}.")
    wte = nn.Embed(self.vocab_size, self.d_model, name="wte",
                   embedding_init=nn.initializers.normal(0.02))
    x = wte(tokens)
    if self.position == "learned":
      wpe = nn.Embed(self.max_len, self.d_model, name="wpe",
                     embedding_init=nn.initializers.normal(0.01))
      x = x + wpe(jnp.arange(t, dtype=jnp.int32)).reshape(1, t, self.d_model)
    if self.type_vocab_size:
      types = jnp.zeros_like(tokens) if token_types is None else token_types
      x = x + nn.Embed(self.type_vocab_size, self.d_model, name="wtt",
                       embedding_init=nn.initializers.normal(0.02))(types)
    if self.embed_norm:
      x = self._norm("ln_emb")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    cfg = BlockConfig(*(getattr(self, f) for f in BlockConfig._fields))
    for l, (h, f) in enumerate(zip(self.heads(), self.mlp_dims())):
      x = Block(cfg, h, f, name=f"block_{l}")(x, mask, train)
    if not self.post_ln:
      x = self._norm("ln_f")(x)
    if self.num_outputs is not None:
      pooled = x[:, 0] if not self.causal else x[:, -1]
      return nn.Dense(self.num_outputs, name="head")(pooled)
    if self.tie_embeddings:
      return wte.attend(x)
    return nn.Dense(self.vocab_size, use_bias=False, name="head")(x)

  # ---- growth -----------------------------------------------------------------------------

  def _has_stream_site(self) -> bool:
    return not self.post_ln and not self.embed_norm

  def growth_sites(self) -> dict[str, Site]:
    sites = {}
    act = common.activation(self.activation)
    theta = self.rope_theta if self.position == "rope" else 0.0
    seq = self.max_len
    for l, (nh, f) in enumerate(zip(self.heads(), self.mlp_dims())):
      b = f"params/block_{l}"
      leaves = []
      for p in ("query", "key", "value"):
        leaves.append(Leaf(f"{p[0]}_kernel", f"{b}/{p}/kernel", 1, IN, positions=seq))
        if self.use_bias:
          leaves.append(Leaf(f"{p[0]}_bias", f"{b}/{p}/bias", 0, IN))
      leaves.append(Leaf("kernel", f"{b}/out/kernel", 0, OUT, add="zero", positions=seq))
      sites[f"block_{l}/heads"] = Site(
          name=f"block_{l}/heads", field=("num_heads", l), width=nh, leaves=tuple(leaves),
          h_path=f"intermediates/block_{l}/h_heads", u_path=f"perturbations/block_{l}/u_heads",
          fan_in=functools.partial(_heads_fan_in, causal=self.causal, rope_theta=theta),
          fan_out=_heads_fan_out, a_axis=-2)
      leaves = [Leaf("kernel", f"{b}/fc_in/kernel", 1, IN, positions=seq)]
      if self.use_bias:
        leaves.append(Leaf("bias", f"{b}/fc_in/bias", 0, IN))
      if self.mlp == "swiglu":
        leaves.append(Leaf("gate_kernel", f"{b}/fc_gate/kernel", 1, IN, positions=seq))
        if self.use_bias:
          leaves.append(Leaf("gate_bias", f"{b}/fc_gate/bias", 0, IN))
      leaves.append(Leaf("kernel", f"{b}/fc_out/kernel", 0, OUT, add="zero", positions=seq))
      sites[f"block_{l}/mlp"] = Site(
          name=f"block_{l}/mlp", field=("mlp_dim", l), width=f, leaves=tuple(leaves),
          h_path=f"intermediates/block_{l}/h_mlp", u_path=f"perturbations/block_{l}/u_mlp",
          fan_in=functools.partial(_mlp_fan_in, act=act), fan_out=_mlp_fan_out)
    if self._has_stream_site():
      sites["stream"] = self._stream_site()
    return sites

  def _stream_site(self) -> Site:
    write = "mean" if self.norm == "layer" else "zero"
    seq = self.max_len
    leaves = [Leaf("wte", "params/wte/embedding", 1, IN, add=write)]
    if self.position == "learned":
      leaves.append(Leaf("wpe", "params/wpe/embedding", 1, IN, add=write))
    if self.type_vocab_size:
      leaves.append(Leaf("wtt", "params/wtt/embedding", 1, IN, add=write))
    norms = ["ln_f"]
    for l in range(self.num_layers):
      b = f"block_{l}"
      norms += [f"{b}/ln1", f"{b}/ln2"]
      leaves.append(Leaf(f"{b}_out", f"params/{b}/out/kernel", 2, IN, add=write,
                         positions=seq))
      leaves.append(Leaf(f"{b}_fc_out", f"params/{b}/fc_out/kernel", 1, IN, add=write,
                         positions=seq))
      if self.use_bias:
        leaves.append(Leaf(f"{b}_out_bias", f"params/{b}/out/bias", 0, IN, add=write))
        leaves.append(Leaf(f"{b}_fc_out_bias", f"params/{b}/fc_out/bias", 0, IN, add=write))
      for p in ("query", "key", "value"):
        leaves.append(Leaf(f"{b}_{p}", f"params/{b}/{p}/kernel", 0, OUT, positions=seq))
      leaves.append(Leaf(f"{b}_fc_in", f"params/{b}/fc_in/kernel", 0, OUT, positions=seq))
      if self.mlp == "swiglu":
        leaves.append(Leaf(f"{b}_fc_gate", f"params/{b}/fc_gate/kernel", 0, OUT,
                           positions=seq))
    for n in norms:
      key = n.replace("/", "_")
      leaves.append(Leaf(f"{key}_scale", f"params/{n}/scale", 0, IN))
      if self.norm == "layer":
        # New dims normalise to exactly 0; a zero bias keeps them at 0 for every reader.
        leaves.append(Leaf(f"{key}_bias", f"params/{n}/bias", 0, IN, add="zero"))
    if self.num_outputs is not None or not self.tie_embeddings:
      leaves.append(Leaf("head", "params/head/kernel", 0, OUT, positions=seq))
    return Site(name="stream", field=("d_model", None), width=self.d_model, leaves=tuple(leaves),
                kind="stream", preserve=functools.partial(_rescale_norms, norms=tuple(norms)),
                splittable=False)

  def depth_positions(self) -> tuple[int, ...]:
    return tuple(range(self.num_layers)) if not self.post_ln else ()

  def deepen(self, position: int):
    """Inserts a block after ``block_<position>`` whose residual branches output zero."""
    if self.post_ln:
      raise ValueError("Post-LN blocks normalise the residual sum, so no inserted block "
                       "preserves the function; depth growth needs a pre-norm model.")
    if position not in self.depth_positions():
      raise ValueError(f"Transformer.deepen: position {position} not in "
                       f"{self.depth_positions()}.")
    p = position
    heads, dims = self.heads(), self.mlp_dims()
    renames = {f"block_{j}": f"block_{j + 1}" for j in range(self.num_layers - 1, p, -1)}
    return self.clone(num_layers=self.num_layers + 1,
                      num_heads=heads[:p + 1] + (heads[p],) + heads[p + 1:],
                      mlp_dim=dims[:p + 1] + (dims[p],) + dims[p + 1:]), renames

  def identity_layer(self, variables, position: int):
    params = dict(variables["params"])
    b = f"block_{position + 1}"
    blk = dict(params[b])
    for name in ("out", "fc_out"):
      blk[name] = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype)), blk[name])
    params[b] = blk
    return {**variables, "params": params}


def _rescale_norms(model, variables, old: int, k: int, *, norms):
  """After appending ``k`` stream dims: old norm scales × sqrt(d/(d+k)), epsilon × d/(d+k)."""
  factor = old / (old + k)
  params = jax.tree.map(lambda x: x, variables["params"])  # shallow-safe copy of the nesting
  for n in norms:
    node = params
    parts = n.split("/")
    for part in parts[:-1]:
      node = node[part]
    leaf = dict(node[parts[-1]])
    scale = np.array(leaf["scale"])
    scale[:old] *= np.asarray(math.sqrt(factor), scale.dtype)
    leaf["scale"] = jax.device_put(scale)
    node[parts[-1]] = leaf
  return model.clone(ln_epsilon=model.ln_epsilon * factor), {**variables, "params": params}
