"""Teacher-student data: a random teacher MLP labels Gaussian inputs.

The student-teacher setting of Gardner & Derrida (1989) and Saad & Solla (1995), used for growth
studies since the minimal width that fits the data is known (the teacher's); see e.g.
Evci et al. (2022), "GradMax: Growing Neural Networks using Gradient Information",
arXiv:2201.05125, and Lawton, Galstyan & Ver Steeg (2024), arXiv:2411.05855.

The teacher is a plain numpy function (``Teacher.apply``), deliberately independent of
``growjax.nets``: data sits low in the import order. Inputs ``x ~ N(0, I)`` are float32; the
teacher computes in float64 from those float32 inputs, so labels can be recomputed exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from growjax.data.splits import Dataset, Splits


def _gelu(z):
  # tanh approximation, the default of jax.nn.gelu (approximate=True).
  return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "gelu": _gelu,
    "linear": lambda z: z,
}


class Teacher(NamedTuple):
  """A random MLP: ``kernels[i]`` [d_i, d_{i+1}], ``biases[i]`` [d_{i+1}] (float64)."""
  kernels: tuple[np.ndarray, ...]
  biases: tuple[np.ndarray, ...]
  activation: str

  def apply(self, x: np.ndarray) -> np.ndarray:
    """Teacher outputs (logits or regression targets) [n, d_out] (float64) for inputs [n, d_in]."""
    h = np.asarray(x, np.float64)
    act = ACTIVATIONS[self.activation]
    for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
      h = h @ w + b[None, :]
      if i < len(self.kernels) - 1:
        h = act(h)
    return h


class TeacherStudent(NamedTuple):
  """The dataset and the teacher that labelled it."""
  splits: Splits
  teacher: Teacher


def make_teacher(widths: tuple[int, ...] | list[int], activation: str = "relu", seed: int = 0,
                 bias_std: float = 0.1) -> Teacher:
  """Draws a random teacher MLP with LeCun-normal kernels (variance 1/fan_in) and normal biases.

  Args:
    widths: layer widths ``(d_in, hidden..., d_out)``, at least two entries.
    activation: one of ``ACTIVATIONS`` (between layers; the output layer is linear).
    seed: seed of the weights.
    bias_std: standard deviation of the biases.

  Returns:
    The ``Teacher``.
  """
  widths = tuple(int(w) for w in widths)
  if len(widths) < 2 or min(widths) < 1:
    raise ValueError(f"widths={widths} must list at least (d_in, d_out), all >= 1.")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; allowed: {sorted(ACTIVATIONS)}.")
  rng = np.random.default_rng(seed)
  kernels, biases = [], []
  for d_in, d_out in zip(widths[:-1], widths[1:]):
    kernels.append(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in))
    biases.append(bias_std * rng.normal(size=(d_out,)))
  return Teacher(tuple(kernels), tuple(biases), activation)


def _balance(teacher: Teacher, rng: np.random.Generator, d_in: int) -> Teacher:
  """Shifts the output bias so every class has the same mean logit on a calibration sample.

  A random teacher's argmax is often dominated by a few classes; centring the logits makes the
  classes roughly balanced. The shift is folded into the returned teacher, so labels remain
  exactly its argmax.
  """
  logits = teacher.apply(rng.normal(size=(4096, d_in)).astype(np.float32))
  biases = teacher.biases[:-1] + (teacher.biases[-1] - logits.mean(0),)
  return teacher._replace(biases=biases)


def load_teacher_student(widths: tuple[int, ...] | list[int] = (16, 32, 10), *,
                         activation: str = "relu", task: str = "classification",
                         n_train: int = 2048, n_val: int = 512, n_test: int = 512,
                         labels: str = "argmax", temperature: float = 1.0,
                         noise_std: float = 0.0, balance_classes: bool = True,
                         seed: int = 0) -> TeacherStudent:
  """Gaussian inputs labelled by a random teacher MLP.

  Args:
    widths: teacher widths ``(d_in, hidden..., d_out)``; ``d_out`` is the number of classes
      (classification) or the target dimension (regression).
    activation: teacher hidden activation (see ``ACTIVATIONS``).
    task: ``"classification"`` or ``"regression"``.
    n_train: training examples.
    n_val: validation examples.
    n_test: test examples.
    labels: classification only: ``"argmax"`` (label = argmax of the teacher's logits) or
      ``"sample"`` (label ~ softmax(logits / temperature)).
    temperature: softmax temperature for ``labels="sample"`` (> 0).
    noise_std: regression only: standard deviation of Gaussian noise added to the targets.
    balance_classes: classification only: centre the teacher's output bias (see ``_balance``).
    seed: one seed for the teacher, the inputs and the label noise (independent streams).

  Returns:
    ``TeacherStudent(splits, teacher)``: ``x`` float32 [n, d_in]; ``y`` int32 [n]
    (classification, ``num_classes = d_out``) or float32 [n, d_out] (regression,
    ``num_classes = 0``).
  """
  if task not in ("classification", "regression"):
    raise ValueError(f"task={task!r}; allowed: 'classification', 'regression'.")
  if labels not in ("argmax", "sample"):
    raise ValueError(f"labels={labels!r}; allowed: 'argmax', 'sample'.")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0.")
  if noise_std < 0:
    raise ValueError(f"noise_std={noise_std} must be >= 0.")
  if min(n_train, n_val, n_test) < 0:
    raise ValueError(f"n_train={n_train}, n_val={n_val}, n_test={n_test} must be >= 0.")
  # Independent, reproducible streams: changing n_train does not change the teacher.
  teacher_seq, calib_seq, x_seq, noise_seq = np.random.SeedSequence(seed).spawn(4)
  teacher = make_teacher(widths, activation, seed=int(teacher_seq.generate_state(1)[0]))
  d_in, d_out = teacher.kernels[0].shape[0], teacher.kernels[-1].shape[1]
  if task == "classification" and balance_classes:
    teacher = _balance(teacher, np.random.default_rng(calib_seq), d_in)
  x_rng, noise_rng = np.random.default_rng(x_seq), np.random.default_rng(noise_seq)

  def make(n):
    x = x_rng.normal(size=(n, d_in)).astype(np.float32)
    out = teacher.apply(x)
    if task == "regression":
      y = out + noise_std * noise_rng.normal(size=out.shape)
      return Dataset(x, y.astype(np.float32))
    if labels == "argmax":
      return Dataset(x, np.argmax(out, axis=1).astype(np.int32))
    z = out / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # Inverse-CDF sampling, one uniform per example.
    u = noise_rng.random(size=(n, 1))
    y = np.minimum((np.cumsum(p, axis=1) < u).sum(1), d_out - 1)
    return Dataset(x, y.astype(np.int32))

  train, val, test = make(n_train), make(n_val), make(n_test)
  num_classes = d_out if task == "classification" else 0
  name = f"teacher_{task}_{'x'.join(str(w) for w in widths)}"
  return TeacherStudent(Splits(train, val, test, num_classes=num_classes, name=name), teacher)
