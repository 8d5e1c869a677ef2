"""growjax.grow.Grower: the validation stopping rule of the growth schedule.

Its own seed network: test_grow.py's module fixture is donated by an earlier ``train.fit``.
"""

import jax
import optax
import pytest

from growjax import curvature, data, grow, nets, train
from growjax.grow import candidates as C


@pytest.fixture(scope="module")
def seed_net():
  d = data.load_digits()
  model = nets.MLP(widths=(6,))
  tx = optax.adam(3e-3)
  state = train.create_state(nets.common.host_init(model, jax.random.key(0)), tx)
  return model, state, train.make_trainer(tx), d


def _grower(seed_net, patience):
  model, state, trainer, d = seed_net
  searcher = grow.Searcher(curvature.softmax_cross_entropy,
                           grow.GrowConfig(ks=(1,), learn=C.LearnConfig(psi_steps=1)))
  return grow.Grower(searcher, d, trainer, grow.Schedule(every=10, max_rounds=5, stats_batch=64,
                                                         val_patience=patience), seed=0)


@pytest.mark.parametrize("patience", [1, 2])
def test_val_patience_stops_growth_when_validation_loss_stalls(seed_net, patience):
  """The hook sees the same network (same validation loss) at every round: the first round
  grows; after ``patience`` rounds without a better validation loss growth stops and says why."""
  model, state, _, _ = seed_net
  grower = _grower(seed_net, patience)
  grown = [grower(10 * (i + 1), model, state) is not None for i in range(patience + 2)]
  assert grown == [True] * patience + [False, False]
  assert grower.rounds == patience
  assert "has not improved" in grower.stopped and f"val_patience={patience}" in grower.stopped


def test_val_patience_must_be_non_negative():
  with pytest.raises(ValueError, match="non-negative"):
    grow.Schedule(val_patience=-1).validate()
