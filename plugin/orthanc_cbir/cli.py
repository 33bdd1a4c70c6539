"""``orthanc-cbir``: the command line.

Each subcommand is a thin adapter over the package; ``orthanc-cbir COMMAND --help``
says what it takes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Settings, load_settings
from .logs import configure_logging

if TYPE_CHECKING:  # for annotations only: --help imports neither numpy nor redis
    from .index import IndexInfo, IndexStore
    from .model.embedder import Embedder
    from .redis_client import RedisClient

STRATEGY_NAMES = ("exact", "graph", "hamming", "class", "cluster", "multilateral")
"""The strategies of :mod:`orthanc_cbir.search.strategies` (kept here so --help needs no numpy)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    settings = load_settings(frames_per_instance=getattr(args, "frames", None))
    configure_logging(settings.log_level)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthanc-cbir", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")

    preview = commands.add_parser(
        "preview",
        help="decode DICOM files and draw them, with the decisions taken, on one PNG",
        description="Decode each FILE (folders are walked) as the index would, print one line per "
        "file ('FILE: image ...' or 'FILE: rejected: REASON') and draw a contact sheet. "
        "Exit status 0 when every file ended as one of the two.",
    )
    preview.add_argument("files", nargs="+", type=Path, metavar="FILE")
    preview.add_argument("--out", type=Path, required=True, metavar="PNG", help="the contact sheet to write")
    preview.add_argument("--frames", type=int, help="frames per multi-frame instance (default: settings)")
    preview.add_argument("--columns", type=int, default=4, help="tiles per row (default 4)")
    preview.set_defaults(run=_run_preview)

    demo = commands.add_parser(
        "demo",
        help="start Redis and Orthanc with the plugin, push DICOM, run the pipeline, stop",
        description="What 'make demo' runs: everything on loopback ports in a local state folder.",
    )
    demo.add_argument("--state", type=Path, default=Path("state/demo"), help="state folder (default state/demo)")
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="DICOM folder to push (default: ../shared/data/dicom, else pydicom's files)",
    )
    demo.set_defaults(run=_run_demo)

    viewer = commands.add_parser(
        "viewer",
        help="serve the OHIF viewer with Orthanc's DICOMweb and /cbir routes behind it on one origin",
        description="Serves the prebuilt OHIF viewer (@ohif/app, fetched once with npm into --cache-dir and checked "
        "against its pinned sha512) with a DICOMweb data source at /dicom-web on the same origin, and forwards "
        "DICOMweb reads (/dicom-web, /wado), thumbnails (/instances/ID/preview) and /cbir to --orthanc-url; no other "
        "Orthanc route. Callers log in with their own Orthanc user (HTTP Basic, checked by Orthanc); with --demo "
        "(loopback only) the viewer logs anyone in with CBIR_ORTHANC_USERNAME / CBIR_ORTHANC_PASSWORD. Host names "
        "other than CBIR_VIEWER_ALLOWED_HOSTS and cross-origin writes are refused. Open "
        "http://HOST:PORT/viewer?StudyInstanceUIDs=UID.",
    )
    viewer.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    viewer.add_argument("--port", type=int, default=3000, help="port to listen on (default 3000)")
    viewer.add_argument("--orthanc-url", help="default: settings (CBIR_ORTHANC_URL)")
    viewer.add_argument("--cache-dir", type=Path, default=None, help="where OHIF is kept (default: build/ohif)")
    viewer.add_argument("--dist", type=Path, default=None, help="serve this OHIF dist folder instead (no fetch)")
    viewer.add_argument("--fetch-only", action="store_true",
                        help="fetch OHIF and build this project's extension into --cache-dir if missing, then exit")
    viewer.add_argument("--extension", type=Path, default=None,
                        help="serve the built OHIF extension in this folder (default: build it into --cache-dir)")
    viewer.add_argument("--no-extension", action="store_true", help="serve OHIF without this project's extension")
    viewer.add_argument("--demo", action="store_true",
                        help="loopback demo: let anonymous callers in with Orthanc's credentials (loopback only)")
    viewer.add_argument("--allowed-hosts", help="default: settings (CBIR_VIEWER_ALLOWED_HOSTS)")
    viewer.set_defaults(run=_run_viewer)

    index = commands.add_parser(
        "index",
        help="embed DICOM files and pictures and add them to the Redis index",
        description="Walks each PATH (DICOM files, folders, PNG / JPEG pictures), decodes, embeds with the "
        "model and adds one record per instance to the index at CBIR_REDIS_URL. Prints a summary of indexed, "
        "skipped-as-duplicate and rejected files (with the reason).",
    )
    index.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    index.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    index.add_argument("--frames", type=int, help="frames per multi-frame instance (default: settings)")
    index.add_argument("--batch", type=int, default=64, help="instances embedded and written together")
    index.set_defaults(run=_run_index)

    query = commands.add_parser(
        "query",
        help="find the indexed instances most similar to a file or an indexed instance",
        description="Embeds FILE (DICOM or picture), or takes the stored vector of --uid, and prints the ranked "
        "answer of the chosen strategy.",
    )
    source = query.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path, metavar="FILE")
    source.add_argument("--uid", help="SOPInstanceUID of an indexed instance")
    query.add_argument("--k", type=int, default=10)
    query.add_argument("--strategy", default=Settings.default_strategy, choices=STRATEGY_NAMES)
    query.add_argument("--level", default="instance", choices=("instance", "series", "study"))
    query.add_argument("--filter", action="append", default=[], metavar="NAME=VALUE",
                       help="modality=CT,MR | body_part=CHEST | sex=F | age=40-70 | date=2020-01-01..2020-12-31 | "
                       "exclude=same-patient,same-study,same-series (repeatable)")  # fmt: skip
    query.add_argument("--weights", default=None, metavar="SUB=W,...",
                       help="multilateral: weight per sub-code, e.g. modality=1,region=1,pathology=0")  # fmt: skip
    query.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    query.add_argument("--json", action="store_true", help="print the answer as JSON")
    query.set_defaults(run=_run_query)

    worker = commands.add_parser(
        "worker",
        help="index what Orthanc stores: consume the ingest stream until stopped",
        description="Takes entries of the ingest stream (a consumer group: run as many as you like), fetches "
        "each instance from Orthanc's REST API (CBIR_ORTHANC_URL, CBIR_ORTHANC_USERNAME, "
        "CBIR_ORTHANC_PASSWORD), decodes, embeds, indexes, then acknowledges. SIGTERM / Ctrl-C stops it "
        "after the batch in hand.",
    )
    worker.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    worker.add_argument("--orthanc-url", help="default: settings (CBIR_ORTHANC_URL)")
    worker.set_defaults(run=_run_worker)

    serve = commands.add_parser(
        "serve",
        help="the standalone server: DICOM SCP, HTTP API and STOW-RS, workers, without Orthanc",
        description="One process: a C-STORE / C-ECHO SCP (CBIR_SCP_AET on CBIR_SCP_HOST:CBIR_SCP_PORT, calling AE "
        "titles limited by CBIR_SCP_ALLOWED_AETS), the HTTP API of the Orthanc plugin plus STOW-RS at "
        "/dicom-web/studies (CBIR_HTTP_HOST:CBIR_HTTP_PORT, OpenAPI at /docs, CBIR_HTTP_TOKEN or "
        "CBIR_HTTP_USERNAME / CBIR_HTTP_PASSWORD), and worker threads; with --scp-processes N, N - 1 more "
        "processes receive on the same DICOM port. What is received is written to "
        "CBIR_SPOOL_DIR before it is acknowledged, so a crash loses nothing acknowledged.",
    )
    serve.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    serve.add_argument("--spool", help="default: settings (CBIR_SPOOL_DIR)")
    serve.add_argument("--dicom-port", type=int, help="default: settings (CBIR_SCP_PORT); 0 turns the SCP off")
    serve.add_argument("--http-port", type=int, help="default: settings (CBIR_HTTP_PORT)")
    serve.add_argument("--workers", type=int, default=1, help="worker threads in this process (default 1)")
    serve.add_argument("--scp-processes", type=int,
                       help="processes receiving on the DICOM port, this one included; default: settings "
                            "(CBIR_SCP_PROCESSES, 1)")  # fmt: skip
    serve.set_defaults(run=_run_serve)

    reconcile_parser = commands.add_parser(
        "reconcile",
        help="make the index agree with Orthanc: enqueue what is missing, drop what is gone",
        description="Walks Orthanc's instances (CBIR_ORTHANC_URL, ...) and enqueues for the workers every instance "
        "not indexed under the current model and not rejected, and a removal for every indexed instance "
        "Orthanc no longer has. Run it after Redis was down, after a model change, or on an existing archive.",
    )
    reconcile_parser.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    reconcile_parser.add_argument("--orthanc-url", help="default: settings (CBIR_ORTHANC_URL)")
    reconcile_parser.set_defaults(run=_run_reconcile)

    indexes_parser = commands.add_parser(
        "indexes",
        help="list the model versions indexed in Redis; drop one the current index has replaced",
        description="One line per model version with an index in Redis: its instance count and shards, the "
        "current model's marked. After a model change, run reconcile, wait for the workers, then --drop the old "
        "version: refused while the current index holds fewer instances than the one dropped.",
    )
    indexes_parser.add_argument("--drop", metavar="VERSION", help="delete this version's index (name@sha prefix)")
    indexes_parser.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    indexes_parser.set_defaults(run=_run_indexes)

    backfill_parser = commands.add_parser(
        "backfill",
        help="index what any DICOMweb server holds and the index lacks (QIDO-RS + WADO-RS)",
        description="Lists the studies of --dicomweb (QIDO-RS, paged; --since, --modality), then their instances, "
        "retrieves each one not indexed under the current model and not rejected before (WADO-RS), and embeds and "
        "indexes it; what cannot be used is recorded as rejected (key dicomweb:UID) with the reason. Studies done "
        "are remembered in Redis, so a rerun after an interruption goes on where it stopped. Exit status: 0 done, "
        "1 server unreachable / credentials refused / instances failed (rerun to resume), 2 bad arguments, "
        "130 stopped by SIGINT/SIGTERM.",
    )
    backfill_parser.add_argument("--dicomweb", required=True, metavar="URL",
                                 help="DICOMweb root, e.g. http://pacs:8042/dicom-web")  # fmt: skip
    backfill_parser.add_argument("--since", metavar="DATE", help="only studies with StudyDate on or after YYYY-MM-DD")
    backfill_parser.add_argument("--modality", metavar="CT,MR", help="only studies (and instances) of these modalities")
    backfill_parser.add_argument("--username", help="HTTP basic user (password: --password or CBIR_DICOMWEB_PASSWORD)")
    backfill_parser.add_argument("--password", help="prefer the CBIR_DICOMWEB_PASSWORD variable (ps shows arguments)")
    backfill_parser.add_argument("--token", help="bearer token instead of basic (or CBIR_DICOMWEB_TOKEN)")
    backfill_parser.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    backfill_parser.add_argument("--batch", type=int, default=32, help="instances embedded and written together")
    backfill_parser.add_argument("--restart", action="store_true", help="forget which studies earlier runs finished")
    backfill_parser.set_defaults(run=_run_backfill)

    recluster_parser = commands.add_parser(
        "recluster",
        help="cluster the index offline for the 'cluster' strategy (seed 003)",
        description="Builds the cosine k-NN graph of every indexed instance, clusters it by modularity (Louvain) "
        "and stores each instance's cluster and the centroids.",
    )
    recluster_parser.add_argument("--neighbours", type=int, default=10)
    recluster_parser.add_argument("--resolution", type=float, default=1.0)
    recluster_parser.add_argument("--redis-url", help="default: settings (CBIR_REDIS_URL)")
    recluster_parser.set_defaults(run=_run_recluster)

    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    # Real anatomy brought beside the checkout (README, "The model"); never part of the project.
    anatomy = Path(__file__).resolve().parents[3] / "anatomy"
    train = commands.add_parser(
        "train",
        help="train the retrieval model (needs the 'train' extra: torch)",
        description="Train on MedNIST (file-number block split), PneumoniaMNIST, OrganAMNIST and real CT/MR "
        "volumes with a fixed seed; writes checkpoint.pt and training.json to --out.",
    )
    train.add_argument("--mednist", type=Path, default=shared / "mednist" / "mednist_dev.tar.gz")
    train.add_argument("--pneumonia", type=Path, default=shared / "pneumoniamnist")
    train.add_argument("--anatomy", type=Path, default=anatomy,
                       help="folder with organamnist/organamnist.npz, lidc0314/ and ts_ct/ "
                            "(skipped if absent)")  # fmt: skip
    train.add_argument("--out", type=Path, default=Path("state/training"))
    train.add_argument("--epochs", type=int, default=None, help="default: TrainConfig.epochs (4)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--limit", type=int, default=None, help="train on this many images only (smoke runs)")
    train.set_defaults(run=_run_train)

    refit = commands.add_parser(
        "refit",
        help="redo the post-training fits (spectral PCA, ITQ) of a checkpoint",
        description="What train does after its last epoch, on a saved checkpoint: same weights, same data. "
        "Writes checkpoint.pt and training.json to --out.",
    )
    refit.add_argument("checkpoint", type=Path)
    refit.add_argument("--out", type=Path, default=Path("state/training"))
    refit.add_argument("--level-periods", type=float, nargs="+", default=None, metavar="MM",
                       help="periods of the level circles in the features (default: the checkpoint's)")
    refit.set_defaults(run=_run_refit)

    export = commands.add_parser(
        "export",
        help="export a training checkpoint to one ONNX file and its model card",
        description="Writes MODEL.onnx and MODEL.json (the card). Run validate-model next to add the figures.",
    )
    export.add_argument("--checkpoint", type=Path, default=Path("state/training/checkpoint.pt"))
    export.add_argument("--out", type=Path, default=Path("onnx_models/cbir-resnet-64.onnx"))
    export.set_defaults(run=_run_export)

    evaluate = commands.add_parser(
        "evaluate",
        help="measure every retrieval strategy through a Redis index on labelled images",
        description="Indexes a gallery (ImageFolder tree, class = folder; or MedNIST's training blocks) into a "
        "private key space, queries it with every image of --queries (or MedNIST's held-out blocks) and reports "
        "P@1, P@10, mAP@10/@100, nDCG@10, recall against exact, candidate fraction and latency per strategy, "
        "per-class P@10, copy detection and (with --pneumonia) pathology retrieval. Writes report.md, "
        "precision_recall.png, examples.png and summary.json to --report.",
    )
    evaluate.add_argument("--gallery", type=Path, help="ImageFolder tree indexed as the gallery")
    evaluate.add_argument("--queries", type=Path, help="ImageFolder tree of query images")
    evaluate.add_argument("--mednist", type=Path, help="instead of --gallery/--queries: MedNIST archive, "
                          "gallery = training blocks, queries = held-out blocks")  # fmt: skip
    evaluate.add_argument("--votes", action="store_true",
                          help="instead: precision from the readers' votes in the audit trail of the settings' Redis "
                          "(or --redis-url), as JSON")  # fmt: skip
    evaluate.add_argument("--pneumonia", type=Path, help="also PneumoniaMNIST: gallery train, queries val")
    evaluate.add_argument("--strategy", default="all", help="a strategy name or 'all'")
    evaluate.add_argument("--k", type=int, default=10)
    evaluate.add_argument("--copies", type=int, default=None,
                          help="copy-detection queries (default 1000 with --mednist, else 0)")  # fmt: skip
    evaluate.add_argument("--limit", type=int, default=None, help="use only this many queries (quick runs)")
    evaluate.add_argument("--report", type=Path, default=Path("state/evaluation"))
    evaluate.add_argument("--redis-url", help="default: a private redis-server started for the run")
    evaluate.add_argument("--json", action="store_true", help="end with the one-line JSON summary")
    evaluate.set_defaults(run=_run_evaluate)

    validate = commands.add_parser(
        "validate-model",
        help="measure an exported model on held-out data and write the figures into its card",
        description="Runs the model through onnxruntime on MedNIST held-out blocks, copy detection, "
        "PneumoniaMNIST (val and our held-back test), a real CT series (slice neighbours, window invariance) and, "
        "with --anatomy, OrganAMNIST test, the cross-patient level of two chest CTs and plane/region across "
        "patients; prints the figures as JSON and stores them in the card.",
    )
    validate.add_argument("--model", type=Path, default=None, help="ONNX file (default: CBIR_MODEL, the shipped model)")
    validate.add_argument("--mednist", type=Path, default=shared / "mednist" / "mednist_dev.tar.gz")
    validate.add_argument("--pneumonia", type=Path, default=shared / "pneumoniamnist")
    validate.add_argument(
        "--series", type=Path,
        default=shared / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl",
    )  # fmt: skip
    validate.add_argument("--anatomy", type=Path, default=anatomy, help="as for train (skipped if absent)")
    validate.add_argument("--no-write", action="store_true", help="print the figures, leave the card as it is")
    validate.set_defaults(run=_run_validate)
    return parser


def _run_preview(args: argparse.Namespace) -> int:
    from .dicom import decode_instance
    from .preview import PreviewEntry, describe, render_sheet

    settings = load_settings(frames_per_instance=args.frames)
    entries = []
    failed = False
    for path in _walk(args.files):
        try:
            outcome = decode_instance(path, max_frames=settings.frames_per_instance, **settings.decode_limits())
        except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so and go on
            print(f"{path}: error: {type(exc).__name__}: {exc}")
            failed = True
            continue
        print(f"{path}: {describe(outcome)}")
        entries.append(PreviewEntry(label=str(path), outcome=outcome))
    if entries:
        render_sheet(entries, args.out, columns=args.columns)
        print(f"wrote {args.out} ({len(entries)} tiles)", file=sys.stderr)
    return 1 if failed or not entries else 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(state_dir=args.state, data_dir=args.data)


def _run_viewer(args: argparse.Namespace) -> int:
    from .viewer import DEFAULT_CACHE_DIR, OhifError, ensure_extension, ensure_ohif, serve

    cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
    try:
        dist = args.dist or ensure_ohif(cache_dir)
        extension = None if args.no_extension else (args.extension or ensure_extension(cache_dir))
    except OhifError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.fetch_only:
        print(f"OHIF viewer in {dist}" + (f", its orthanc-cbir extension in {extension}" if extension else ""))
        return 0
    if not (dist / "index.html").is_file():
        print(f"error: {dist} has no index.html: not an OHIF dist folder", file=sys.stderr)
        return 2
    if extension is not None and not (extension / "extension.js").is_file():
        print(f"error: {extension} has no extension.js: run `make ohif`", file=sys.stderr)
        return 2
    settings = load_settings(orthanc_url=args.orthanc_url, viewer_allowed_hosts=args.allowed_hosts)
    allowed = [name.strip() for name in settings.viewer_allowed_hosts.split(",") if name.strip()]
    try:
        serve(dist, settings.orthanc_url, host=args.host, port=args.port, username=settings.orthanc_username,
              password=settings.orthanc_password, demo=args.demo, allowed_hosts=allowed or None,
              extension=extension)  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _vote_report(redis_url: str | None) -> int:
    import json

    from .audit import AuditLog
    from .evaluation.votes import vote_precision
    from .redis_client import UNREACHABLE

    try:
        report = vote_precision(AuditLog(_redis(redis_url), load_settings().audit_retention_days).votes())
    except UNREACHABLE as exc:
        print(f"error: Redis is unreachable ({type(exc).__name__}): the votes cannot be read", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def _redis(url: str | None, cluster: bool | None = None, password: str | None = None) -> RedisClient:
    """A client of ``url`` (default: the settings'); a cluster client when ``cluster`` or the
    settings say so; ``password`` (default: the settings' ``redis_password``) when the URL has none."""
    from .redis_client import connect

    settings = load_settings()
    return connect(url or settings.redis_url, cluster=settings.redis_cluster if cluster is None else cluster,
                   password=settings.redis_password if password is None else password)  # fmt: skip


def _store(client: RedisClient, info: IndexInfo) -> IndexStore:
    """The index of ``info``'s model version, with the settings' shard count."""
    from .index import IndexStore

    return IndexStore(client, info, shards=load_settings().index_shards)


def _embedder() -> Embedder:
    from .model.embedder import Embedder

    return Embedder.from_settings(load_settings())


def _run_index(args: argparse.Namespace) -> int:
    from collections import Counter

    from tqdm import tqdm

    from .dicom import Rejection
    from .index import IndexInfo
    from .index.records import decode_file
    from .ingest.pipeline import EmbeddingBatch, admit

    settings = load_settings(frames_per_instance=args.frames)
    embedder = _embedder()
    store = _store(_redis(args.redis_url), IndexInfo.from_card(embedder.card))
    counts: Counter = Counter()
    rejected: Counter = Counter()
    batch: EmbeddingBatch[Path] = EmbeddingBatch(embedder, max_instances=args.batch, regions=settings.regions)

    def flush() -> None:
        if len(batch):
            result = store.add([record for _, record in batch.embed()])
            counts["indexed"] += result.added
            counts["duplicate"] += result.duplicates

    files = list(_walk(args.paths))
    for path in tqdm(files, desc="index", unit="file", dynamic_ncols=True):
        outcome = admit(decode_file(path, max_frames=settings.frames_per_instance, **settings.decode_limits()))
        if isinstance(outcome, Rejection):
            rejected[outcome.reason.value] += 1
            continue
        batch.add(path, outcome)
        if batch.full:
            flush()
    flush()
    print(f"indexed {counts['indexed']}, skipped as duplicate {counts['duplicate']}, rejected {sum(rejected.values())}"
          f" ({store.info.version}; the index now holds {store.count()})")  # fmt: skip
    for reason, count in rejected.most_common():
        print(f"  rejected: {reason}: {count}")
    return 0


def _run_query(args: argparse.Namespace) -> int:
    import json

    from .answers.hits import hit_json
    from .dicom import Rejection
    from .errors import NotIndexed
    from .index import IndexInfo
    from .index.records import decode_file, embed_instances
    from .search import Filters, Query, QueryContext, SearchOptions
    from .search.filters import parse_weights
    from .search.service import Page, SimilaritySearch

    try:
        filters = Filters.parse(args.filter)
        weights = parse_weights(args.weights)
        options = SearchOptions(args.strategy, k=args.k, filters=filters, level=args.level, weights=weights)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    embedder = _embedder()
    store = _store(_redis(args.redis_url), IndexInfo.from_card(embedder.card))
    core = SimilaritySearch(store)
    if args.uid:
        try:
            answer = core.similar_to_stored("instance", args.uid, Page(options))
        except NotIndexed:
            print(f"error: {args.uid} is not in the index {store.info.version}", file=sys.stderr)
            return 1
    else:
        outcome = decode_file(args.file, **load_settings().decode_limits())
        if isinstance(outcome, Rejection):
            print(f"error: {args.file}: rejected: {outcome}", file=sys.stderr)
            return 1
        record = embed_instances(embedder, [outcome])[0]
        meta = record.metadata
        query = Query(record.features, record.code, record.probabilities,
                      QueryContext(meta.patient_key, meta.study_instance_uid, meta.sop_instance_uid,
                                   meta.series_instance_uid, meta.modality, meta.body_part_examined))  # fmt: skip
        answer = core.similar_to(query, Page(options))
    result = answer.result
    if args.json:
        print(json.dumps({"strategy": result.strategy, "level": result.level, "index_size": result.index_size,
                          "candidate_fraction": round(result.candidate_fraction, 6),
                          "elapsed_ms": round(result.elapsed_ms, 2),
                          "hits": [hit_json(h, result.strategy) for h in result.hits]}, indent=2))  # fmt: skip
        return 0
    print(f"{result.strategy} over {result.index_size} instances: {len(result.hits)} hits "
          f"in {result.elapsed_ms:.1f} ms ({result.candidates} candidates)")  # fmt: skip
    for hit in result.hits:
        fields = hit_json(hit, result.strategy)
        print(f"{hit.rank:3d}  {hit.distance:8.4f}  {fields['Modality'] or '-':3s}  "
              f"{fields['BodyPartExamined'] or '-':10s}  {fields['SOPInstanceUID']}  "
              f"{fields['SeriesDescription'] or ''}")  # fmt: skip
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .answers.similar_series import SimilarSeriesMaker
    from .ingest.worker import Worker

    settings = load_settings(redis_url=args.redis_url, orthanc_url=args.orthanc_url)
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    client = _redis(settings.redis_url)
    worker = Worker.from_settings(settings, client, SimilarSeriesMaker.factory(settings, client))
    worker.run(stop)
    print(f"worker stopped: {dict(worker.totals)}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .standalone import serve

    settings = load_settings(redis_url=args.redis_url, spool_dir=args.spool, scp_port=args.dicom_port,
                             http_port=args.http_port, scp_processes=args.scp_processes)  # fmt: skip
    return serve(settings, workers=args.workers)


def _run_reconcile(args: argparse.Namespace) -> int:
    from .index import IndexInfo, IndexStore
    from .ingest.orthanc_client import OrthancClient
    from .ingest.queue import IngestQueue
    from .ingest.reconcile import reconcile

    settings = load_settings(redis_url=args.redis_url, orthanc_url=args.orthanc_url)
    client = _redis(settings.redis_url)
    store = IndexStore(client, IndexInfo.for_model(settings.model), shards=settings.index_shards)
    orthanc = OrthancClient(settings.orthanc_url, settings.orthanc_username, settings.orthanc_password)
    summary = reconcile(orthanc, IngestQueue.for_settings(client, settings), store)
    print(f"{summary.in_orthanc} instances in Orthanc: {summary.already_indexed} indexed, {summary.rejected} rejected, "
          f"{summary.enqueued} sent to the workers; {summary.gone} gone from Orthanc, removal sent")  # fmt: skip
    return 0


def _run_indexes(args: argparse.Namespace) -> int:
    from .index import IndexInfo
    from .index.graph_file import GraphFiles
    from .index.versions import IndexStillNeeded, drop_version, index_versions

    settings = load_settings(redis_url=args.redis_url)
    client = _redis(settings.redis_url)
    current = IndexInfo.for_model(settings.model).version
    if args.drop:
        try:
            deleted = drop_version(client, args.drop, current)
        except IndexStillNeeded as exc:
            print(f"not dropped: {exc}", file=sys.stderr)
            return 1
        print(f"dropped {args.drop}: {deleted} keys")
        if settings.graph_path is not None and GraphFiles(settings.graph_path, args.drop).remove():
            print(f"and its graph in {settings.graph_path}")
        return 0
    versions = index_versions(client)
    for version in versions:
        mark = "  (current model)" if version.version == current else ""
        print(f"{version.version}: {version.indexed} instances, {version.shards} shard(s){mark}")
    if current not in {v.version for v in versions}:
        print(f"{current}: nothing indexed yet (current model): run orthanc-cbir reconcile")
    return 0


def _run_backfill(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    import redis
    from dicomweb_client.api import DICOMwebClient

    from .index import IndexInfo, IndexStore
    from .ingest.backfill import BackfillError, backfill, dicomweb_session, study_date_range
    from .ingest.queue import IngestQueue

    settings = load_settings(redis_url=args.redis_url)
    token = args.token or os.environ.get("CBIR_DICOMWEB_TOKEN")
    password = args.password or os.environ.get("CBIR_DICOMWEB_PASSWORD")
    modalities = [m for m in (args.modality or "").split(",") if m.strip()] or None
    try:
        study_date_range(args.since)
        session = dicomweb_session(args.username, password, token, deadline_s=settings.dicomweb_deadline_s,
                                   max_bytes=settings.max_file_bytes)  # fmt: skip
        client = DICOMwebClient(args.dicomweb, session=session)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # one INFO line per request otherwise
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    embedder = _embedder()
    connection = _redis(settings.redis_url)
    store = IndexStore(connection, IndexInfo.from_card(embedder.card), shards=settings.index_shards)
    decode_limits: dict[str, Any] = settings.decode_limits()  # max_file_bytes, max_pixels_per_frame
    try:
        summary = backfill(client, store, IngestQueue(connection), embedder, since=args.since, modalities=modalities,
                           batch_size=args.batch, frames_per_instance=settings.frames_per_instance,
                           restart=args.restart, stop=stop, **decode_limits)  # fmt: skip
    except BackfillError as exc:
        if exc.summary is not None and exc.summary.studies:  # what it did before it stopped
            print(exc.summary.line())
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: Redis at {settings.redis_url.split('@')[-1]}: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    if summary.interrupted:
        return 130
    if summary.failed:
        print(f"error: {summary.failed} instances could not be retrieved; run again to retry them", file=sys.stderr)
        return 1
    return 0


def _run_recluster(args: argparse.Namespace) -> int:
    from .index import IndexInfo
    from .search.clustering import recluster

    store = _store(_redis(args.redis_url), IndexInfo.for_model(load_settings().model))
    summary = recluster(store, args.neighbours, args.resolution)
    print(f"{summary.instances} instances in {summary.clusters} clusters (largest {summary.largest}, modularity "
          f"{summary.modularity}) in {summary.seconds} s")  # fmt: skip
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    import tempfile

    import numpy as np

    from .evaluation.retrieval import Labelled, evaluate, write_report
    from .local_services import RedisServer
    from .training.data import MEDNIST_CLASSES, block_split, read_image_folder, read_mednist, read_pneumonia

    if args.votes:
        return _vote_report(args.redis_url)
    strategies = STRATEGY_NAMES if args.strategy == "all" else (args.strategy,)
    if any(s not in STRATEGY_NAMES for s in strategies):
        print(f"error: unknown strategy {args.strategy!r}; choose one of {', '.join(STRATEGY_NAMES)} or all",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.mednist:
        mednist = read_mednist(args.mednist, Path("state/cache"))
        train_index, validation_index = block_split(mednist)
        classes = sorted(MEDNIST_CLASSES)
        gallery = Labelled(mednist.subset(train_index), classes)
        queries = Labelled(mednist.subset(validation_index), classes)
        copies = 1000 if args.copies is None else args.copies
    elif args.gallery and args.queries:
        gallery_set, classes = read_image_folder(args.gallery)
        query_set, _ = read_image_folder(args.queries, classes)
        gallery, queries = Labelled(gallery_set, classes), Labelled(query_set, classes)
        copies = args.copies or 0
    else:
        print("error: give --gallery and --queries, or --mednist", file=sys.stderr)
        return 2
    if args.limit:
        keep = np.random.default_rng(0).permutation(len(queries.images))[: args.limit]
        queries = Labelled(queries.images.subset(np.sort(keep)), queries.classes)
    embedder = _embedder()
    command = "orthanc-cbir " + " ".join(args.argv)
    with tempfile.TemporaryDirectory(prefix="cbir-evaluate-") as scratch:
        server = None if args.redis_url else RedisServer(Path(scratch)).start()
        try:
            # the evaluation's own Redis has no password, whatever the settings give the real one
            client = _redis(args.redis_url) if server is None else _redis(server.url, cluster=False, password="")
            summary, reports = evaluate(client, embedder, gallery, queries, strategies, k=args.k, copies=copies)
            write_report(args.report, summary, reports, gallery, queries, command)
            if args.pneumonia:
                pathology_gallery = Labelled(read_pneumonia(args.pneumonia, "train"), ["normal", "pneumonia"])
                pathology_queries = Labelled(read_pneumonia(args.pneumonia, "val"), ["normal", "pneumonia"])
                pathology, pathology_reports = evaluate(client, embedder, pathology_gallery, pathology_queries,
                                                        strategies, k=args.k)  # fmt: skip
                summary["pathology"] = pathology
                write_report(args.report / "pathology", pathology, pathology_reports, pathology_gallery,
                             pathology_queries, command)  # fmt: skip
                (args.report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        finally:
            if server is not None:
                server.stop()
    print((args.report / "report.md").read_text())
    if args.json:
        print(json.dumps(summary))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    organs = args.anatomy / "organamnist" / "organamnist.npz"
    series = args.mednist.parents[1] / "dicom" / "series"
    config = TrainConfig(
        mednist=str(args.mednist), pneumonia=str(args.pneumonia) if args.pneumonia.exists() else None,
        organamnist=str(organs) if organs.exists() else None,
        anatomy_root=str(args.anatomy) if (args.anatomy / "lidc0314").exists() and series.exists() else None,
        shared_series=str(series) if series.exists() else None,
        epochs=TrainConfig.epochs if args.epochs is None else args.epochs, seed=args.seed, threads=args.threads,
        limit=args.limit,
    )  # fmt: skip
    summary = train(config, args.out)
    print(f"trained in {summary['seconds']:.0f} s: {args.out / 'checkpoint.pt'}")
    return 0


def _run_refit(args: argparse.Namespace) -> int:
    from .training.train import refit

    refit(args.checkpoint, args.out, None if args.level_periods is None else tuple(args.level_periods))
    print(f"refitted: {args.out / 'checkpoint.pt'}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .training.export import export

    card = export(args.checkpoint, args.out)
    print(f"wrote {args.out} and {card}")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    import json

    from .evaluation.model_report import ValidationData, validate_model
    from .model.embedder import Embedder, card_path

    settings = load_settings()
    model = args.model or Path(settings.model)
    embedder = Embedder(model, threads=settings.embed_threads, batch_size=256)
    data = ValidationData(
        mednist=args.mednist,
        pneumonia=args.pneumonia if args.pneumonia.exists() else None,
        series=args.series if args.series.exists() else None,
        cache_dir=Path("state/cache"),
        **_anatomy_validation(args.anatomy, args.mednist.parents[1] / "dicom" / "series", args.series),
    )
    figures = validate_model(embedder, data)
    figures["command"] = "orthanc-cbir validate-model" + (f" --model {args.model}" if args.model else "")
    print(json.dumps(figures, indent=2))
    if not args.no_write:
        path = card_path(model)
        card = json.loads(path.read_text())
        card["validation"] = figures
        path.write_text(json.dumps(card, indent=2) + "\n")
    return 0


def _anatomy_validation(root: Path, shared_series: Path, chest_series: Path) -> dict:
    """ValidationData's real-anatomy sources, where they are present."""
    from .training.anatomy import anatomy_volumes

    found: dict = {}
    if (root / "organamnist" / "organamnist.npz").exists():
        found["organamnist"] = root / "organamnist" / "organamnist.npz"
    volumes = [v for v in anatomy_volumes(root, shared_series) if v.path.exists()]
    if (root / "lidc0314").exists() and chest_series.exists():
        found["level_pair"] = (chest_series, root / "lidc0314")
        found["volumes"] = volumes
    return found


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


if __name__ == "__main__":
    sys.exit(main())
