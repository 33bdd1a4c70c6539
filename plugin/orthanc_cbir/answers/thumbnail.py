"""``GET /cbir/instances/{id}/thumbnail``: a hit's picture drawn by this project's pixel step.

Orthanc 1.10's ``/instances/{id}/preview`` cannot decode JPEG 2000 (and some other syntaxes the
pixel step reads), so such hits had broken thumbnails on the results page. This handler takes the
stored file from Orthanc, decodes its first chosen frame with
:func:`orthanc_cbir.dicom.decode_instance` (the display picture: the file's VOI, as "Similar
cases" draws it) and answers a PNG at most :data:`THUMBNAIL_SIZE` pixels on its longer side.

Memory is bounded: a file larger than :func:`max_file_bytes` is refused from the size Orthanc
reports, before it is fetched (413), and a frame over ``max_pixels_per_frame`` is refused by the
decoder before its pixels are allocated.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
from PIL import Image

from ..config import Settings
from ..dicom import DecodedInstance, decode_instance
from ..errors import BadParameters, NotFound, TooLarge, Undrawable

THUMBNAIL_SIZE = 256
"""Longer side of a thumbnail, in pixels (a smaller picture is not enlarged)."""

ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
"""An Orthanc instance id: five groups of eight hex digits."""


def max_file_bytes(settings: Settings) -> int:
    """The largest file a thumbnail is drawn from: a query upload's cap (``MaxQueryBytes``), or
    ``MaxFileBytes`` if lower. Thumbnails are drawn in the server's process, so this is the
    memory one request may take (the file, plus one frame within ``MaxPixelsPerFrame``)."""
    return min(settings.max_file_bytes, settings.max_query_bytes)


def thumbnail(identifier: str, file_size: Callable[[str], int | None], read: Callable[[str], bytes | None],
              settings: Settings, size: int = THUMBNAIL_SIZE) -> bytes:  # fmt: skip
    """The thumbnail (a PNG) of the Orthanc instance ``identifier``.

    ``file_size(id)`` is the stored file's size as Orthanc reports it (``None``: no such
    instance); ``read(id)`` the file (``None``: gone). Messages are fixed text.

    Raises:
        BadParameters: ``identifier`` is not an Orthanc id.
        NotFound: Orthanc has no such instance.
        TooLarge: the file is over :func:`max_file_bytes`.
        Undrawable: the pixel step cannot draw the file.
    """
    if not ORTHANC_ID.fullmatch(identifier):
        raise BadParameters("a thumbnail is asked by Orthanc instance id (the hit's orthanc.instance)")
    declared = file_size(identifier)
    if declared is None:
        raise NotFound("Orthanc has no such instance")
    limit = max_file_bytes(settings)
    if declared > limit:
        raise TooLarge(f"the file is larger than the {limit} bytes a thumbnail is drawn from")
    data = read(identifier)
    if data is None:
        raise NotFound("Orthanc has no such instance")
    decoded = decode_instance(data, max_frames=1, max_file_bytes=limit,
                              max_pixels_per_frame=settings.max_pixels_per_frame)  # fmt: skip
    del data
    if not isinstance(decoded, DecodedInstance):
        raise Undrawable(f"the image cannot be drawn ({decoded.reason.value})")
    return png(decoded.images[0].pixels, size)


def png(pixels: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """``pixels`` (float 0..1, 1 = brightest) as an 8-bit grey PNG, its longer side at most ``size``."""
    picture = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    scale = min(1.0, size / max(picture.size))
    if scale < 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.LANCZOS)  # fmt: skip
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
