"""``orthanc-cbir evaluate``: every strategy, through the real Redis index, on labelled images.

The gallery is embedded and indexed into Redis under its own key prefix (never
the production index), then every query image is searched with each strategy.
Relevance is "same class" (the ImageFolder folder, the MedNIST class, the
pneumonia label). Reported per strategy:

- P@1, P@10, mAP@10, mAP@100, nDCG@10: class retrieval. On MedNIST these are
  saturated (any reasonable model is near 1.0): a sanity check, not a ranking of models;
- ``recall@10_vs_exact``: share of the exact top 10 a strategy also returns: what
  a faster strategy gives up against brute force;
- ``candidate_fraction``: share of the index whose features (or weighted codes)
  each query compared: what it saves; ``examined_fraction``: for ``hamming``, the
  share whose codes the multi-index probe returned (a superset);
- latency p50 / p95 in ms (server side: from the stored query vector to the ranked
  answer, without the query's own embedding);
- copy detection (optional): rank of the original for re-encoded, shifted,
  intensity-changed gallery images;
- a per-class P@10 table.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..index import IndexInfo, IndexStore
from ..index.records import picture_records
from ..model.embedder import Embedder, Embeddings
from ..redis_client import RedisClient
from ..search import STRATEGIES, Query, Searcher, SearchOptions
from ..training.data import ImageSet
from .metrics import average_precision_at_k, ndcg_at_k, precision_at_k
from .model_report import perturb_copy

DEPTH = 100
"""Hits asked of every strategy (mAP@100 needs them)."""


@dataclass
class Labelled:
    """Images with a class per image and the class names."""

    images: ImageSet
    classes: list[str]

    @property
    def labels(self) -> np.ndarray:
        return self.images.fine_class


@dataclass
class StrategyReport:
    figures: dict[str, float]
    per_class_p10: dict[str, float]
    rankings: list[list[int]] = field(repr=False, default_factory=list)
    """Gallery indices of each query's top hits (for the example grid)."""


def index_images(store: IndexStore, names: list[str], embedded: Embeddings, namespace: str,
                 batch: int = 1000, progress: bool = True) -> list[str]:  # fmt: skip
    """Add embedded pictures to ``store``; returns their SOPInstanceUIDs in order."""
    records = picture_records(names, embedded, namespace)
    for start in tqdm(range(0, len(records), batch), desc="index", unit="batch", disable=not progress,
                      dynamic_ncols=True):  # fmt: skip
        store.add(records[start : start + batch])
    return [record.key for record in records]


def evaluate(
    client: RedisClient, embedder: Embedder, gallery: Labelled, queries: Labelled,
    strategies: tuple[str, ...] = STRATEGIES, k: int = 10, copies: int = 0, seed: int = 0, progress: bool = True,
    recluster_first: bool = True,
) -> tuple[dict, dict[str, StrategyReport]]:  # fmt: skip
    """Index ``gallery`` into a private key space of ``client``, query it; returns the
    JSON-ready summary (the shape DESIGN.md promises) and the per-strategy reports.
    The private key space is deleted afterwards."""
    run = uuid.uuid4().hex[:12]
    info = IndexInfo.from_card(embedder.card)
    store = IndexStore(client, info, prefix=f"cbir-eval-{run}")
    try:
        gallery_embedded = embedder.embed(gallery.images.as_float())
        uids = index_images(store, gallery.images.names, gallery_embedded, run, progress=progress)
        if recluster_first and "cluster" in strategies:
            from ..search.clustering import recluster

            recluster(store)
        row_of_uid = {uid: i for i, uid in enumerate(uids)}
        searcher = Searcher(store)
        query_embedded = embedder.embed(queries.images.as_float())
        reports: dict[str, StrategyReport] = {}
        exact_top: list[list[int]] | None = None
        for strategy in ("exact",) + tuple(s for s in strategies if s != "exact"):
            reports[strategy] = _run_strategy(searcher, strategy, query_embedded, gallery, queries, row_of_uid,
                                              exact_top, k, progress)  # fmt: skip
            if strategy == "exact":
                exact_top = [ranking[:k] for ranking in reports[strategy].rankings]
        if copies:
            copy_figures = _copy_detection(searcher, embedder, gallery, row_of_uid, strategies, copies, seed)
            for strategy, figures in copy_figures.items():
                reports[strategy].figures.update(figures)
        reports = {s: reports[s] for s in strategies}
        summary = {"n_gallery": len(gallery.images), "n_queries": len(queries.images), "model": embedder.version,
                   "strategies": {s: r.figures for s, r in reports.items()}}  # fmt: skip
        return summary, reports
    finally:
        for key in client.scan_iter(match=f"cbir-eval-{run}:*", count=10000):
            client.unlink(key)


def _query(embedded: Embeddings, i: int) -> Query:
    return Query(embedded.features[i], embedded.codes[i], {h: p[i] for h, p in embedded.probabilities.items()})


def _run_strategy(searcher: Searcher, strategy: str, embedded: Embeddings, gallery: Labelled, queries: Labelled,
                  row_of_uid: dict[str, int], exact_top: list[list[int]] | None, k: int,
                  progress: bool) -> StrategyReport:  # fmt: skip
    options = SearchOptions(strategy, k=DEPTH, with_records=False)
    labels, gallery_labels = queries.labels, gallery.labels
    totals = np.bincount(gallery_labels, minlength=len(gallery.classes))
    figures: dict[str, list[float]] = {name: [] for name in ("p@1", "p@10", "map@10", "map@100", "ndcg@10",
                                                              "recall@10_vs_exact", "candidate_fraction",
                                                              "examined_fraction", "latency")}  # fmt: skip
    rankings = []
    for i in tqdm(range(len(labels)), desc=strategy, unit="query", disable=not progress, dynamic_ncols=True):
        result = searcher.search(_query(embedded, i), options)
        ranking = [row_of_uid[uid] for uid in result.sop_instance_uids]
        rankings.append(ranking)
        relevant = gallery_labels[ranking] == labels[i] if ranking else np.zeros(0, bool)
        total = int(totals[labels[i]])
        figures["p@1"].append(precision_at_k(relevant, 1))
        figures["p@10"].append(precision_at_k(relevant, k))
        figures["map@10"].append(average_precision_at_k(relevant, total, k))
        figures["map@100"].append(average_precision_at_k(relevant, total, DEPTH))
        figures["ndcg@10"].append(ndcg_at_k(relevant, total, k))
        if exact_top is not None:
            figures["recall@10_vs_exact"].append(len(set(ranking[:k]) & set(exact_top[i])) / k)
        figures["candidate_fraction"].append(result.candidate_fraction)
        figures["examined_fraction"].append(result.examined / max(result.index_size, 1))
        figures["latency"].append(result.elapsed_ms)
    latency = np.array(figures.pop("latency"))
    out = {name: round(float(np.mean(values)), 4) if values else 1.0 for name, values in figures.items()}
    out["latency_ms_p50"] = round(float(np.percentile(latency, 50)), 2)
    out["latency_ms_p95"] = round(float(np.percentile(latency, 95)), 2)
    per_class = {name: round(float(np.mean([precision_at_k(gallery_labels[r] == c, k)
                                            for r, label in zip(rankings, labels, strict=True) if label == c])), 4)
                 for c, name in enumerate(queries.classes) if np.any(labels == c)}  # fmt: skip
    return StrategyReport(out, per_class, rankings)


def _copy_detection(searcher: Searcher, embedder: Embedder, gallery: Labelled, row_of_uid: dict[str, int],
                    strategies: tuple[str, ...], copies: int, seed: int) -> dict:  # fmt: skip
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(gallery.images), size=min(copies, len(gallery.images)), replace=False)
    perturbed = np.stack([perturb_copy(gallery.images.images[i], rng) for i in chosen]).astype(np.float32)
    embedded = embedder.embed(perturbed)
    out = {}
    for strategy in strategies:
        ranks = []
        for q, original in enumerate(chosen):
            result = searcher.search(_query(embedded, q), SearchOptions(strategy, k=10, with_records=False))
            ranking = [row_of_uid[uid] for uid in result.sop_instance_uids]
            ranks.append(ranking.index(original) + 1 if original in ranking else None)
        out[strategy] = {"copy_rank1": round(float(np.mean([r == 1 for r in ranks])), 4),
                         "copy_found_in_10": round(float(np.mean([r is not None for r in ranks])), 4)}  # fmt: skip
    return out


def write_report(out_dir: Path, summary: dict, reports: dict[str, StrategyReport], gallery: Labelled,
                 queries: Labelled, command: str, examples: int = 6) -> Path:  # fmt: skip
    """``report.md`` (the tables), ``precision_recall.png`` (precision at each rank 1..100
    against recall, per strategy), ``examples.png`` (queries and their top hits), ``summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(reports)
    columns = ["p@1", "p@10", "map@10", "map@100", "ndcg@10", "recall@10_vs_exact", "candidate_fraction",
               "examined_fraction", "latency_ms_p50", "latency_ms_p95"]  # fmt: skip
    extra: list[str] = [c for c in ("copy_rank1", "copy_found_in_10") if c in next(iter(reports.values())).figures]
    lines = [f"# Retrieval evaluation\n\n`{command}`\n\nModel `{summary['model']}`; gallery {summary['n_gallery']} "
             f"images, {summary['n_queries']} queries; relevance = same class.\n",
             "| strategy | " + " | ".join(columns + extra) + " |",
             "|---" * (len(columns + extra) + 1) + "|"]  # fmt: skip
    lines += [f"| {s} | " + " | ".join(str(reports[s].figures[c]) for c in columns + extra) + " |" for s in names]
    lines += ["\n## P@10 per query class\n", "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name in reports[names[0]].per_class_p10:
        lines.append(f"| {name} | " + " | ".join(str(reports[s].per_class_p10.get(name, "")) for s in names) + " |")
    lines.append("\n![precision-recall](precision_recall.png)\n\n![examples](examples.png)\n")
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _precision_recall_png(out_dir / "precision_recall.png", reports, gallery, queries)
    _examples_png(out_dir / "examples.png", reports[names[0]], names[0], gallery, queries, examples)
    return out_dir / "report.md"


def _precision_recall_png(path: Path, reports: dict[str, StrategyReport], gallery: Labelled, queries: Labelled,
                          size: int = 420) -> None:  # fmt: skip
    totals = np.bincount(gallery.labels, minlength=len(gallery.classes))
    image = Image.new("RGB", (size + 160, size + 40), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, y0 = 30, 10
    draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
    draw.text((x0, y0 + size + 5), "recall (top 100) ->   precision ^", fill="black", font=font)
    colours = ["black", "red", "blue", "green", "orange", "purple"]
    for n, (strategy, report) in enumerate(reports.items()):
        curve = np.zeros((DEPTH, 2))
        for ranking, label in zip(report.rankings, queries.labels, strict=True):
            relevant = np.zeros(DEPTH)
            hits = (gallery.labels[ranking] == label).astype(float)
            relevant[: len(hits)] = hits
            found = np.cumsum(relevant)
            curve[:, 0] += found / max(min(int(totals[label]), DEPTH), 1)
            curve[:, 1] += found / np.arange(1, DEPTH + 1)
        curve /= max(len(report.rankings), 1)
        points = [(x0 + r * size, y0 + (1 - p) * size) for r, p in curve]
        draw.line(points, fill=colours[n % len(colours)], width=2)
        draw.text((x0 + size + 10, y0 + 14 * n), strategy, fill=colours[n % len(colours)], font=font)
    image.save(path)


def _examples_png(path: Path, report: StrategyReport, strategy: str, gallery: Labelled, queries: Labelled,
                  examples: int, hits: int = 5, tile: int = 64) -> None:  # fmt: skip
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(queries.labels), size=min(examples, len(queries.labels)), replace=False)
    sheet = Image.new("RGB", ((hits + 1) * (tile + 4) + 4, len(chosen) * (tile + 16) + 16), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"query | top {hits} by {strategy} (green: same class)", fill="black")
    for row, q in enumerate(chosen):
        y = 16 + row * (tile + 16)
        sheet.paste(Image.fromarray(queries.images.images[q]).resize((tile, tile)).convert("RGB"), (4, y))
        for n, g in enumerate(report.rankings[q][:hits]):
            x = 4 + (n + 1) * (tile + 4)
            sheet.paste(Image.fromarray(gallery.images.images[g]).resize((tile, tile)).convert("RGB"), (x, y))
            same = gallery.labels[g] == queries.labels[q]
            draw.rectangle([x - 1, y - 1, x + tile, y + tile], outline="green" if same else "red", width=2)
        draw.text((4, y + tile + 1), queries.classes[queries.labels[q]], fill="black")
    sheet.save(path)
