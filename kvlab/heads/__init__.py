"""Head profiling: score every attention (KV) head as retrieval, induction or local.

    from kvlab.heads import profile_heads, HeadProfile
    profile = profile_heads(model, tokenizer)          # ProfileSettings() defaults, seed 0
    profile.save("profile.json"); HeadProfile.load("profile.json").check_matches(model)

Scores: retrieval (Wu et al. 2024, needle copying), induction (repeated random tokens) and locality
(attention mass on sinks + a recent window). See :mod:`kvlab.heads.profile` for the method and
:mod:`kvlab.heads.scores` for the pure scoring functions.
"""

from __future__ import annotations

from kvlab.heads.profile import SCORES, ProfileSettings, compute_scores, profile_heads
from kvlab.heads.scores import (CLASSES, classify, group_query_heads, induction_score, locality_score,
                                retrieval_hits)
from kvlab.heads.store import HeadProfile

__all__ = ["CLASSES", "SCORES", "HeadProfile", "ProfileSettings", "classify", "compute_scores",
           "group_query_heads", "induction_score", "locality_score", "profile_heads", "retrieval_hits",
           "plot_profile"]


def plot_profile(profile: HeadProfile, path: str, dpi: int = 150) -> None:
    """Heatmaps of the three scores and the class map (see :mod:`kvlab.heads.plot`)."""
    from kvlab.heads.plot import plot_profile as _plot

    _plot(profile, path, dpi=dpi)
