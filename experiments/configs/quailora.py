r"""Config: quantization-aware LoRA initialisations (QLoRA, LoftQ-1, QPiSSA, QuAILoRA) on a byte-level GPT.

Command (from the repo root):
  nice python -m experiments.quailora                       # default (3 seeds, d=128 4-layer GPT)
  python -m experiments.quailora --config=experiments/configs/quailora.py:quick   # tiny, < 1 min
  python -m experiments.quailora --config.checkpoint=/path/to/hf_gpt2_dir         # skip pretraining

Variants: default (the issue's setting: pretrain a 4-layer d=128 byte-level GPT on the prose
corpus, NF4 and NF3 with NF8 as the 8-bit reference, rank-16 LoRA on every linear kernel, 3
seeds, fine-tuning on held-out prose documents with the learning rate tuned per init);
`quick` (tiny model and budgets, for the tests).

`checkpoint`: a local Hugging Face safetensors GPT-2/LLaMA checkpoint (growjax.nets.checkpoints)
used instead of pretraining; its vocabulary must be the experiment's byte-level tokenizer (257
ids: 256 bytes + <eos>), because the corpus is tokenized that way.

Expected on the 2-core CPU machine (default, shared with other jobs, under `nice`): pretraining
35 min-1.5 h (cached in the workdir: a rerun skips it), initialisations a few minutes,
fine-tuning (5 inits x 4 learning rates on seed 0, 5 runs on each further seed) ~1 h. The grid
brackets the optimum (an earlier grid {3e-4, 1e-3, 3e-3} picked its lowest value for every
init). Measured result (benchmarks/results/quailora.json): see the README experiments table and
BUILD_NOTES.md.
"""

import os

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2)
  c.checkpoint = ""  # HF safetensors directory to load instead of pretraining
  c.results_json = os.path.join(_REPO, "benchmarks", "results", "quailora.json")
  # Data: the prose corpus split by document into pretraining / validation / fine-tuning parts.
  c.data = ml_collections.ConfigDict({
      "max_bytes": 0,            # 0: the whole prose corpus (~0.47 MB)
      "seq_len": 128,
      "val_fraction": 0.1,       # validation documents (all perplexities are measured here)
      "finetune_fraction": 0.25,  # held-out documents never seen in pretraining
      "select_fraction": 0.15,   # tail of the fine-tuning stream used to pick the learning rate
      "split_seed": 0})
  c.model = ml_collections.ConfigDict({
      "d_model": 128, "num_layers": 4, "num_heads": 4, "head_dim": 32, "mlp_dim": 512,
      "dropout_rate": 0.1})
  c.pretrain = ml_collections.ConfigDict({
      "steps": 3000, "batch_size": 16, "lr": 3e-3, "warmup": 200, "weight_decay": 0.01,
      "seed": 0, "eval_every": 500})
  # Quantization: block-wise formats of growjax.quant; `reference` is the 8-bit target of the gap.
  c.quant = ml_collections.ConfigDict({
      "formats": ("nf4", "nf3"), "reference": "nf8", "block_size": 64})
  c.lora = ml_collections.ConfigDict({"rank": 16, "alpha": 16.0})
  # QuAILoRA: calibration Grams from the pretraining (calibration) domain.
  c.calib = ml_collections.ConfigDict({
      "batches": 8, "batch_size": 16, "method": "als", "iters": 50, "damping": 1e-2})
  c.eval_batch_size = 64
  c.finetune = ml_collections.ConfigDict({
      "formats": ("nf3",),
      "methods": ("qlora", "qlora_norm", "loftq1", "qpissa", "quailora"),
      "steps": 150, "batch_size": 16, "lrs": (3e-5, 1e-4, 3e-4, 1e-3),
      "tune_every_seed": False})  # False: the grid runs on the first seed, others reuse its pick

  if arg in (None, ""):
    pass
  elif arg == "quick":
    c.seeds = (0,)
    c.results_json = ""
    c.data.max_bytes = 60_000
    c.data.seq_len = 32
    c.model = ml_collections.ConfigDict({
        "d_model": 32, "num_layers": 2, "num_heads": 2, "head_dim": 16, "mlp_dim": 32,
        "dropout_rate": 0.0})
    c.pretrain.steps = 60
    c.pretrain.batch_size = 8
    c.pretrain.warmup = 10
    c.pretrain.eval_every = 30
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.calib.batches = 2
    c.calib.batch_size = 8
    c.calib.iters = 10
    c.finetune.steps = 8
    c.finetune.batch_size = 8
    c.finetune.lrs = (1e-3, 3e-3)
    c.finetune.methods = ("qlora", "qlora_norm", "quailora")
  else:
    raise ValueError(f"Unknown variant {arg!r}; use the default or 'quick'.")
  return c
