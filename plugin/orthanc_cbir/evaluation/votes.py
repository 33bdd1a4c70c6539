"""``orthanc-cbir evaluate --votes``: how often a site's readers found the hits similar.

Readers vote thumbs up or down on hits (``POST /cbir/votes``, the results page); the votes
are entries of the audit trail (:mod:`orthanc_cbir.audit`). Precision here is the share of
voted hits voted up: overall, among the hits ranked at most 1, 5 and 10, and per strategy.
A reader who votes twice on the same hit of the same query changed their mind: the later
vote counts. Hits nobody voted on count neither way, so the figure is the precision of what
readers looked at, on the site's own cases (with the trail's retention as its window).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..audit import Vote

RANKS = (1, 5, 10)
"""The ranks at or above which precision is also reported."""


def vote_precision(votes: Iterable[Vote]) -> dict[str, Any]:
    """The share of voted hits voted up (``None`` where nothing was voted), from every vote given,
    oldest first (a later vote of one user on one hit of one query replaces the earlier)."""
    last: dict[tuple[str, str, str], Vote] = {}
    for vote in votes:
        last[(vote.user, vote.query, vote.hit)] = vote
    counted = list(last.values())
    strategies = sorted({vote.strategy or "unknown" for vote in counted})
    return {
        "votes": len(counted), "users": len({vote.user for vote in counted}),
        "queries": len({vote.query for vote in counted}),
        "precision": _share_up(counted),
        "precision_at": {str(rank): _share_up([v for v in counted if v.rank is not None and v.rank <= rank])
                         for rank in RANKS},
        "by_strategy": {name: {"votes": sum(1 for v in counted if (v.strategy or "unknown") == name),
                               "precision": _share_up([v for v in counted if (v.strategy or "unknown") == name])}
                        for name in strategies},
    }  # fmt: skip


def _share_up(votes: list[Vote]) -> float | None:
    return round(sum(vote.vote == "up" for vote in votes) / len(votes), 4) if votes else None
