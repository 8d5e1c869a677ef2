"""growjax: a functional JAX research framework.

Growing networks by morphisms learned and scored on a Gauss-Newton model of the loss, LiGO,
functional LoRA and quantization (QLoRA / LoftQ / PiSSA / QuAILoRA / LQ-LoRA), parameter-efficient
architecture search, mean-field VI with the forest mixture bound, FedEP, dynamic maximal cliques
and Zernike polynomials.

Subpackages are imported lazily (``growjax.nets``, ``growjax.morph``, ...), so importing growjax
does not pay for the parts a program does not use.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = (
    "tree", "nets", "morph", "curvature", "grow", "peft", "quant", "vi", "fed", "graphs",
    "numerics", "data", "train",
)

__all__ = list(_SUBPACKAGES)


def __getattr__(name):
  if name in _SUBPACKAGES:
    module = importlib.import_module(f"growjax.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'growjax' has no attribute {name!r}")
