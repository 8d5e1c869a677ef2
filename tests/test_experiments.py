"""The experiment binaries' run() on their quick configs, and the CIFAR configs end to end on a
tiny archive written in the real CIFAR python-pickle format."""

import dataclasses
import importlib.util
import json
import os

import pytest

from experiments import grow as grow_exp
from experiments import train as train_exp
from experiments.configs import grow as grow_cfg
from experiments.configs import train as train_cfg
from growjax import data, grow, train
from growjax.grow import candidates as C


def test_train_quick(tmp_path):
  out = train_exp.run(train_cfg.get_config("quick"), str(tmp_path))
  assert out["steps"] == 100 and out["params"] == 64 * 8 + 8 + 8 * 10 + 10
  assert 0.0 < out["test_accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "train_curves.png")
  # Resuming from the workdir continues from the checkpoint instead of starting over.
  out2 = train_exp.run(train_cfg.get_config("quick"), str(tmp_path))
  assert out2["steps"] == 100


def test_grow_quick_writes_table_plot_checkpoint(tmp_path):
  summary = grow_exp.run(grow_cfg.get_config("quick"), str(tmp_path))
  assert summary["method"] == "gn" and summary["stopped"] == "reached max_rounds=2"
  assert len(summary["rounds"]) == 2
  assert summary["final_params"] > summary["seed_params"]
  for r in summary["rounds"]:
    assert r["predicted"] > 0 and r["realised"] > 0 and r["flops"] > 0
  assert len(summary["baselines"]) == 2
  for name in ("growth.png", "train_curves.png", "summary.json", "growth.jsonl", "train.jsonl"):
    assert os.path.exists(tmp_path / name), name
  with open(tmp_path / "summary.json", encoding="utf-8") as f:
    assert json.load(f)["final_params"] == summary["final_params"]
  growth_records = train.read_jsonl(tmp_path / "growth.jsonl")
  assert all(r["records"] for r in growth_records)
  # The checkpoint restores the grown network.
  import optax  # pylint: disable=import-outside-toplevel
  model, state, history, _ = train.Checkpointer(tmp_path / "checkpoints").restore(
      optax.adamw(3e-3, weight_decay=0.0))
  assert train.num_params(state) == summary["final_params"]
  assert [h["op"] for h in history] == ["add_units"] * len(history) and history


def test_digits_search_config_is_the_benchmark_search_variant():
  """``grow.py:digits_search`` is documented as one seed of benchmarks/growth_quality.py's
  growth search (variant gn_units_random_fan_in at the 20k budget); its growth settings,
  schedule, training and width sweep must stay those of the benchmark."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "growth_quality.py")
  spec = importlib.util.spec_from_file_location("growth_quality", path)
  gq = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gq)
  c = grow_cfg.get_config("digits_search")
  # LearnConfig.damping is not read by the search (it passes its adapted λ).
  ours = grow_exp.grow_config(c.grow)
  ours = dataclasses.replace(ours, learn=ours.learn._replace(damping=C.LearnConfig().damping))
  assert ours == gq.search_grow_config("gn_units_random_fan_in")
  assert grow.Schedule(**dict(c.schedule)) == gq.search_schedule(max_params=20000)
  assert (c.steps, c.batch_size, c.optim.name, c.optim.lr) == (gq.SEARCH_STEPS, 64, "adam", 3e-3)
  assert tuple(c.model.widths) == (8, 8) and c.baselines.widths == gq.SEARCH_WIDTHS


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cifar10", "cifar100_mobilenet"])
def test_cifar_configs_run_end_to_end_on_a_tiny_archive(tmp_path, variant):
  name = variant.split("_")[0]
  # 10 images per class, so the stratified 10% validation split is not empty for CIFAR-100.
  n_train = 100 if name == "cifar10" else 1000
  archive = data.write_tiny_cifar_archive(tmp_path / "archive", name, n_train=n_train, n_test=16)
  c = grow_cfg.get_config(variant)
  c.data.path = str(archive)
  c.model.channels = (4, 4, 4, 4)
  c.steps, c.batch_size, c.eval_every, c.log_every = 6, 16, 6, 3
  c.grow.ks, c.grow.psi_steps, c.grow.max_morphisms = (1,), 1, 1
  c.schedule.every, c.schedule.warmup, c.schedule.max_rounds = 3, 3, 1
  c.schedule.stats_batch = 16
  c.baselines.widths = ((4, 4, 4, 4),)
  c.baselines.enabled = name == "cifar10"  # the sweep is the same code for both; once is enough
  summary = grow_exp.run(c, str(tmp_path / "run"))
  assert len(summary["rounds"]) == 1 and bool(summary["baselines"]) == c.baselines.enabled
  assert summary["final_params"] >= summary["seed_params"]
  assert os.path.exists(tmp_path / "run" / "growth.png")


def test_cifar_config_without_a_path_says_how_to_get_the_data(tmp_path):
  with pytest.raises(ValueError, match="config.data.path.*never downloads"):
    grow_exp.run(grow_cfg.get_config("cifar10"), str(tmp_path))
