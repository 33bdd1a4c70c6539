"""``orthanc-cbir recluster``: the offline graph clustering of seed 003.

Each indexed instance is linked to its ``neighbours`` nearest instances by
cosine similarity (edge weight = similarity); Louvain modularity optimisation
(networkx) splits the graph into communities. Every row gets its community id
(the ``cluster`` attribute) and the index stores one centroid per community, so
the ``cluster`` strategy can send a query to its nearest community. Running it
is a command an operator schedules, not a cost paid on every insert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from ..index.store import IndexStore
from .strategies import Searcher


@dataclass(frozen=True)
class ClusterSummary:
    instances: int
    clusters: int
    modularity: float
    largest: int
    seconds: float


def recluster(store: IndexStore, neighbours: int = 10, resolution: float = 1.0, seed: int = 0) -> ClusterSummary:
    """Cluster every live instance of ``store`` and save the result in it."""
    import networkx as nx
    from networkx.algorithms.community import louvain_communities, modularity

    started = time.monotonic()
    searcher = Searcher(store)
    searcher.snapshot.refresh()
    rows = np.flatnonzero(searcher.snapshot.live)
    if len(rows) < 2:
        raise ValueError(f"clustering needs at least 2 indexed instances, the index has {len(rows)}")
    features = np.ascontiguousarray(searcher.snapshot.vectors(rows), np.float32)  # the graph needs every pair anyway
    # FAISS's brute-force k-NN (no index kept): each row's nearest rows and their cosine similarities
    similarities, nearest = faiss.knn(features, features, min(neighbours + 1, len(rows)),
                                      metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    graph = nx.Graph()
    graph.add_nodes_from(range(len(rows)))
    for i, (row, similarity) in enumerate(zip(nearest, similarities, strict=True)):
        for j, weight in zip(row.tolist(), similarity.tolist(), strict=True):
            if j != i:
                graph.add_edge(i, j, weight=max(weight, 0.0))
    communities = louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    communities = sorted(communities, key=len, reverse=True)
    labels = np.empty(len(rows), dtype=np.int32)
    centroids = np.zeros((len(communities), features.shape[1]), np.float32)
    for number, members in enumerate(communities):
        members = np.fromiter(members, dtype=np.int64)
        labels[members] = number
        centroid = features[members].mean(axis=0)
        centroids[number] = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    store.set_attribute(rows, "cluster", labels)
    store.set_centroids(centroids)
    return ClusterSummary(len(rows), len(communities), round(modularity(graph, communities, weight="weight"), 4),
                          len(communities[0]), round(time.monotonic() - started, 1))  # fmt: skip
