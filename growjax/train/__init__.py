"""Training: TrainState, pure step factories, the loop with growth hooks, sharding, checkpoints."""

from growjax.train.metrics import MetricWriter, Progress, format_table, read_jsonl, save_figure

__all__ = ["MetricWriter", "Progress", "format_table", "read_jsonl", "save_figure"]
