"""Pretrained transformer weights from local safetensors checkpoints in Hugging Face naming.

Loads GPT-2 (Radford et al. 2019), BERT (Devlin et al. 2018, arXiv:1810.04805) and LLaMA (Touvron
et al. 2023, arXiv:2302.13971) checkpoints written by Hugging Face ``save_pretrained`` into one
``growjax.nets.Transformer`` (its parameter layout is in ``growjax.nets.transformer``), building
the growjax config from the ``config.json`` next to the weights:

* **GPT-2** (``model_type="gpt2"``; ``GPT2Model`` or ``GPT2LMHeadModel``): pre-LN, learned
  positions, ``Conv1D`` projections stored ``[d_in, d_out]`` (``y = xW + b``, the Flax layout
  already; the fused ``c_attn`` [d, 3d] is split into query/key/value in that order), the LM
  head tied to ``wte`` (an untied ``lm_head.weight`` loads into ``head``). ``gelu_new`` is the
  tanh approximation, growjax's ``"gelu"``; ``"gelu"`` (erf) maps to ``"gelu_exact"``.
* **BERT** (``model_type="bert"``; ``BertModel`` or the ``bert.`` encoder of a task model):
  post-LN blocks, token types, an embedding LayerNorm, exact (erf) GELU. Only the *encoder* is
  supported: the pooler (``pooler.dense``), the MLM head (``cls.predictions``: dense + GELU +
  LayerNorm + tied decoder + bias), the NSP head and classifiers have no counterpart in
  ``Transformer``; a checkpoint holding them is refused unless they are skipped explicitly with
  ``ignore=BERT_HEADS``. The loaded model's "logits" are ``hidden · wteᵀ`` (the tied embedding
  read-out without BERT's MLM transform); use ``hidden_states`` for the encoder output.
* **LLaMA** (``model_type="llama"``; ``LlamaModel`` or ``LlamaForCausalLM``): pre-RMSNorm,
  SwiGLU (``gate_proj`` -> ``fc_gate``, ``up_proj`` -> ``fc_in``, ``down_proj`` -> ``fc_out``),
  rotary positions, untied ``lm_head`` (or tied when ``tie_word_embeddings``). Hugging Face
  stores q/k projections already permuted for the *rotate-half* rotary convention (its
  conversion script permutes Meta's interleaved layout), which is the convention of
  ``growjax.nets.transformer.rope``, so the weights load without a permutation (the tests
  compare logits with the PyTorch forward). Grouped-query attention (``num_key_value_heads <
  num_attention_heads``) is converted exactly by repeating each key/value head for the query
  heads it serves (Hugging Face's ``repeat_kv`` order: query head h reads kv head
  ``h // group``): the forward pass is identical, the expanded copies are independent
  parameters afterwards (more memory; training or growing them unties them). ``attention_bias``
  without ``mlp_bias`` (or the reverse) loads with zero biases where the checkpoint has none.
  Rotary scaling (``rope_type`` other than ``"default"``) is refused.

Only safetensors are read (a 30-line reader of the format: an 8-byte header length, a JSON
header, raw little-endian tensors; bfloat16 through ``ml_dtypes``); pickled ``.bin``/``.pt``
checkpoints are refused because unpickling runs arbitrary code. Sharded checkpoints
(``model.safetensors.index.json``) are supported. Every tensor of the checkpoint must be used
or explicitly ignored and every growjax parameter must be filled; otherwise the error lists the
unknown and missing keys. Non-parameter buffers of old checkpoints (GPT-2 ``attn.bias`` /
``attn.masked_bias`` masks, BERT ``position_ids``, LLaMA ``rotary_emb.inv_freq``) are skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from growjax import tree as gtree
from growjax.nets.transformer import Transformer

SUPPORTED = ("gpt2", "bert", "llama")
BERT_HEADS = (r"^(bert\.)?pooler\.", r"^cls\.")
"""``ignore`` patterns that load a BERT task checkpoint's encoder and skip its heads."""

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_BUFFERS = (r"(^|\.)attn\.(masked_)?bias$", r"(^|\.)embeddings\.position_ids$",
            r"(^|\.)rotary_emb\.inv_freq$")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class HFCheckpoint(NamedTuple):
  """A loaded checkpoint.

  Attributes:
    model: the ``Transformer`` built from ``config.json``.
    variables: ``{"params": ...}`` ready for ``model.apply``.
    model_type: ``"gpt2"``, ``"bert"`` or ``"llama"``.
    hf_config: the parsed ``config.json``.
    ignored: checkpoint keys that were skipped (``ignore`` patterns and buffers).
  """
  model: Transformer
  variables: dict
  model_type: str
  hf_config: dict
  ignored: tuple[str, ...]


# ---- safetensors ------------------------------------------------------------------------------

def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays (read-only memory maps).

  Raises:
    FileNotFoundError: no such file. ValueError: not a valid safetensors file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No safetensors file at {path!r}.")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= size - 8:
      raise ValueError(f"{path!r} is not a safetensors file (bad header length {n}).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path!r} is not a safetensors file (header is not JSON: {e}).") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else (
      np.zeros((0,), np.uint8))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dt = _DTYPES.get(info.get("dtype"))
    if dt is None:
      raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}; "
                       f"supported: {sorted(_DTYPES)}.")
    shape = tuple(int(s) for s in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    if end - begin != math.prod(shape) * np.dtype(dt).itemsize or end > data.shape[0]:
      raise ValueError(f"{path!r}: tensor {name!r} offsets {begin}..{end} do not fit its shape "
                       f"{shape} and dtype {info['dtype']} within the file.")
    out[name] = data[begin:end].view(dt).reshape(shape)
  return out


def _refuse_pickle(path: str) -> None:
  raise ValueError(
      f"{path!r} is a pickled PyTorch checkpoint; growjax only loads safetensors (unpickling "
      f"runs arbitrary code). Convert it once in a trusted environment, e.g. "
      f"`AutoModel.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`.")


def _checkpoint_files(path: str) -> tuple[str, list[str]]:
  """``(directory, safetensors files)`` of a checkpoint directory or file."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No checkpoint at {path!r}: give a directory written by Hugging Face "
        f"save_pretrained(safe_serialization=True) (config.json + model.safetensors) or a "
        f".safetensors file with config.json beside it. growjax never downloads weights.")
  if os.path.isfile(path):
    if path.endswith(_PICKLE_SUFFIXES):
      _refuse_pickle(path)
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path!r} is not a .safetensors file.")
    return os.path.dirname(os.path.abspath(path)), [path]
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map", {})
    files = sorted({os.path.join(path, v) for v in weight_map.values()})
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"Shards listed in {index!r} are missing: {missing}.")
    return path, files
  if os.path.isfile(single):
    return path, [single]
  found = sorted(os.listdir(path))
  pickles = [p for p in found if p.endswith(_PICKLE_SUFFIXES)]
  if pickles:
    _refuse_pickle(os.path.join(path, pickles[0]))
  raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) in {path!r}; "
                          f"it holds {found}.")


def _read_config(directory: str) -> dict:
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"No config.json at {cfg_path!r}; the model config must sit next to "
                            f"the weights (Hugging Face save_pretrained writes both).")
  with open(cfg_path, encoding="utf-8") as f:
    return json.load(f)


# ---- configs ----------------------------------------------------------------------------------

_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": None,
                "gelu": "gelu_exact", "relu": "relu", "silu": "silu", "swish": "silu",
                "tanh": "tanh"}


def _activation(name: str, model_type: str) -> str:
  act = _ACTIVATIONS.get(name)
  if act is None:
    raise ValueError(f"{model_type} checkpoint uses activation {name!r}, which growjax does not "
                     f"implement exactly; supported: "
                     f"{sorted(k for k, v in _ACTIVATIONS.items() if v)}.")
  return act


def _refuse(model_type: str, what: str) -> None:
  raise ValueError(f"This {model_type} checkpoint uses {what}, which growjax.nets.Transformer "
                   f"does not implement; refusing rather than loading a different function.")


def transformer_config(hf_config: Mapping[str, Any]) -> Transformer:
  """The ``Transformer`` matching a Hugging Face ``config.json`` (GPT-2, BERT or LLaMA)."""
  c = dict(hf_config)
  mt = c.get("model_type")
  if mt == "gpt2":
    if c.get("scale_attn_by_inverse_layer_idx"):
      _refuse(mt, "scale_attn_by_inverse_layer_idx=True")
    if not c.get("scale_attn_weights", True):
      _refuse(mt, "scale_attn_weights=False")
    if c.get("add_cross_attention"):
      _refuse(mt, "cross-attention")
    d, h = c["n_embd"], c["n_head"]
    return Transformer(
        vocab_size=c["vocab_size"], max_len=c["n_positions"], d_model=d,
        num_layers=c["n_layer"], num_heads=h, head_dim=d // h,
        mlp_dim=c.get("n_inner") or 4 * d, causal=True, post_ln=False, norm="layer",
        mlp="plain", activation=_activation(c.get("activation_function", "gelu_new"), mt),
        position="learned", use_bias=True, tie_embeddings=c.get("tie_word_embeddings", True),
        ln_epsilon=c.get("layer_norm_epsilon", 1e-5))
  if mt == "bert":
    if c.get("position_embedding_type", "absolute") != "absolute":
      _refuse(mt, f"position_embedding_type={c['position_embedding_type']!r}")
    if c.get("is_decoder") or c.get("add_cross_attention"):
      _refuse(mt, "a decoder / cross-attention configuration")
    d, h = c["hidden_size"], c["num_attention_heads"]
    return Transformer(
        vocab_size=c["vocab_size"], max_len=c["max_position_embeddings"], d_model=d,
        num_layers=c["num_hidden_layers"], num_heads=h, head_dim=d // h,
        mlp_dim=c["intermediate_size"], causal=False, post_ln=True, norm="layer",
        mlp="plain", activation=_activation(c.get("hidden_act", "gelu"), mt),
        position="learned", use_bias=True, tie_embeddings=True, embed_norm=True,
        type_vocab_size=c.get("type_vocab_size", 2), ln_epsilon=c.get("layer_norm_eps", 1e-12))
  if mt == "llama":
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      _refuse(mt, f"rotary scaling {rope!r}")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    d, h = c["hidden_size"], c["num_attention_heads"]
    return Transformer(
        vocab_size=c["vocab_size"], max_len=c.get("max_position_embeddings", 2048), d_model=d,
        num_layers=c["num_hidden_layers"], num_heads=h, head_dim=c.get("head_dim") or d // h,
        mlp_dim=c["intermediate_size"], causal=True, post_ln=False, norm="rms", mlp="swiglu",
        activation=_activation(c.get("hidden_act", "silu"), mt), position="rope",
        rope_theta=float(theta),
        use_bias=bool(c.get("attention_bias", False) or c.get("mlp_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        ln_epsilon=c.get("rms_norm_eps", 1e-6))
  raise ValueError(f"config.json has model_type={mt!r}; growjax loads {SUPPORTED}.")


# ---- weight conversion ------------------------------------------------------------------------

class _Source:
  """The checkpoint's tensors; records used and missing keys.

  Task models prefix the base model's keys (``transformer.``, ``bert.``, ``model.``) while
  base-model checkpoints do not; names are given without the prefix and looked up both ways.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
    self.raw = dict(tensors)
    self.prefix = prefix
    self.prefixed = any(k.startswith(prefix) for k in self.raw)
    self.used: set[str] = set()
    self.missing: list[str] = []

  def key(self, name: str) -> str:
    if (self.prefix + name) in self.raw or (self.prefixed and not name.startswith("lm_head")):
      return self.prefix + name
    return name

  def has(self, name: str) -> bool:
    return self.key(name) in self.raw

  def get(self, name: str) -> np.ndarray | None:
    k = self.key(name)
    if k not in self.raw:
      self.missing.append(k)
      return None
    self.used.add(k)
    return np.asarray(self.raw[k])


def _heads_in(w: np.ndarray | None, h: int, hd: int, torch_linear: bool):
  """A q/k/v weight as a growjax kernel [d, H, hd]."""
  if w is None:
    return None
  w = w.T if torch_linear else w  # nn.Linear stores [out, in]; Conv1D [in, out]
  return w.reshape(w.shape[0], h, hd)


def _heads_out(w: np.ndarray | None, h: int, hd: int, torch_linear: bool):
  """An attention output weight as a growjax kernel [H, hd, d]."""
  if w is None:
    return None
  w = w.T if torch_linear else w
  return w.reshape(h, hd, w.shape[-1])


def _t(w):
  return None if w is None else w.T


def _gpt2(src: _Source, m: Transformer) -> dict[str, np.ndarray | None]:
  h, hd, d = m.num_heads, m.head_dim, m.d_model
  out = {"wte/embedding": src.get("wte.weight"), "wpe/embedding": src.get("wpe.weight"),
         "ln_f/scale": src.get("ln_f.weight"), "ln_f/bias": src.get("ln_f.bias")}
  for l in range(m.num_layers):
    p, b = f"h.{l}.", f"block_{l}/"
    w, bias = src.get(p + "attn.c_attn.weight"), src.get(p + "attn.c_attn.bias")
    for i, name in enumerate(("query", "key", "value")):
      out[b + f"{name}/kernel"] = None if w is None else _heads_in(
          w[:, i * d:(i + 1) * d], h, hd, False)
      out[b + f"{name}/bias"] = None if bias is None else bias[i * d:(i + 1) * d].reshape(h, hd)
    out[b + "out/kernel"] = _heads_out(src.get(p + "attn.c_proj.weight"), h, hd, False)
    out[b + "out/bias"] = src.get(p + "attn.c_proj.bias")
    for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
      out[b + f"{ours}/scale"] = src.get(p + f"{theirs}.weight")
      out[b + f"{ours}/bias"] = src.get(p + f"{theirs}.bias")
    for ours, theirs in (("fc_in", "c_fc"), ("fc_out", "c_proj")):
      out[b + f"{ours}/kernel"] = src.get(p + f"mlp.{theirs}.weight")
      out[b + f"{ours}/bias"] = src.get(p + f"mlp.{theirs}.bias")
  if not m.tie_embeddings:
    out["head/kernel"] = _t(src.get("lm_head.weight"))
  elif src.has("lm_head.weight"):
    _same_as_tied(src, "lm_head.weight", out["wte/embedding"])
  return out


def _same_as_tied(src: _Source, name: str, wte: np.ndarray | None) -> None:
  """A tied head saved explicitly must equal the embedding (then it is redundant)."""
  head = src.get(name)
  if wte is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
    raise ValueError(f"config.json says tie_word_embeddings=True but {name!r} differs from the "
                     f"token embedding; fix the config (tie_word_embeddings=false) to load it.")


def _layer_norm(src: _Source, prefix: str) -> tuple[np.ndarray | None, np.ndarray | None]:
  # Checkpoints from the TensorFlow era call the LayerNorm parameters gamma/beta.
  if not src.has(prefix + "weight") and src.has(prefix + "gamma"):
    return src.get(prefix + "gamma"), src.get(prefix + "beta")
  return src.get(prefix + "weight"), src.get(prefix + "bias")


def _bert(src: _Source, m: Transformer) -> dict[str, np.ndarray | None]:
  h, hd = m.num_heads, m.head_dim
  e = "embeddings."
  out = {"wte/embedding": src.get(e + "word_embeddings.weight"),
         "wpe/embedding": src.get(e + "position_embeddings.weight"),
         "wtt/embedding": src.get(e + "token_type_embeddings.weight")}
  out["ln_emb/scale"], out["ln_emb/bias"] = _layer_norm(src, e + "LayerNorm.")
  for l in range(m.num_layers):
    p, b = f"encoder.layer.{l}.", f"block_{l}/"
    for name in ("query", "key", "value"):
      out[b + f"{name}/kernel"] = _heads_in(src.get(p + f"attention.self.{name}.weight"), h, hd,
                                            True)
      bias = src.get(p + f"attention.self.{name}.bias")
      out[b + f"{name}/bias"] = None if bias is None else bias.reshape(h, hd)
    out[b + "out/kernel"] = _heads_out(src.get(p + "attention.output.dense.weight"), h, hd, True)
    out[b + "out/bias"] = src.get(p + "attention.output.dense.bias")
    out[b + "ln1/scale"], out[b + "ln1/bias"] = _layer_norm(src, p + "attention.output.LayerNorm.")
    out[b + "fc_in/kernel"] = _t(src.get(p + "intermediate.dense.weight"))
    out[b + "fc_in/bias"] = src.get(p + "intermediate.dense.bias")
    out[b + "fc_out/kernel"] = _t(src.get(p + "output.dense.weight"))
    out[b + "fc_out/bias"] = src.get(p + "output.dense.bias")
    out[b + "ln2/scale"], out[b + "ln2/bias"] = _layer_norm(src, p + "output.LayerNorm.")
  return out


def _llama(src: _Source, m: Transformer, hf: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
  h, hd = m.num_heads, m.head_dim
  kv = int(hf.get("num_key_value_heads") or h)
  if h % kv:
    raise ValueError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={kv}.")
  group = h // kv
  attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
  out = {"wte/embedding": src.get("embed_tokens.weight"), "ln_f/scale": src.get("norm.weight")}

  def bias(name, n, present):
    if present:
      return src.get(name)
    return np.zeros((n,), np.float32) if m.use_bias else None

  for l in range(m.num_layers):
    p, b = f"layers.{l}.", f"block_{l}/"
    out[b + "ln1/scale"] = src.get(p + "input_layernorm.weight")
    out[b + "ln2/scale"] = src.get(p + "post_attention_layernorm.weight")
    for name, proj, heads in (("query", "q", h), ("key", "k", kv), ("value", "v", kv)):
      w = _heads_in(src.get(p + f"self_attn.{proj}_proj.weight"), heads, hd, True)
      bb = bias(p + f"self_attn.{proj}_proj.bias", heads * hd, attn_bias)
      if heads != h:
        # Grouped-query attention: query head j reads kv head j // group (HF repeat_kv).
        w = None if w is None else np.repeat(w, group, axis=1)
        bb = None if bb is None else np.repeat(bb.reshape(heads, hd), group, axis=0)
      out[b + f"{name}/kernel"] = w
      if m.use_bias:
        out[b + f"{name}/bias"] = None if bb is None else bb.reshape(h, hd)
    out[b + "out/kernel"] = _heads_out(src.get(p + "self_attn.o_proj.weight"), h, hd, True)
    for ours, theirs in (("fc_gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj")):
      out[b + f"{ours}/kernel"] = _t(src.get(p + f"mlp.{theirs}.weight"))
    if m.use_bias:
      out[b + "out/bias"] = bias(p + "self_attn.o_proj.bias", m.d_model, attn_bias)
      out[b + "fc_gate/bias"] = bias(p + "mlp.gate_proj.bias", m.mlp_dim, mlp_bias)
      out[b + "fc_in/bias"] = bias(p + "mlp.up_proj.bias", m.mlp_dim, mlp_bias)
      out[b + "fc_out/bias"] = bias(p + "mlp.down_proj.bias", m.d_model, mlp_bias)
  if not m.tie_embeddings:
    out["head/kernel"] = _t(src.get("lm_head.weight"))
  elif src.has("lm_head.weight"):
    _same_as_tied(src, "lm_head.weight", out["wte/embedding"])
  return out


_PREFIX = {"gpt2": "transformer.", "bert": "bert.", "llama": "model."}


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                       ignore: str | Iterable[str] = ()) -> HFCheckpoint:
  """Loads a Hugging Face safetensors checkpoint (GPT-2, BERT encoder, LLaMA) into a Transformer.

  Args:
    path: a directory written by ``save_pretrained(safe_serialization=True)`` (``config.json``
      and ``model.safetensors`` or a sharded ``model.safetensors.index.json``), or one
      ``.safetensors`` file with ``config.json`` in the same directory.
    dtype: dtype of the returned parameters (checkpoints in bf16/fp16 are upcast or kept).
    ignore: regex(es) (``re.search``) of checkpoint keys to skip, e.g. ``BERT_HEADS``.

  Returns:
    ``HFCheckpoint(model, variables, model_type, hf_config, ignored)``.

  Raises:
    FileNotFoundError: the path, config.json or a shard does not exist (named).
    ValueError: pickled checkpoint, unsupported architecture/option, or checkpoint keys that are
      unknown (not used, not ignored) or missing (listed), or shapes that do not fit the config.
  """
  path = os.fspath(path)
  directory, files = _checkpoint_files(path)
  hf = _read_config(directory)
  model = transformer_config(hf)
  model.validate()
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    tensors.update(read_safetensors(f))
  mt = hf["model_type"]
  patterns = [ignore] if isinstance(ignore, str) else list(ignore)
  skipped = {k for k in tensors if any(re.search(p, k) for p in (*patterns, *_BUFFERS))}
  src = _Source({k: v for k, v in tensors.items() if k not in skipped}, _PREFIX[mt])
  convert: Callable = {"gpt2": _gpt2, "bert": _bert,
                       "llama": lambda s, m: _llama(s, m, hf)}[mt]
  flat = convert(src, model)
  unknown = sorted(set(src.raw) - src.used)
  if unknown or src.missing:
    hint = ""
    if mt == "bert" and any(re.search(p, k) for p in BERT_HEADS for k in unknown):
      hint = (" BERT pooler/MLM/NSP heads are not part of growjax.nets.Transformer: pass "
              "ignore=growjax.nets.checkpoints.BERT_HEADS to load the encoder only.")
    raise ValueError(f"Checkpoint {path!r} ({mt}) does not match the growjax {mt} layout: "
                     f"unknown keys {unknown}, missing keys {src.missing}.{hint}")
  expected = gtree.flatten(jax.eval_shape(model.init_variables, jax.random.key(0))["params"])
  absent = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if absent or extra:  # a converter bug, not a user error; still say exactly what.
    raise ValueError(f"Converted {mt} parameters do not match the Transformer: missing "
                     f"{absent}, unexpected {extra}.")
  bad = {p: (tuple(np.shape(flat[p])), tuple(a.shape)) for p, a in expected.items()
         if tuple(np.shape(flat[p])) != tuple(a.shape)}
  if bad:
    raise ValueError(f"Checkpoint tensors do not fit the shapes config.json implies "
                     f"(got, expected): {bad}.")
  params = gtree.unflatten({p: jnp.asarray(flat[p], dtype) for p in expected})
  return HFCheckpoint(model, {"params": params}, mt, hf, tuple(sorted(skipped)))


def hidden_states(model: Transformer, variables, tokens: jax.Array, **kwargs) -> jax.Array:
  """The final hidden states [B, T, d] (after ``ln_f`` for pre-norm models, the last block's
  output for post-norm BERT): Hugging Face's ``last_hidden_state``.

  Args:
    model: the Transformer.
    variables: its variables.
    tokens: [B, T] token ids.
    **kwargs: ``mask``, ``token_types``, ``train`` as for ``model.apply``.
  """
  target = f"block_{model.num_layers - 1}" if model.post_ln else "ln_f"
  _, state = model.apply(
      variables, tokens, capture_intermediates=lambda mdl, method: (
          mdl.name == target and method == "__call__"), mutable=["intermediates"], **kwargs)
  return state["intermediates"][target]["__call__"][0]
