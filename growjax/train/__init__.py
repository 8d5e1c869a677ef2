"""Training: TrainState, pure step factories, the loop with growth hooks, sharding, checkpoints."""

from growjax.train.checkpoint import Checkpointer, abstract_state
from growjax.train.loop import (FitResult, Growth, Trainer, fit, make_trainer, plot_curves,
                                restore_or_create)
from growjax.train.metrics import MetricWriter, Progress, format_table, read_jsonl, save_figure
from growjax.train.sharding import make_mesh, replicate, shard_batch
from growjax.train.state import TrainState, create_state, model_flops, num_params, regrow_state
from growjax.train.steps import evaluate, make_eval_step, make_train_step

__all__ = [
    "Checkpointer", "FitResult", "Growth", "MetricWriter", "Progress", "TrainState", "Trainer",
    "abstract_state", "create_state", "evaluate", "fit", "format_table", "make_eval_step",
    "make_mesh", "make_train_step", "make_trainer", "model_flops", "num_params", "plot_curves",
    "read_jsonl", "regrow_state", "replicate", "restore_or_create", "save_figure", "shard_batch",
]
