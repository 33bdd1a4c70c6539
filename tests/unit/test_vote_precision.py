"""Precision from the readers' votes (orthanc_cbir.evaluation.votes): what ``orthanc-cbir evaluate
--votes`` reports from the audit trail's votes."""

from __future__ import annotations

from orthanc_cbir.audit import Vote
from orthanc_cbir.evaluation.votes import vote_precision


def voted(user: str, hit: str, choice: str, rank: int | None, strategy: str | None = "hamming",
          query: str = "1.2.3") -> Vote:  # fmt: skip
    return Vote(0.0, user, query, hit, choice, rank, strategy)


def test_the_share_up_overall_at_each_rank_and_per_strategy():
    votes = [voted("ana", "1.1", "up", 1), voted("ana", "1.2", "down", 2), voted("ana", "1.3", "up", 7, "graph"),
             voted("ben", "1.1", "up", 1, query="1.2.4"), voted("ben", "1.9", "down", None, None, query="1.2.4")]
    report = vote_precision(votes)
    assert (report["votes"], report["users"], report["queries"]) == (5, 2, 2)
    assert report["precision"] == 0.6
    assert report["precision_at"] == {"1": 1.0, "5": 0.6667, "10": 0.75}
    assert report["by_strategy"] == {"graph": {"votes": 1, "precision": 1.0},
                                     "hamming": {"votes": 3, "precision": 0.6667},
                                     "unknown": {"votes": 1, "precision": 0.0}}  # fmt: skip


def test_a_readers_later_vote_on_the_same_hit_replaces_the_earlier_and_another_readers_counts_apart():
    votes = [voted("ana", "1.1", "down", 1), voted("ana", "1.1", "up", 1), voted("ben", "1.1", "down", 1)]
    report = vote_precision(votes)
    assert report["votes"] == 2 and report["precision"] == 0.5


def test_no_votes_give_no_precision():
    assert vote_precision([]) == {"votes": 0, "users": 0, "queries": 0, "precision": None,
                                  "precision_at": {"1": None, "5": None, "10": None}, "by_strategy": {}}  # fmt: skip
