"""A contact sheet of decoded DICOM files, for a person to check the pixel step.

Each file becomes one tile: its normalised image (or a grey tile saying why it was
rejected) with the file name, the frame and the decisions underneath.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .dicom import DecodedInstance, Rejection

TILE = 256
_CAPTION_LINES = 9
_LINE_HEIGHT = 12
_CAPTION_CHARS = 42


@dataclass(frozen=True)
class PreviewEntry:
    """One file of the sheet and what decoding it gave."""

    label: str
    outcome: DecodedInstance | Rejection


def describe(outcome: DecodedInstance | Rejection) -> str:
    """The one-line summary the ``preview`` command prints after ``FILE:``."""
    if isinstance(outcome, Rejection):
        return f"rejected: {outcome}"
    image = outcome.images[0]
    rows, columns = image.pixels.shape
    meta = outcome.metadata
    what = " ".join(filter(None, [meta.modality, meta.body_part_examined])) or "unknown modality"
    return (
        f"image {rows}x{columns} {what}, frame {image.frame_index + 1}/{outcome.number_of_frames}; "
        + "; ".join(image.decisions)
    )


def render_sheet(entries: Sequence[PreviewEntry], out: Path, columns: int = 4) -> Path:
    """Write a PNG contact sheet of ``entries`` to ``out`` and return its path."""
    columns = max(1, min(columns, len(entries) or 1))
    rows = max(1, -(-len(entries) // columns))
    cell_height = TILE + _CAPTION_LINES * _LINE_HEIGHT + 8
    sheet = Image.new("L", (columns * TILE, rows * cell_height), color=255)
    font = ImageFont.load_default()
    for i, entry in enumerate(entries):
        x, y = (i % columns) * TILE, (i // columns) * cell_height
        sheet.paste(_tile(entry.outcome), (x, y))
        draw = ImageDraw.Draw(sheet)
        for n, line in enumerate(_caption(entry)[:_CAPTION_LINES]):
            draw.text((x + 4, y + TILE + 2 + n * _LINE_HEIGHT), line, fill=0, font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _tile(outcome: DecodedInstance | Rejection) -> Image.Image:
    if isinstance(outcome, Rejection):
        tile = Image.new("L", (TILE, TILE), color=200)
        draw = ImageDraw.Draw(tile)
        for n, line in enumerate(textwrap.wrap(f"REJECTED: {outcome}", 36)[:14]):
            draw.text((8, 8 + n * 14), line, fill=0, font=ImageFont.load_default())
        return tile
    pixels = outcome.images[0].pixels
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    scale = TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    tile = Image.new("L", (TILE, TILE), color=0)
    tile.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    return tile


def _caption(entry: PreviewEntry) -> list[str]:
    lines = [entry.label[-_CAPTION_CHARS:]]
    if isinstance(entry.outcome, Rejection):
        return lines + textwrap.wrap(f"rejected: {entry.outcome.reason.value}", _CAPTION_CHARS)
    image = entry.outcome.images[0]
    meta = entry.outcome.metadata
    lines.append(
        f"{meta.modality or '?'} {image.pixels.shape[0]}x{image.pixels.shape[1]} "
        f"frame {image.frame_index + 1}/{entry.outcome.number_of_frames}"
    )
    for decision in image.decisions:
        lines.extend(textwrap.wrap(decision, _CAPTION_CHARS, subsequent_indent="  "))
    return lines
