"""Hugging Face safetensors checkpoints loaded into growjax.nets.Transformer.

Oracle: Hugging Face transformers' own PyTorch forward of the same tiny random models (GPT-2,
BERT, LLaMA with grouped-query attention), saved with ``save_pretrained(safe_serialization=True)``.
Every parameter is re-drawn at a large scale first (LayerNorm scales and biases included) so a
mis-mapped or transposed tensor changes the outputs far beyond the tolerance.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from growjax.nets import checkpoints

TOL = dict(rtol=1e-4, atol=1e-4)


def _randomize(model, seed: int, scale: float = 0.25):
  """Re-draws every parameter (norm scales around 1) so each one matters to the output."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * scale
      p.copy_(1.0 + noise if ("LayerNorm.weight" in name or "ln_" in name or "norm.weight" in name)
              else noise)
  return model.eval()


def _save(model, path) -> str:
  model.save_pretrained(path, safe_serialization=True)
  return os.fspath(path)


def _tokens(vocab: int, shape=(2, 12), seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)


@pytest.mark.parametrize("activation,tied", [("gelu_new", True), ("gelu", False)])
def test_gpt2_logits_and_hidden_states_match_pytorch(tmp_path, activation, tied):
  cfg = transformers.GPT2Config(vocab_size=61, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                activation_function=activation, tie_word_embeddings=tied,
                                bos_token_id=0, eos_token_id=0)
  hf = _randomize(transformers.GPT2LMHeadModel(cfg), seed=1)
  loaded = checkpoints.load_hf_checkpoint(_save(hf, tmp_path))
  assert loaded.model_type == "gpt2" and loaded.model.tie_embeddings == tied
  assert loaded.model.activation == ("gelu" if activation == "gelu_new" else "gelu_exact")
  toks = _tokens(61)
  with torch.no_grad():
    out = hf(torch.from_numpy(toks), output_hidden_states=True)
  logits = loaded.model.apply(loaded.variables, jnp.asarray(toks, jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), **TOL)
  hidden = checkpoints.hidden_states(loaded.model, loaded.variables, jnp.asarray(toks, jnp.int32))
  np.testing.assert_allclose(np.asarray(hidden), out.hidden_states[-1].numpy(), **TOL)


def test_bert_encoder_matches_pytorch_with_padding_and_token_types(tmp_path):
  cfg = transformers.BertConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=48,
                                max_position_embeddings=20, type_vocab_size=2)
  hf = _randomize(transformers.BertModel(cfg), seed=2)
  path = _save(hf, tmp_path / "bert")
  # BertModel saves its pooler: refused unless skipped explicitly, with the fix in the message.
  with pytest.raises(ValueError, match=r"pooler\.dense\.weight.*BERT_HEADS"):
    checkpoints.load_hf_checkpoint(path)
  loaded = checkpoints.load_hf_checkpoint(path, ignore=checkpoints.BERT_HEADS)
  assert set(loaded.ignored) == {"pooler.dense.weight", "pooler.dense.bias"}
  toks = _tokens(53, (3, 10), seed=1)
  types = np.random.default_rng(2).integers(0, 2, toks.shape).astype(np.int64)
  mask = np.ones(toks.shape, np.int64)
  mask[0, 7:] = 0
  mask[2, 4:] = 0
  with torch.no_grad():
    ref = hf(torch.from_numpy(toks), attention_mask=torch.from_numpy(mask),
             token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()
  hidden = checkpoints.hidden_states(loaded.model, loaded.variables, jnp.asarray(toks, jnp.int32),
                                     mask=jnp.asarray(mask, bool),
                                     token_types=jnp.asarray(types, jnp.int32))
  np.testing.assert_allclose(np.asarray(hidden), ref, **TOL)


def test_bert_task_checkpoint_loads_its_encoder(tmp_path):
  cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=12)
  hf = _randomize(transformers.BertForMaskedLM(cfg), seed=3)
  path = _save(hf, tmp_path)
  with pytest.raises(ValueError, match=r"cls\.predictions"):
    checkpoints.load_hf_checkpoint(path)
  loaded = checkpoints.load_hf_checkpoint(path, ignore=checkpoints.BERT_HEADS)
  toks = _tokens(40, (2, 9), seed=4)
  with torch.no_grad():
    ref = hf.bert(torch.from_numpy(toks)).last_hidden_state.numpy()
  hidden = checkpoints.hidden_states(loaded.model, loaded.variables, jnp.asarray(toks, jnp.int32))
  np.testing.assert_allclose(np.asarray(hidden), ref, **TOL)


@pytest.mark.parametrize("kv_heads,attention_bias,tied", [(2, True, False), (4, False, True)])
def test_llama_logits_match_pytorch(tmp_path, kv_heads, attention_bias, tied):
  cfg = transformers.LlamaConfig(vocab_size=57, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=kv_heads,
                                 intermediate_size=40, max_position_embeddings=32,
                                 rope_theta=500.0, attention_bias=attention_bias,
                                 tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
  hf = _randomize(transformers.LlamaForCausalLM(cfg), seed=4)
  loaded = checkpoints.load_hf_checkpoint(_save(hf, tmp_path))
  m = loaded.model
  assert (m.position, m.norm, m.mlp, m.rope_theta) == ("rope", "rms", "swiglu", 500.0)
  assert m.use_bias == attention_bias and m.tie_embeddings == tied
  toks = _tokens(57, (2, 16), seed=5)
  with torch.no_grad():
    ref = hf(torch.from_numpy(toks)).logits.numpy()
  logits = m.apply(loaded.variables, jnp.asarray(toks, jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), ref, **TOL)


def _tiny_gpt2(path) -> str:
  cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                bos_token_id=0, eos_token_id=0)
  return _save(transformers.GPT2LMHeadModel(cfg), path)


def test_missing_files_and_pickles_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoints.load_hf_checkpoint(tmp_path / "nowhere")
  pickled = tmp_path / "pt" / "pytorch_model.bin"
  pickled.parent.mkdir()
  pickled.write_bytes(b"\x80\x04not really")
  with pytest.raises(ValueError, match="pickled"):
    checkpoints.load_hf_checkpoint(pickled)
  with pytest.raises(ValueError, match="pickled"):
    checkpoints.load_hf_checkpoint(pickled.parent)
  path = _tiny_gpt2(tmp_path / "gpt2")
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpoints.load_hf_checkpoint(path)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x05" + b"\x00" * 20)
  with pytest.raises(ValueError, match="not a safetensors"):
    checkpoints.read_safetensors(bad)


def test_unknown_missing_keys_and_unsupported_configs_are_listed(tmp_path):
  path = _tiny_gpt2(tmp_path / "gpt2")
  weights = os.path.join(path, "model.safetensors")
  tensors = dict(safetensors.numpy.load_file(weights))
  dropped = tensors.pop("transformer.h.0.mlp.c_fc.bias")
  tensors["transformer.h.0.adapter.weight"] = np.zeros((2, 2), np.float32)
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(ValueError) as err:
    checkpoints.load_hf_checkpoint(path)
  assert "transformer.h.0.adapter.weight" in str(err.value)
  assert "transformer.h.0.mlp.c_fc.bias" in str(err.value)
  # Skipping the unknown key leaves only the missing one.
  with pytest.raises(ValueError, match=r"missing keys \['transformer.h.0.mlp.c_fc.bias'\]"):
    checkpoints.load_hf_checkpoint(path, ignore=r"adapter")
  tensors["transformer.h.0.mlp.c_fc.bias"] = dropped
  tensors["transformer.wpe.weight"] = np.zeros((9, 8), np.float32)  # config says n_positions=8
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(ValueError, match="wpe/embedding"):
    checkpoints.load_hf_checkpoint(path, ignore=r"adapter")
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path, encoding="utf-8"))
  for change, message in (({"model_type": "t5"}, "model_type='t5'"),
                          ({"scale_attn_by_inverse_layer_idx": True}, "inverse_layer_idx"),
                          ({"activation_function": "gelu_fast"}, "gelu_fast")):
    with open(cfg_path, "w", encoding="utf-8") as f:
      json.dump({**cfg, **change}, f)
    with pytest.raises(ValueError, match=message):
      checkpoints.load_hf_checkpoint(path)


def test_bfloat16_checkpoint_and_sharded_index(tmp_path):
  path = _tiny_gpt2(tmp_path / "gpt2")
  weights = os.path.join(path, "model.safetensors")
  ref = checkpoints.load_hf_checkpoint(path).variables
  tensors = safetensors.numpy.load_file(weights)
  names = sorted(tensors)
  os.remove(weights)
  # Two shards, one of them bf16 (written through torch, which numpy cannot express natively).
  half = len(names) // 2
  safetensors.numpy.save_file({k: tensors[k] for k in names[:half]},
                              os.path.join(path, "model-00001-of-00002.safetensors"))
  safetensors.torch.save_file(
      {k: torch.from_numpy(tensors[k]).to(torch.bfloat16) for k in names[half:]},
      os.path.join(path, "model-00002-of-00002.safetensors"))
  index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                          for i, k in enumerate(names)}}
  with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f)
  got = checkpoints.load_hf_checkpoint(path).variables
  exact = 0
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2 ** -8, atol=1e-30)
    exact += bool(np.array_equal(np.asarray(a), np.asarray(b)))
  assert 0 < exact < len(jax.tree.leaves(ref))  # the bf16 shard was really rounded
