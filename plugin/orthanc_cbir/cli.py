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


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


if __name__ == "__main__":
    sys.exit(main())
