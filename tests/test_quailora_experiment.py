"""The QuAILoRA experiment's quick variant end to end (experiments/quailora.py).

Oracles: the pretrained checkpoint evaluated by growjax.train.evaluate (an independent loss path)
for the full-precision perplexity; definitions that must hold exactly (QLoRA's b = 0 leaves the
quantized model's perplexity unchanged, the norm-matched control has QuAILoRA's adapter norm,
gap fractions recomputed from the reported perplexities); QuAILoRA minimises the calibrated error,
so it must beat the uncalibrated LoftQ-1 on it.
"""

import json
import math
import os

import numpy as np

from experiments import quailora
from experiments.configs.quailora import get_config
from growjax import data as gdata
from growjax import train


def test_quick_variant(tmp_path):
  config = get_config("quick")
  config.results_json = os.fspath(tmp_path / "results" / "quailora.json")
  summary = quailora.run(config, os.fspath(tmp_path))
  for name in ("summary.json", "metrics.jsonl", "layer_error.png", "perplexity.png",
               "pretrain/pretrain.jsonl"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(config.results_json, encoding="utf-8") as f:
    assert json.load(f)["claims"] == summary["claims"]

  # Full-precision perplexity: the checkpoint through growjax.train's own evaluation.
  ckpt = train.Checkpointer(tmp_path / "pretrain" / "checkpoints")
  model, state, _, _ = ckpt.restore(quailora.pretrain_optimizer(config.pretrain))
  ckpt.close()
  data = quailora.load_lm(config.data)
  splits = gdata.lm_as_splits(data["lm"])
  val = train.evaluate(train.make_trainer(quailora.pretrain_optimizer(config.pretrain)).eval_step,
                       model, state, splits.val)
  assert math.isclose(summary["val_ppl_full_precision"], math.exp(val["loss"]), rel_tol=1e-4)

  ref = summary["reference_format"]
  ppl_ref = summary["init"][ref]["qlora"]["val_ppl"]["mean"]
  for fmt in config.quant.formats:
    init = summary["init"][fmt]
    assert set(init) == {"qlora", "loftq1", "qpissa", "quailora", "qlora_norm"}
    assert init["qlora"]["bits_per_param"] > int(fmt[-1])  # codes plus block scales
    # b = 0: the control changes the adapters' size, not the function.
    assert init["qlora_norm"]["val_ppl"]["mean"] == init["qlora"]["val_ppl"]["mean"]
    np.testing.assert_allclose(init["qlora_norm"]["adapter_norm"]["mean"],
                               init["quailora"]["adapter_norm"]["mean"], rtol=1e-5)
    for method, e in init.items():
      q = init["qlora"]["val_ppl"]["mean"]
      np.testing.assert_allclose(e["gap_recovered"]["mean"],
                                 (q - e["val_ppl"]["mean"]) / (q - ppl_ref), rtol=1e-9)
      assert len(e["layer_rel_error"]) == 6 * config.model.num_layers
    # On the calibration inputs QuAILoRA's objective is the measured error.
    assert (init["quailora"]["layer_error_reduction_calib"]["mean"]
            > max(init["loftq1"]["layer_error_reduction_calib"]["mean"], 0.5))

  ft = summary["finetune"]
  assert set(ft) == {*config.finetune.formats, ref}
  assert set(ft["nf3"]) == set(config.finetune.methods)
  assert len(summary["lr_grid"]) == len(config.finetune.lrs) * (len(config.finetune.methods) + 1)
  for method, e in ft["nf3"].items():
    assert e["lr"] in config.finetune.lrs
    assert np.isfinite(e["val_ppl"]["mean"])
  assert isinstance(summary["claims"]["nf3"]["quailora_le_qlora_after_ft_every_seed"], bool)
