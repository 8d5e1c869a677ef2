"""Quantization-aware LoRA initialisations on a small byte-level GPT: QLoRA, LoftQ-1, QPiSSA, QuAILoRA.

QuAILoRA: Lawton et al. 2024 (arXiv:2410.14713); QLoRA: Dettmers et al. 2023 (arXiv:2305.14314);
LoftQ: Li et al. 2023 (arXiv:2310.08659); PiSSA: Meng et al. 2024 (arXiv:2404.02948).
Method notes: ../shared/METHODS.md §3-§4.

Protocol:
1. Pretrain a GPT-2-style byte-level model on the pretraining documents of the prose corpus (or
   load a local Hugging Face checkpoint with ``growjax.nets.checkpoints``); cached in the workdir.
2. Per seed: capture calibration Grams ``XᵀX`` of every linear layer's input (full-precision
   model, random windows of the pretraining documents: the calibration domain); quantize every
   linear kernel at NF4 and NF3 (and the 8-bit reference) and initialise rank-r LoRA on every
   one of them with each method. Measure at initialisation: validation perplexity, the fraction
   of the QLoRA -> 8-bit perplexity gap each init recovers, and the input-weighted layer error
   ``tr(Dᵀ H D)`` with ``D = W − W_eff`` and ``H`` the second-moment matrix of the layer's inputs
   on the *validation* documents (held out from the calibration windows).
3. LoRA fine-tuning on held-out documents (never seen in pretraining) with the learning rate
   tuned per init on a small grid (picked by the loss on a selection slice of the fine-tuning
   documents, not on validation), including the control ``qlora_norm``: QLoRA (same base, b = 0)
   whose ``a`` is rescaled per matrix to the total initial adapter norm of QuAILoRA,
   ``‖a‖ = sqrt(‖a_Q‖² + ‖b_Q‖²)``, because larger initial adapters act like a larger learning
   rate. The 8-bit reference is fine-tuned with QLoRA the same way; the fraction of the gap
   recovered after fine-tuning is ``(ppl_QLoRA − ppl_m) / (ppl_QLoRA − ppl_8bit)``.

The frozen base is dequantized once before fine-tuning (``W_eff = dequant(Q) + s·a@b`` exactly
as a quantized base would give; only the speed differs). Writes ``metrics.jsonl`` (one record per
measurement), ``summary.json``, ``layer_error.png``, ``perplexity.png`` and, when configured,
``benchmarks/results/quailora.json``.

Run: ``nice python -m experiments.quailora`` (see ``experiments/configs/quailora.py``).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from experiments import common
from growjax import data as gdata
from growjax import nets, peft, quant, train
from growjax import tree as gtree
from growjax.nets.common import host_init

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "quailora.py")

LORA_TARGETS = ((r"(query|key|value)/kernel$", 1), (r"(^|/)out/kernel$", 2),
                (r"fc_(in|gate|out)/kernel$", 1))
INIT_METHODS = ("qlora", "loftq1", "qpissa", "quailora")


# ---- data and model ---------------------------------------------------------------------------

def load_lm(c) -> dict:
  """Pretraining / validation / fine-tuning / selection token data of the prose corpus."""
  lm = gdata.load_text_lm("prose", seq_len=c.seq_len, max_bytes=c.max_bytes or None,
                          val_fraction=c.val_fraction, test_fraction=c.finetune_fraction,
                          seed=c.split_seed)
  ft = lm.streams["test"]  # held-out documents: the fine-tuning domain
  cut = int(round(len(ft) * (1.0 - c.select_fraction)))
  return {"lm": lm, "pretrain": lm.streams["train"], "val": lm.val,
          "finetune": ft[:cut], "select": gdata.lm_windows(ft[cut:], c.seq_len)}


def build_model(c, vocab_size: int, max_len: int) -> nets.Transformer:
  return nets.Transformer(vocab_size=vocab_size, max_len=max_len, d_model=c.d_model,
                          num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim,
                          mlp_dim=c.mlp_dim, dropout_rate=c.dropout_rate)


def pretrain_optimizer(c) -> optax.GradientTransformation:
  """AdamW with warmup and cosine decay to 10%, gradients clipped at global norm 1."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup, c.steps, c.lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=c.weight_decay))


def pretrained(config, data: dict, workdir: str) -> tuple[nets.Transformer, dict, dict]:
  """The full-precision model and params (pretrained here, cached, or loaded from a checkpoint)."""
  tok = data["lm"].tokenizer
  if config.checkpoint:
    loaded = nets.load_hf_checkpoint(config.checkpoint)
    m = loaded.model
    if m.vocab_size != tok.vocab_size or not m.causal:
      raise ValueError(
          f"Checkpoint {config.checkpoint!r} is a {loaded.model_type} model with vocabulary "
          f"{m.vocab_size}; this experiment tokenizes bytes ({tok.vocab_size} ids) and needs a "
          f"causal LM with exactly that vocabulary.")
    return m, loaded.variables["params"], {"source": config.checkpoint}
  c = config.pretrain
  model = build_model(config.model, tok.vocab_size, data["lm"].seq_len)
  tx = pretrain_optimizer(c)
  pre_dir = os.path.join(workdir, "pretrain")
  restored, state, history = train.restore_or_create(
      pre_dir, model, lambda: host_init(model, jax.random.key(c.seed)), tx, c.seed)
  if restored != model:
    raise ValueError(f"{pre_dir} holds a checkpoint of another model ({restored}); use a fresh "
                     f"--workdir for this config.")
  splits = gdata.lm_as_splits(data["lm"])
  t0 = time.perf_counter()
  res = train.fit(model, state, train.make_trainer(tx), splits, steps=c.steps,
                  batch_size=c.batch_size, workdir=pre_dir, eval_every=c.eval_every,
                  log_every=max(c.eval_every // 5, 1), seed=c.seed, name="pretrain")
  info = {"source": "pretrained", "steps": int(res.state.step),
          "seconds": time.perf_counter() - t0, "params": gtree.count(res.state.params)}
  return model, res.state.params, info


# ---- evaluation -------------------------------------------------------------------------------

def token_nll(model, params, w: jax.Array) -> jax.Array:
  """Next-token negative log-likelihood [n, T] of windows w [n, T+1] (eval mode)."""
  logits = model.apply({"params": params}, w[:, :-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, w[:, 1:, None], axis=-1)[..., 0]


def _sum_count(nll: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)


def make_loss_sum(model):
  """Jitted ``(params, windows [n, T+1]) -> (Σ token NLL, tokens)`` in eval mode."""
  return jax.jit(lambda params, w: _sum_count(token_nll(model, params, w)))


def perplexity(loss_sum, params, windows: np.ndarray, batch_size: int) -> float:
  total, count = 0.0, 0.0
  for i in range(0, len(windows), batch_size):
    s, n = loss_sum(params, jnp.asarray(windows[i:i + batch_size]))
    total, count = total + float(s), count + float(n)
  return math.exp(total / count)


def capture_grams(model, params, windows) -> dict[str, jax.Array]:
  """Per-layer input second moments ``XᵀX / rows`` [d_in, d_in] over ``windows`` batches."""
  cap = quant.gram_capture(model)
  variables = {"params": params}
  state = cap.init(variables, jnp.asarray(windows[0][:, :-1]))
  update = jax.jit(cap.update)
  for w in windows:
    state = update(state, variables, jnp.asarray(w[:, :-1]))
  return quant.normalized(state)


def make_lora(c) -> peft.Lora:
  return peft.lora([peft.LoraTarget(pattern, rank=c.rank, alpha=c.alpha, in_dims=in_dims)
                    for pattern, in_dims in LORA_TARGETS])


def init_fn(method: str, c, quantizer: quant.Quantizer) -> quant.InitFn:
  """The init as a jitted ``(W, quantizer, context)`` function for this quantizer (one
  compilation per kernel shape instead of eager dispatch and per-call loop compilation)."""
  if method == "qlora":
    fn = quant.qlora()
  elif method == "loftq1":
    fn = quant.loftq(1)
  elif method == "qpissa":
    fn = quant.pissa()
  elif method == "quailora":
    fn = quant.quailora(c.method, iters=c.iters, damping=c.damping)
  else:
    raise ValueError(f"Unknown init {method!r}; choose one of {INIT_METHODS}.")
  jitted = jax.jit(lambda W, context: fn(W, quantizer, context))

  def init(W, q, context):
    assert q is quantizer
    return jitted(W, context)

  return init


def norm_matched_control(qlora_adapters, quailora_adapters):
  """QLoRA adapters (``b = 0``) whose ``a`` has QuAILoRA's total adapter norm per matrix."""
  out = {}
  q_flat, r_flat = gtree.flatten(qlora_adapters), gtree.flatten(quailora_adapters)
  for path, a in q_flat.items():
    if not path.endswith("/a"):
      out[path] = a
      continue
    stem = path[:-2]
    target = jnp.sqrt(jnp.sum(jnp.square(r_flat[stem + "/a"]))
                      + jnp.sum(jnp.square(r_flat[stem + "/b"])))
    out[path] = a * (target / jnp.sqrt(jnp.sum(jnp.square(a))))
  return gtree.unflatten(out)


def adapter_norm(adapters) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(adapters))))


def layer_errors(lo: peft.Lora, params, effective, grams) -> dict[str, dict[str, float]]:
  """Per target: ``tr(DᵀHD)`` (abs) and ``/ tr(WᵀHW)`` (rel) with ``D = W − W_eff``."""
  flat_w, flat_e = gtree.flatten(params), gtree.flatten(effective)
  out = {}
  for path, site in lo.sites(params).items():
    W = flat_w[path].reshape(site.d_in, site.d_out)
    D = W - flat_e[path].reshape(site.d_in, site.d_out)
    H = grams[path]
    err = float(jnp.sum(D * (H @ D)))
    out[path] = {"abs": err, "rel": err / float(jnp.sum(W * (H @ W)))}
  return out


# ---- fine-tuning ------------------------------------------------------------------------------

def make_finetune(model, lo: peft.Lora):
  """Jitted LoRA step ``(adapters, opt_state, base, lr, w) -> (adapters, opt_state, loss)``
  (Adam; the learning rate is an argument, so one compilation serves the whole grid) and the
  jitted loss sum of ``(base, adapters, w)``."""
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

  vg = lo.value_and_grad(lambda params, w: jnp.mean(token_nll(model, params, w)))

  def step(adapters, opt_state, base, lr, w):
    loss, grads = vg(base, adapters, w)
    opt_state.hyperparams["learning_rate"] = lr
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int counters
      updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  def loss_sum(base, adapters, w):
    return _sum_count(token_nll(model, lo.effective_params(base, adapters), w))

  return tx, jax.jit(step, donate_argnums=(0, 1)), jax.jit(loss_sum)


def finetune(ft, base, adapters, lr: float, stream: np.ndarray, c, seq_len: int, seed: int,
             name: str):
  """Trains the adapters for ``c.steps`` Adam steps at ``lr`` (cosine decay to 0)."""
  tx, step, _ = ft
  opt_state = tx.init(adapters)
  adapters = jax.tree.map(jnp.copy, adapters)  # the step donates its input buffers
  progress = train.Progress(c.steps, name=name, every_s=20.0)
  batches = gdata.random_windows(stream, seq_len, c.batch_size, seed=seed, steps=c.steps)
  loss = jnp.zeros(())
  for i, w in enumerate(batches):
    lr_i = jnp.asarray(lr * 0.5 * (1.0 + math.cos(math.pi * i / c.steps)), jnp.float32)
    adapters, opt_state, loss = step(adapters, opt_state, base, lr_i, jnp.asarray(w))
    progress.update(i + 1, loss=loss)
  return adapters, float(loss)


def ft_perplexity(ft, base, adapters, windows, batch_size: int) -> float:
  loss_sum = ft[2]
  return perplexity(lambda p, w: loss_sum(base, p, w), adapters, windows, batch_size)


# ---- the experiment ---------------------------------------------------------------------------

def run(config, workdir: str) -> dict:
  """Runs the protocol of the module docstring; returns the summary (also ``summary.json``)."""
  os.makedirs(workdir, exist_ok=True)
  writer = train.MetricWriter(workdir)
  data = load_lm(config.data)
  seq_len = data["lm"].seq_len
  model, params, pre_info = pretrained(config, data, workdir)
  eval_model = model.clone(dropout_rate=0.0)
  loss_sum = make_loss_sum(eval_model)
  ebs = config.eval_batch_size
  val = data["val"]
  ppl_fp = perplexity(loss_sum, params, val, ebs)
  writer.write({"kind": "pretrain", **pre_info, "val_ppl": ppl_fp})
  logging.info("Full-precision model: validation perplexity %.4f (%s)", ppl_fp, pre_info)

  lo = make_lora(config.lora)
  formats = tuple(config.quant.formats)
  ref = config.quant.reference
  quantizers = {f: quant.quantizer(f, config.quant.block_size) for f in (*formats, ref)}
  val_grams = capture_grams(eval_model, params, [val[i:i + ebs] for i in range(0, len(val), ebs)])
  ft = make_finetune(eval_model, lo)
  c_ft = config.finetune

  init: dict = {}     # init[fmt][method] -> list over seeds of records
  tuned: dict = {}    # tuned[(fmt, method)] -> chosen lr
  finetuned: dict = {}
  grid_rows: list = []
  for si, seed in enumerate(config.seeds):
    key = jax.random.key(seed)
    calib = list(gdata.random_windows(data["pretrain"], seq_len, config.calib.batch_size,
                                      seed=1000 + seed, steps=config.calib.batches))
    grams = capture_grams(eval_model, params, calib)
    inits = {}  # (fmt, method) -> (base params with quantized leaves, adapters)
    for fmt in (*formats, ref):
      methods = INIT_METHODS if fmt != ref else ("qlora",)
      for method in methods:
        t0 = time.perf_counter()
        qp, ad = lo.init_from(params, init_fn(method, config.calib, quantizers[fmt]),
                              quantizers[fmt],
                              key=jax.random.fold_in(key, 17), grams=grams)
        inits[(fmt, method)] = (qp, ad)
        logging.info("seed %d: %s init at %s in %.1fs", seed, method, fmt,
                     time.perf_counter() - t0)
        if fmt != ref and method == "quailora":
          q_ad = inits[(fmt, "qlora")][1]
          inits[(fmt, "qlora_norm")] = (inits[(fmt, "qlora")][0],
                                        norm_matched_control(q_ad, ad))
    for (fmt, method), (qp, ad) in inits.items():
      eff = lo.effective_params(qp, ad)
      errs = layer_errors(lo, params, eff, val_grams)
      calib_errs = layer_errors(lo, params, eff, grams)
      rec = {"kind": "init", "seed": seed, "format": fmt, "method": method,
             "val_ppl": perplexity(loss_sum, eff, val, ebs),
             "layer_error": sum(e["abs"] for e in errs.values()),
             "layer_error_calib": sum(e["abs"] for e in calib_errs.values()),
             "layer_rel_error": {p: e["rel"] for p, e in errs.items()},
             "adapter_norm": adapter_norm(ad),
             "bits_per_param": _bits(qp)}
      init.setdefault(fmt, {}).setdefault(method, []).append(rec)
    ppl_ref = init[ref]["qlora"][si]["val_ppl"]
    for fmt in formats:
      q = init[fmt]["qlora"][si]
      for method, recs in init[fmt].items():
        rec = recs[si]
        rec["gap_recovered"] = _fraction(q["val_ppl"], rec["val_ppl"], ppl_ref)
        rec["layer_error_reduction"] = 1.0 - rec["layer_error"] / q["layer_error"]
        rec["layer_error_reduction_calib"] = 1.0 - rec["layer_error_calib"] / q["layer_error_calib"]
    for fmt in init:
      for method, recs in init[fmt].items():
        writer.write(recs[si])
    logging.info("Seed %d at init:\n%s", seed, train.format_table(
        [_init_row(r) for fmt in init for r in (recs[si] for recs in init[fmt].values())]))

    # Fine-tuning.
    runs = [(fmt, m) for fmt in c_ft.formats for m in c_ft.methods] + [(ref, "qlora")]
    for fmt, method in runs:
      qp, ad0 = inits[(fmt, method)]
      base = quant.dequantize_tree(qp)
      if (fmt, method) not in tuned or c_ft.tune_every_seed:
        scores = {}
        for lr in c_ft.lrs:
          ad, train_loss = finetune(ft, base, ad0, lr, data["finetune"], c_ft, seq_len,
                                    seed=seed, name=f"ft {fmt}/{method} lr={lr:g} seed={seed}")
          sel = ft_perplexity(ft, base, ad, data["select"], ebs)
          scores[lr] = (sel, ad, train_loss)
          row = {"kind": "lr_grid", "seed": seed, "format": fmt, "method": method, "lr": lr,
                 "select_ppl": sel, "train_loss": train_loss}
          grid_rows.append(row)
          writer.write(row)
        best = min(scores, key=lambda k: scores[k][0])
        tuned[(fmt, method)] = best
        ad, train_loss = scores[best][1], scores[best][2]
      else:
        ad, train_loss = finetune(ft, base, ad0, tuned[(fmt, method)], data["finetune"], c_ft,
                                  seq_len, seed=seed, name=f"ft {fmt}/{method} seed={seed}")
      rec = {"kind": "finetune", "seed": seed, "format": fmt, "method": method,
             "lr": tuned[(fmt, method)], "train_loss": train_loss,
             "val_ppl": ft_perplexity(ft, base, ad, val, ebs),
             "initial_adapter_norm": adapter_norm(ad0)}
      finetuned.setdefault(fmt, {}).setdefault(method, []).append(rec)
    ppl_ref_ft = finetuned[ref]["qlora"][si]["val_ppl"]
    for fmt in c_ft.formats:
      q = finetuned[fmt]["qlora"][si]["val_ppl"]
      for method, recs in finetuned[fmt].items():
        recs[si]["gap_recovered"] = _fraction(q, recs[si]["val_ppl"], ppl_ref_ft)
    for fmt in finetuned:
      for recs in finetuned[fmt].values():
        writer.write(recs[si])

  summary = _summarize(config, pre_info, ppl_fp, init, finetuned, tuned, grid_rows, formats, ref)
  _print_tables(summary)
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  plot_layer_errors(init, formats, os.path.join(workdir, "layer_error.png"))
  plot_perplexity(summary, os.path.join(workdir, "perplexity.png"))
  if config.results_json:
    os.makedirs(os.path.dirname(config.results_json), exist_ok=True)
    with open(config.results_json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return summary


def _bits(qp) -> float:
  """Average stored bits per quantized parameter of the base."""
  qs = [x for x in jax.tree.leaves(qp, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
  return 8.0 * sum(quant.storage_bytes(q) for q in qs) / sum(q.size for q in qs)


def _fraction(ppl_qlora: float, ppl: float, ppl_ref: float) -> float:
  gap = ppl_qlora - ppl_ref
  return (ppl_qlora - ppl) / gap if gap != 0 else float("nan")


def _init_row(r: dict) -> dict:
  return {"format": r["format"], "method": r["method"], "val_ppl": r["val_ppl"],
          "gap_recovered": r.get("gap_recovered", ""),
          "layer_err_cut": r.get("layer_error_reduction", ""),
          "adapter_norm": r["adapter_norm"], "bits": r["bits_per_param"]}


def _stats(values) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def _summarize(config, pre_info, ppl_fp, init, finetuned, tuned, grid_rows, formats, ref):
  out = {"config": json.loads(config.to_json_best_effort()), "pretrain": pre_info,
         "val_ppl_full_precision": ppl_fp, "reference_format": ref, "init": {}, "finetune": {},
         "lr_grid": grid_rows}
  for fmt, by_method in init.items():
    out["init"][fmt] = {}
    for method, recs in by_method.items():
      entry = {"val_ppl": _stats([r["val_ppl"] for r in recs]),
               "adapter_norm": _stats([r["adapter_norm"] for r in recs]),
               "bits_per_param": recs[0]["bits_per_param"],
               "layer_rel_error": recs[0]["layer_rel_error"]}
      if fmt != ref:
        entry["gap_recovered"] = _stats([r["gap_recovered"] for r in recs])
        entry["layer_error_reduction"] = _stats([r["layer_error_reduction"] for r in recs])
        entry["layer_error_reduction_calib"] = _stats(
            [r["layer_error_reduction_calib"] for r in recs])
      out["init"][fmt][method] = entry
  for fmt, by_method in finetuned.items():
    out["finetune"][fmt] = {}
    for method, recs in by_method.items():
      entry = {"lr": tuned[(fmt, method)], "val_ppl": _stats([r["val_ppl"] for r in recs]),
               "initial_adapter_norm": _stats([r["initial_adapter_norm"] for r in recs])}
      if fmt != ref:
        entry["gap_recovered"] = _stats([r["gap_recovered"] for r in recs])
      out["finetune"][fmt][method] = entry
  claims = {}
  for fmt in formats:
    i = out["init"][fmt]
    claims[fmt] = {
        "ppl_loss_vs_fp": i["qlora"]["val_ppl"]["mean"] / ppl_fp - 1.0,
        "quailora_gap_recovered_init": i["quailora"]["gap_recovered"]["mean"],
        "loftq1_gap_recovered_init": i["loftq1"]["gap_recovered"]["mean"],
        "quailora_layer_error_reduction": i["quailora"]["layer_error_reduction"]["mean"]}
    if fmt in out["finetune"] and "quailora" in out["finetune"][fmt]:
      f = finetuned[fmt]
      claims[fmt]["quailora_le_qlora_after_ft_every_seed"] = all(
          a["val_ppl"] <= b["val_ppl"] for a, b in zip(f["quailora"], f["qlora"]))
      claims[fmt]["quailora_gap_recovered_ft"] = out["finetune"][fmt]["quailora"][
          "gap_recovered"]
  out["claims"] = claims
  return out


def _print_tables(summary: dict) -> None:
  rows = []
  for fmt, by_method in summary["init"].items():
    for method, e in by_method.items():
      rows.append({"format": fmt, "method": method, "val_ppl": e["val_ppl"]["mean"],
                   "ppl_std": e["val_ppl"]["std"],
                   "gap_recovered": e.get("gap_recovered", {}).get("mean", ""),
                   "layer_err_cut": e.get("layer_error_reduction", {}).get("mean", ""),
                   "adapter_norm": e["adapter_norm"]["mean"], "bits": e["bits_per_param"]})
  print(f"\nAt initialisation (full precision: val ppl {summary['val_ppl_full_precision']:.4f}; "
        f"gap = QLoRA -> {summary['reference_format']}):\n{train.format_table(rows)}\n")
  rows = []
  for fmt, by_method in summary["finetune"].items():
    for method, e in by_method.items():
      g = e.get("gap_recovered", {})
      rows.append({"format": fmt, "method": method, "lr": e["lr"],
                   "val_ppl": e["val_ppl"]["mean"], "ppl_std": e["val_ppl"]["std"],
                   "gap_recovered": g.get("mean", ""), "gap_std": g.get("std", ""),
                   "init_norm": e["initial_adapter_norm"]["mean"]})
  print(f"After LoRA fine-tuning:\n{train.format_table(rows)}\n")
  print("Claims:", json.dumps(summary["claims"], indent=1))


_BLOCK_ORDER = ("query", "key", "value", "out", "fc_gate", "fc_in", "fc_out")


def _layer_order(path: str) -> tuple:
  """Sort key: block index, then the kernel's position in the block (data-flow order)."""
  parts = path.split("/")
  block = next((int(p[len("block_"):]) for p in parts if p.startswith("block_")), -1)
  name = parts[-2] if len(parts) > 1 else path
  return (block, _BLOCK_ORDER.index(name) if name in _BLOCK_ORDER else len(_BLOCK_ORDER), path)


def plot_layer_errors(init: dict, formats, path: str) -> str:
  """Relative input-weighted error ``tr(DᵀHD)/tr(WᵀHW)`` per layer and method (first seed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(formats), figsize=(6.5 * len(formats), 4.2), squeeze=False)
  for ax, fmt in zip(axes[0], formats):
    labels = []
    for method, recs in init[fmt].items():
      if method == "qlora_norm":
        continue  # b = 0: the same effective weights as QLoRA
      rel = recs[0]["layer_rel_error"]
      labels = sorted(rel, key=_layer_order)
      ax.plot(range(len(labels)), [rel[p] for p in labels], "o-", ms=3, label=method)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([p.replace("/kernel", "") for p in labels], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tr(DᵀHD) / tr(WᵀHW)  (validation inputs)")
    ax.set_title(f"{fmt}: input-weighted layer error at init (D = W − W_eff)")
    ax.legend(fontsize=8)
  return train.save_figure(fig, path)


def plot_perplexity(summary: dict, path: str) -> str:
  """Validation perplexity per method: at initialisation (per format) and after fine-tuning."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ref = summary["reference_format"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  fmts = [f for f in summary["init"] if f != ref]
  methods = list(summary["init"][fmts[0]])
  width = 0.8 / len(fmts)
  for j, fmt in enumerate(fmts):
    e = summary["init"][fmt]
    axes[0].bar(np.arange(len(methods)) + j * width, [e[m]["val_ppl"]["mean"] for m in methods],
                width, yerr=[e[m]["val_ppl"]["std"] for m in methods], label=fmt)
  axes[0].axhline(summary["val_ppl_full_precision"], color="k", ls="--", lw=1,
                  label="full precision")
  axes[0].axhline(summary["init"][ref]["qlora"]["val_ppl"]["mean"], color="gray", ls=":",
                  label=f"{ref} (8-bit reference)")
  axes[0].set_xticks(np.arange(len(methods)) + width * (len(fmts) - 1) / 2)
  axes[0].set_xticklabels(methods)
  axes[0].set_title("validation perplexity at initialisation")
  for fmt, by_method in summary["finetune"].items():
    if fmt == ref:
      continue
    names = list(by_method)
    axes[1].bar(range(len(names)), [by_method[m]["val_ppl"]["mean"] for m in names],
                yerr=[by_method[m]["val_ppl"]["std"] for m in names], label=fmt)
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names)
  if ref in summary["finetune"]:
    axes[1].axhline(summary["finetune"][ref]["qlora"]["val_ppl"]["mean"], color="gray", ls=":",
                    label=f"{ref} QLoRA fine-tuned")
  axes[1].set_title("validation perplexity after LoRA fine-tuning (mean ± std over seeds)")
  for ax in axes:
    lo_ = min(p.get_height() for p in ax.patches) if ax.patches else 1.0
    ax.set_ylim(bottom=lo_ * 0.98)
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
  return train.save_figure(fig, path)


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.config_and_workdir_flags(_DEFAULT_CONFIG, "quailora")
  app.run(main)
