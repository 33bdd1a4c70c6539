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

from .config import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    settings = load_settings(frames_per_instance=getattr(args, "frames", None))
    configure_logging(settings.log_level)
    return args.run(args)


def configure_logging(level: str) -> None:
    """Log to stderr. pydicom's own messages can quote element values (names included)
    and log every refused decoder plugin with a trace: outcomes say what matters, so
    they stay silent."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


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
        "--data", type=Path, default=None, help="DICOM folder to push (default: ../shared/data/dicom, else pydicom's files)"
    )
    demo.set_defaults(run=_run_demo)

    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    train = commands.add_parser(
        "train",
        help="train the retrieval model (needs the 'train' extra: torch)",
        description="Train on MedNIST (file-number block split) and PneumoniaMNIST with a fixed seed; "
        "writes checkpoint.pt and training.json to --out. About 25 minutes on 2 CPU cores.",
    )
    train.add_argument("--mednist", type=Path, default=shared / "mednist" / "mednist_dev.tar.gz")
    train.add_argument("--pneumonia", type=Path, default=shared / "pneumoniamnist")
    train.add_argument("--out", type=Path, default=Path("state/training"))
    train.add_argument("--epochs", type=int, default=4)
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
    refit.set_defaults(run=_run_refit)

    export = commands.add_parser(
        "export",
        help="export a training checkpoint to one ONNX file and its model card",
        description="Writes MODEL.onnx and MODEL.json (the card). Run validate-model next to add the figures.",
    )
    export.add_argument("--checkpoint", type=Path, default=Path("state/training/checkpoint.pt"))
    export.add_argument("--out", type=Path, default=Path("onnx_models/cbir-resnet-64.onnx"))
    export.set_defaults(run=_run_export)

    validate = commands.add_parser(
        "validate-model",
        help="measure an exported model on held-out data and write the figures into its card",
        description="Runs the model through onnxruntime on MedNIST held-out blocks, copy detection, "
        "PneumoniaMNIST val and a real CT series; prints the figures as JSON and stores them in the card.",
    )
    validate.add_argument("--model", type=Path, default=None, help="ONNX file (default: CBIR_MODEL, the shipped model)")
    validate.add_argument("--mednist", type=Path, default=shared / "mednist" / "mednist_dev.tar.gz")
    validate.add_argument("--pneumonia", type=Path, default=shared / "pneumoniamnist")
    validate.add_argument(
        "--series", type=Path,
        default=shared / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl",
    )  # fmt: skip
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
            outcome = decode_instance(path, max_frames=settings.frames_per_instance)
        except Exception as exc:  # a bug, not bad input: say so and go on
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


def _run_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    config = TrainConfig(
        mednist=str(args.mednist), pneumonia=str(args.pneumonia) if args.pneumonia.exists() else None,
        epochs=args.epochs, seed=args.seed, threads=args.threads, limit=args.limit,
    )  # fmt: skip
    summary = train(config, args.out)
    print(f"trained in {summary['seconds']:.0f} s: {args.out / 'checkpoint.pt'}")
    return 0


def _run_refit(args: argparse.Namespace) -> int:
    from .training.train import refit

    refit(args.checkpoint, args.out)
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


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


if __name__ == "__main__":
    sys.exit(main())
