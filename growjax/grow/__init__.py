"""Growing networks by Gauss-Newton-learned morphisms, with the baselines behind one interface."""

from growjax.grow.candidates import METHODS, LearnConfig
from growjax.grow.loop import Grower, Schedule
from growjax.grow.search import Candidate, GrowConfig, RoundResult, Searcher, grow_round
from growjax.grow.stats import SiteStats, Stats, make_stats_fn, perturbed_apply

__all__ = ["Candidate", "GrowConfig", "Grower", "Schedule", "LearnConfig", "METHODS", "RoundResult", "Searcher",
           "SiteStats", "Stats", "grow_round", "make_stats_fn", "perturbed_apply"]
