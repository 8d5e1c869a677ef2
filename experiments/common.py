"""Builders shared by the experiment binaries: data, models and optimizers from configs.

Library code never reads flags; experiments turn an ``ml_collections`` config into growjax
objects here, so ``train.py`` and ``grow.py`` (and notebooks calling their ``run``) agree.
"""

from __future__ import annotations

import os

import optax
from absl import flags

from growjax import data as gdata
from growjax import nets


def default_workdir(name: str) -> str:
  """``workdirs/<name>`` under the current directory (ignored by git)."""
  return os.path.join("workdirs", name)


def load_data(c) -> gdata.Splits:
  """``c.name``: digits | digits_image | teacher | cifar10 | cifar100 (``c.path`` for CIFAR)."""
  if c.name == "digits":
    return gdata.load_digits(seed=c.get("seed", 0))
  if c.name == "digits_image":
    return gdata.load_digits(seed=c.get("seed", 0), image=True)
  if c.name == "teacher":
    return gdata.load_teacher_student(tuple(c.teacher_widths), seed=c.get("seed", 0),
                                      n_train=c.get("n_train", 2048)).splits
  if c.name in ("cifar10", "cifar100"):
    if not c.get("path"):
      raise ValueError(f"config.data.path must point at the local {c.name} archive "
                       f"(see {gdata.CIFAR_URL}); growjax never downloads data.")
    return gdata.load_cifar(c.path, c.name, normalize=c.get("normalize", True),
                            seed=c.get("seed", 0))
  raise ValueError(f"Unknown dataset {c.name!r}; choose digits, digits_image, teacher, cifar10 "
                   "or cifar100.")


def build_model(c, splits: gdata.Splits) -> "nets.MLP | nets.ConvNet | nets.ResNet":
  """``c.kind``: mlp | convnet | resnet; input shape and outputs taken from the data."""
  shape = tuple(splits.train.x.shape[1:])
  fields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in c.items() if k != "kind"}
  if c.kind == "mlp":
    return nets.MLP(input_dim=shape[0], num_outputs=splits.num_classes, **fields)
  if c.kind == "convnet":
    return nets.ConvNet(input_shape=shape, num_outputs=splits.num_classes, **fields)
  if c.kind == "resnet":
    return nets.ResNet(input_shape=shape, num_outputs=splits.num_classes, **fields)
  raise ValueError(f"Unknown model kind {c.kind!r}; choose mlp, convnet or resnet.")


def make_optimizer(c) -> optax.GradientTransformation:
  """``c.name``: adam | sgd (momentum) with ``c.lr`` and optional ``c.weight_decay``."""
  if c.name == "adam":
    tx = optax.adamw(c.lr, weight_decay=c.get("weight_decay", 0.0))
  elif c.name == "sgd":
    tx = optax.sgd(c.lr, momentum=c.get("momentum", 0.9))
  else:
    raise ValueError(f"Unknown optimizer {c.name!r}; choose adam or sgd.")
  return tx


def config_and_workdir_flags(default_config: str, name: str):
  """Defines ``--config`` and ``--workdir`` (call only under ``__main__``)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", default=default_config,
                                  help_string="ml_collections config file[:variant].")
  flags.DEFINE_string("workdir", default_workdir(name), "Output directory.")
