"""Benchmark: growjax.quant against bitsandbytes' CPU path, and the LoRA train-step overhead.

Formats after Dettmers et al. 2023 (QLoRA, arXiv:2305.14314); LoRA after Hu et al. 2021
(arXiv:2106.09685). Every figure is a ratio against a baseline measured in the same run, with the
two interleaved (alternating baseline / ours repetitions, medians), because this 2-core machine
is shared and noisy.

1. Parity with bitsandbytes (the bench extra), CPU path: the NF4 and 8-bit dynamic code books,
   and for several tensors (4096×4096, 768×3072, a ragged 1000×1024, a tensor with all-zero
   blocks, exact midpoint ties and outliers) the packed bytes, absmax scales and dequantized
   values of ``quantize_4bit(quant_type="nf4", blocksize=64)`` with and without double
   quantization (``compress_statistics=True``). The double-quantization offset is
   ``absmax.mean()``; torch's float32 mean depends on its thread count (printed), so the
   second-level codes and scales are also compared with bitsandbytes' offset passed in.
2. Speed, 4096×4096 float32, NF4, blocks of 64: quantize+pack (jitted) vs
   ``bitsandbytes.functional.quantize_4bit``; packing written as multiply-add vs shift/or on
   stride-2 slices or on a uint16 view of the code pairs, and the
   nearest-code count accumulated in uint8 / float32, each alone and fused into the whole
   quantization (the alternatives measured);
   dequantize vs ``dequantize_4bit`` with a fresh output and with a reused (donated) output
   buffer (bitsandbytes' CPU kernel has no ``out=``, it always allocates).
3. LoRA train step (``lora.value_and_grad`` + Adam on the adapters; also with a plain
   ``jax.value_and_grad`` w.r.t. the adapters) vs the frozen model's forward/backward
   (value_and_grad w.r.t. all its parameters), on growjax.nets.Transformer
   (GPT-style, d=256, 4 layers, 4×64 heads, MLP 1024, batch 8×128 tokens), LoRA r=8 on
   query/key/value/out/fc_in/fc_out; also with an NF4 base (QLoRA).

Usage: python benchmarks/quant.py [--reps 15] [--out benchmarks/results/quant.json]
(about 5 minutes on the shared 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from growjax import peft, quant  # noqa: E402
from growjax.quant import blockwise, formats  # noqa: E402
from growjax.train.metrics import format_table  # noqa: E402

try:
  import torch  # noqa: E402
  import bitsandbytes as bnb  # noqa: E402
  import bitsandbytes.functional as bnbF  # noqa: E402
except ImportError as e:  # pragma: no cover - the bench extra provides them
  raise SystemExit(
      f"benchmarks/quant.py needs bitsandbytes (bench extra): {e}. Install torch first "
      f"(pip install torch==2.13.0, a CPU wheel), then pip install bitsandbytes.") from e

F32 = np.float32


# ----------------------------------------------------------------------------- timing helpers

def interleaved(fns: dict, reps: int) -> dict:
  """Runs each function once (warm-up), then ``reps`` rounds calling all in turn.

  Returns ``{name: {"wall_ms": median, "min_wall_ms": minimum, "cpu_ms": median process CPU
  time}}``; the minimum is the least disturbed repetition on a shared machine.
  """
  for f in fns.values():
    f()
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      f()
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  return {k: {"wall_ms": 1e3 * statistics.median(wall[k]), "min_wall_ms": 1e3 * min(wall[k]),
              "cpu_ms": 1e3 * statistics.median(cpu[k])} for k in fns}


def _ulps(a: float, b: float) -> int:
  return int(abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32))))


# ----------------------------------------------------------------------------- 1. parity

def hard_matrix(shape, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * 0.02).astype(F32)
  flat = x.reshape(-1)
  code = quant.nf_code(4)
  mids = formats.midpoints(code)
  flat[:128] = 0.0
  flat[128] = 1.0
  flat[129:144] = mids
  flat[192] = -1.0
  flat[193:208] = -mids
  flat[5000] = 4.0
  return x


def parity() -> dict:
  out = {
      "nf4_table_identical": bool(np.array_equal(
          quant.nf_code(4), bnbF.get_4bit_type("nf4", device="cpu").numpy())),
      "dynamic_map_identical": bool(np.array_equal(
          quant.dynamic_code(), bnbF.create_dynamic_map().numpy())),
      "tensors": [],
  }
  rng = np.random.default_rng(0)
  cases = {
      "normal 4096x4096": (rng.standard_normal((4096, 4096)) * 0.02).astype(F32),
      "normal 768x3072": (rng.standard_normal((768, 3072)) * 0.02).astype(F32),
      "t(3) 1000x1024 (ragged 2nd level)": (rng.standard_t(3, (1000, 1024)) * 0.02).astype(F32),
      "zeros+ties+outliers 512x768": hard_matrix((512, 768), 1),
  }
  cfg = quant.QuantConfig("nf4", 64)
  cfg_dq = quant.QuantConfig("nf4", 64, quant.bnb_double_quant())
  q_fn = jax.jit(lambda a: quant.quantize(a, cfg))
  qdq_fn = jax.jit(lambda a: quant.quantize(a, cfg_dq))
  qdq_off = jax.jit(lambda a, off: quant.quantize(a, cfg_dq, offset=off))
  deq = jax.jit(quant.dequantize)
  for name, x in cases.items():
    xt = torch.from_numpy(x)
    pb, sb = bnbF.quantize_4bit(xt, blocksize=64, quant_type="nf4")
    q = q_fn(x)
    row = {"tensor": name,
           "bytes": bool(np.array_equal(np.asarray(q.codes), pb.numpy().reshape(-1))),
           "absmax": bool(np.array_equal(np.asarray(q.scales), sb.absmax.numpy())),
           "dequant": bool(np.array_equal(np.asarray(deq(q)), bnbF.dequantize_4bit(pb, sb).numpy()))}
    pb2, sb2 = bnbF.quantize_4bit(xt, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = qdq_fn(x)
    bnb_off = float(sb2.offset)
    row["dq_bytes"] = bool(np.array_equal(np.asarray(ours.codes), pb2.numpy().reshape(-1)))
    row["dq_offset_ulps"] = _ulps(float(ours.scales.offset), bnb_off)
    same = qdq_off(x, np.float32(bnb_off))
    row["dq_codes(offset in)"] = bool(np.array_equal(np.asarray(same.scales.codes),
                                                     sb2.absmax.numpy()))
    row["dq_absmax2(offset in)"] = bool(np.array_equal(np.asarray(same.scales.scale2),
                                                       sb2.state2.absmax.numpy()))
    bnb_deq = bnbF.dequantize_4bit(pb2, sb2).numpy()
    row["dq_dequant(offset in)"] = bool(np.array_equal(np.asarray(deq(same)), bnb_deq))
    row["dq_dequant(own offset)"] = bool(np.array_equal(np.asarray(deq(ours)), bnb_deq))
    out["tensors"].append(row)
  # torch's own float32 mean of the same absmax vector under different thread counts.
  am = bnbF.quantize_4bit(torch.from_numpy(cases["normal 4096x4096"]), blocksize=64,
                          quant_type="nf4")[1].absmax
  threads = torch.get_num_threads()
  means = {}
  for t in sorted({1, 2, 4, threads}):
    torch.set_num_threads(t)
    means[t] = float(am.mean())
  torch.set_num_threads(threads)
  exact = float(np.float32(np.float32(np.sum(am.numpy().astype(np.float64))) / np.float32(am.numel())))
  out["torch_mean_by_threads_ulps_from_exact"] = {str(t): _ulps(m, exact) for t, m in means.items()}
  return out


# ----------------------------------------------------------------------------- 2. speed

def _pack_strided_ma(codes):
  g = codes.reshape(-1, 2)
  return g[:, 0] * np.uint8(16) + g[:, 1]


def _pack_strided_shift(codes):
  g = codes.reshape(-1, 2)
  return (g[:, 0] << np.uint8(4)) | g[:, 1]


def _pack_u16_ma(codes):  # the library's form (growjax.quant.packing)
  w = jax.lax.bitcast_convert_type(codes.reshape(-1, 2), jnp.uint16)
  return ((w & jnp.uint16(0xFF)) * jnp.uint16(16) + (w >> jnp.uint16(8))).astype(jnp.uint8)


def _pack_u16_shift(codes):
  w = jax.lax.bitcast_convert_type(codes.reshape(-1, 2), jnp.uint16)
  return (((w & jnp.uint16(0xFF)) << jnp.uint16(4)) | (w >> jnp.uint16(8))).astype(jnp.uint8)


PACKINGS = (_pack_strided_ma, _pack_strided_shift, _pack_u16_ma, _pack_u16_shift)


def _quantize_variant(pack, acc_dtype):
  mids = formats.midpoints(quant.nf_code(4))

  def f(x):
    xb = x.reshape(-1, 64)
    absmax = blockwise.block_reduce(jnp.abs(xb), jnp.maximum, jnp.max)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    s = jnp.clip(xb * inv, -1.0, 1.0)
    idx = jnp.zeros(s.shape, acc_dtype)
    for m in mids:
      idx = idx + (s > m).astype(acc_dtype)
    return pack(idx.astype(jnp.uint8).reshape(-1)), absmax[:, 0]

  return jax.jit(f)


def speed(reps: int) -> dict:
  x = (np.random.default_rng(0).standard_normal((4096, 4096)) * 0.02).astype(F32)
  xt, xj = torch.from_numpy(x), jnp.asarray(x)
  cfg = quant.QuantConfig("nf4", 64)
  ours = jax.jit(lambda a: quant.quantize(a, cfg))
  res = {}
  res["quantize"] = interleaved({
      "bitsandbytes": lambda: bnbF.quantize_4bit(xt, blocksize=64, quant_type="nf4"),
      "growjax": lambda: jax.block_until_ready(ours(xj)),
  }, reps)
  # Alternatives for the last steps of the same pipeline (codes -> bytes).
  variants = {f"quantize {p.__name__[6:]}/{dt.__name__}": _quantize_variant(p, dt)
              for p in PACKINGS for dt in (jnp.uint8, jnp.float32)}
  codes = jax.random.randint(jax.random.key(0), (4096 * 4096,), 0, 16).astype(jnp.uint8)
  pack_only = {f"pack only {p.__name__[6:]}": jax.jit(p) for p in PACKINGS}
  fns = {k: (lambda f=f: jax.block_until_ready(f(xj))) for k, f in variants.items()}
  fns.update({k: (lambda f=f: jax.block_until_ready(f(codes))) for k, f in pack_only.items()})
  res["alternatives"] = interleaved(fns, max(5, reps // 2))
  # Dequantize: fresh output vs a reused (donated) output buffer.
  q = ours(xj)
  pb, sb = bnbF.quantize_4bit(xt, blocksize=64, quant_type="nf4")
  deq_fresh = jax.jit(quant.dequantize)
  # keep_unused: the output buffer is not read, and jit would otherwise prune it (and the donation).
  deq_donated = jax.jit(lambda out, qt: quant.dequantize(qt), donate_argnums=0, keep_unused=True)
  buf = [jnp.zeros((4096, 4096), jnp.float32)]

  def donated():
    buf[0] = deq_donated(buf[0], q)
    buf[0].block_until_ready()

  assert np.array_equal(np.asarray(deq_fresh(q)), bnbF.dequantize_4bit(pb, sb).numpy())
  res["dequantize"] = interleaved({
      "bitsandbytes": lambda: bnbF.dequantize_4bit(pb, sb),
      "growjax_fresh": lambda: deq_fresh(q).block_until_ready(),
      "growjax_donated": donated,
  }, reps)
  res["packed_bytes_ratio"] = quant.storage_bytes(q) / x.nbytes
  return res


# ----------------------------------------------------------------------------- 3. LoRA step

def lora_step(reps: int) -> dict:
  from growjax.nets import Transformer  # pylint: disable=g-import-not-at-top
  model = Transformer(vocab_size=256, max_len=128, d_model=256, num_layers=4, num_heads=4,
                      head_dim=64, mlp_dim=1024)
  tokens = jax.random.randint(jax.random.key(0), (8, 128), 0, 256)
  params = model.init(jax.random.key(1), tokens)["params"]

  def loss_fn(p, toks):
    logits = model.apply({"params": p}, toks)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:]).mean()

  lo = peft.lora([peft.LoraTarget(r"(query|key|value)/kernel$", rank=8, alpha=16.0),
                  peft.LoraTarget(r"(^|/)out/kernel$", rank=8, alpha=16.0, in_dims=2),
                  peft.LoraTarget(r"fc_(in|out)/kernel$", rank=8, alpha=16.0)])
  adapters = lo.init(jax.random.key(2), params)
  tx = optax.adam(1e-3)
  opt = tx.init(adapters)
  lora_loss = lo.apply(loss_fn)

  frozen = jax.jit(jax.value_and_grad(loss_fn))
  lora_vg = lo.value_and_grad(loss_fn)
  plain_vg = lambda p, ad, toks: jax.value_and_grad(lambda a: lora_loss(p, a, toks))(ad)

  def make_step(vg):
    @jax.jit
    def step(p, ad, opt, toks):
      value, g = vg(p, ad, toks)
      updates, opt = tx.update(g, opt, ad)
      return optax.apply_updates(ad, updates), opt, value
    return step

  step, step_plain = make_step(lora_vg), make_step(plain_vg)
  qparams = quant.quantize_tree(params, r"(query|key|value|out|fc_in|fc_out)/kernel$",
                                quant.QuantConfig("nf4", 64))
  res = interleaved({
      "frozen_fwd_bwd": lambda: jax.block_until_ready(frozen(params, tokens)),
      "lora_step": lambda: jax.block_until_ready(step(params, adapters, opt, tokens)),
      "lora_step_plain_jax_grad": lambda: jax.block_until_ready(
          step_plain(params, adapters, opt, tokens)),
      "qlora_step_nf4": lambda: jax.block_until_ready(step(qparams, adapters, opt, tokens)),
  }, reps)
  res["model"] = "growjax.nets.Transformer d=256 L=4 heads=4x64 mlp=1024, batch 8x128, r=8"
  res["adapter_params"] = peft.count_adapter_params(adapters)
  res["model_params"] = int(sum(np.size(v) for v in jax.tree.leaves(params)))
  return res


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "quant.json"))
  args = parser.parse_args()
  info = {"python": platform.python_version(), "jax": jax.__version__,
          "bitsandbytes": bnb.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "load_avg_start": os.getloadavg()[0]}
  print(f"[quant bench] {info}")
  par = parity()
  print("\nParity with bitsandbytes (CPU path), NF4 blocks of 64:")
  print(f"  NF4 table identical: {par['nf4_table_identical']}; dynamic map identical: "
        f"{par['dynamic_map_identical']}")
  print(format_table(par["tensors"]))
  print(f"  torch float32 mean of the 4096x4096 absmax vector, ulps from the exactly rounded "
        f"mean, by torch thread count: {par['torch_mean_by_threads_ulps_from_exact']}")

  sp = speed(args.reps)
  qb, qg = sp["quantize"]["bitsandbytes"], sp["quantize"]["growjax"]
  db, dfr, ddo = (sp["dequantize"][k] for k in ("bitsandbytes", "growjax_fresh", "growjax_donated"))
  rows = [
      {"op": "quantize+pack", "bitsandbytes_ms": qb["wall_ms"], "growjax_ms": qg["wall_ms"],
       "speedup": qb["wall_ms"] / qg["wall_ms"], "speedup_min": qb["min_wall_ms"] / qg["min_wall_ms"],
       "speedup_cpu_time": qb["cpu_ms"] / qg["cpu_ms"]},
      {"op": "dequantize (fresh out)", "bitsandbytes_ms": db["wall_ms"],
       "growjax_ms": dfr["wall_ms"], "speedup": db["wall_ms"] / dfr["wall_ms"],
       "speedup_min": db["min_wall_ms"] / dfr["min_wall_ms"],
       "speedup_cpu_time": db["cpu_ms"] / dfr["cpu_ms"]},
      {"op": "dequantize (donated out)", "bitsandbytes_ms": db["wall_ms"],
       "growjax_ms": ddo["wall_ms"], "speedup": db["wall_ms"] / ddo["wall_ms"],
       "speedup_min": db["min_wall_ms"] / ddo["min_wall_ms"],
       "speedup_cpu_time": db["cpu_ms"] / ddo["cpu_ms"]},
  ]
  print("\n4096x4096 float32, NF4, blocks of 64 (medians of interleaved repetitions):")
  print(format_table(rows))
  alt = [{"variant": k, "wall_ms": v["wall_ms"], "cpu_ms": v["cpu_ms"]}
         for k, v in sp["alternatives"].items()]
  print("\nAlternatives (packing form / nearest-code accumulator):")
  print(format_table(alt))
  print(f"\nPacked NF4 bytes / float32 bytes: {sp['packed_bytes_ratio']:.4f}")

  ls = lora_step(args.reps)
  base = ls["frozen_fwd_bwd"]["wall_ms"]
  base_min = ls["frozen_fwd_bwd"]["min_wall_ms"]
  lrows = [{"step": k, "wall_ms": ls[k]["wall_ms"], "ratio_vs_frozen": ls[k]["wall_ms"] / base,
            "ratio_min": ls[k]["min_wall_ms"] / base_min,
            "cpu_ratio": ls[k]["cpu_ms"] / ls["frozen_fwd_bwd"]["cpu_ms"]}
           for k in ("frozen_fwd_bwd", "lora_step", "lora_step_plain_jax_grad", "qlora_step_nf4")]
  print(f"\nLoRA train step vs frozen model forward/backward ({ls['model']}; "
        f"{ls['adapter_params']} adapter / {ls['model_params']} model parameters):")
  print(format_table(lrows))

  info["load_avg_end"] = os.getloadavg()[0]
  result = {"info": info, "parity": par, "speed": sp, "speed_table": rows, "lora_step": ls,
            "lora_table": lrows,
            "command": "python benchmarks/quant.py --reps %d" % args.reps}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=float)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
