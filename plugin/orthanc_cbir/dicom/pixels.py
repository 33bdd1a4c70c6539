"""Decode a DICOM instance into normalised grey images, or say why it cannot be one.

A caller hands over a file path or the bytes of a DICOM file and gets back either a
:class:`DecodedInstance` (its :class:`InstanceMetadata` and one
:class:`NormalisedImage` per selected frame: float32, one channel, values in 0..1,
with the decisions that produced it) or a :class:`Rejection` with a
:class:`RejectionReason` and a sentence that says what was wrong. Nothing raises on
bad input, and nothing the size of a frame is allocated before the header has been
checked against the limits (``max_file_bytes``, ``max_pixels_per_frame``) and the
pixel data's length (tests/unit/test_bad_input.py fuzzes this). Nor is anything inflated or
decompressed past what the headers declare: a Deflated dataset is inflated in bounded chunks
(:func:`read_dataset`), and a compressed frame's own SOF/SIZ header must agree with Rows and
Columns and be no decompression bomb (tests/unit/test_memory_bounds.py measures the peak RSS).

The grey value pipeline follows PS3.3 C.11 in the order a viewer applies it:
decode (pydicom with pylibjpeg; GDCM only where nothing else can; DCMTK when those refuse) -> colour to grey
(palette and YBR through RGB to BT.601 luma) -> Modality LUT (rescale or LUT
sequence, per-frame values for enhanced objects) -> VOI (LUT sequence, else the
first window, else a modality default) -> MONOCHROME1 inversion.

Each frame yields two pictures. ``pixels`` is what a viewer shows: the file's own VOI,
for previews, thumbnails and the "Similar cases" images. ``model_pixels`` is what the
model embeds, and it never depends on the file's display window, which archives set
per site and per reader (the same chest saved with a lung and a soft-tissue window
must reach the model as one picture): CT goes from Hounsfield units through one fixed
mapping (:data:`CT_MODEL_MAPPING`), every other grey image through a robust per-image
range (the 0.5-99.5 percentiles of its modality-LUT values). Colour has no VOI: both
pictures are its luma.

>>> from orthanc_cbir.dicom import decode_instance
>>> result = decode_instance("CT_small.dcm")          # doctest: +SKIP
>>> result.images[0].pixels.shape, result.images[0].decisions[:2]   # doctest: +SKIP
((128, 128), ('decoder: pydicom (Explicit VR Little Endian)', 'modality LUT: ...'))
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import io
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame, parse_basic_offsets, parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filereader import read_dataset as _read_elements
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
)
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from ..errors import InflationRefused
from .metadata import InstanceMetadata, extract_metadata

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
"""A DICOM file: a path, its bytes, or a binary file object."""


class RejectionReason(str, enum.Enum):  # noqa: UP042 - StrEnum would change str() of a member, which logs print
    """Why an instance cannot become an index entry. The value is what users read."""

    NOT_DICOM = "not DICOM"
    NOT_AN_IMAGE = "not an image"
    UNSUPPORTED_IMAGE = "unsupported image"
    NO_DECODER = "no decoder"
    CORRUPT_PIXEL_DATA = "corrupt pixel data"
    TRUNCATED = "truncated"
    TOO_LARGE = "too large"
    OWN_OUTPUT = "orthanc-cbir output"
    """A "Similar cases" image this service made (:func:`~.similar_cases.reject_own_output`)."""
    NO_UID = "no SOPInstanceUID"
    """No valid SOPInstanceUID: the index is keyed by it."""


DEFAULT_MAX_FILE_BYTES = 2 * 2**30
"""Largest file :func:`decode_instance` parses (``Settings.max_file_bytes``)."""
DEFAULT_MAX_PIXELS_PER_FRAME = 64 * 2**20
"""Largest frame (rows x columns x samples) it decodes (``Settings.max_pixels_per_frame``): the grey
pipeline holds a few float64 copies of a frame, about 2 GiB at this size."""
HEADER_INFLATE_CAP = 16 * 2**20
"""Most the elements before the pixel data of a Deflated file may inflate to (16 MiB)."""
INFLATE_SLACK = 2**20
"""What a Deflated dataset may inflate to past the end of the pixel data its header declares
(elements after the pixel data, padding)."""
CODESTREAM_FREE_PIXELS = 4 * 2**20
"""A compressed frame (a codestream, or a Deflated file's frame) may declare this many pixels (2048 x 2048)
whatever its size in bytes;
beyond it at least one byte per :data:`CODESTREAM_PIXELS_PER_BYTE` pixels."""
CODESTREAM_PIXELS_PER_BYTE = 1000
"""The most pixels per byte of codestream believed beyond :data:`CODESTREAM_FREE_PIXELS`: lossless
medical images compress 2-4:1 and lossy ones rarely past 50:1, so a 2 KB file that declares
8192 x 8192 is a decompression bomb, refused before a decoder allocates it (its frame costs the
grey pipeline about 45 bytes a pixel)."""

DEFLATE_PIXELS_PER_BYTE = 100
"""The same for a Deflated file's native pixels: deflate gives medical images 2-5:1 and at most
about 1000:1 (a zlib bomb), so a Deflated file whose frame of more than 2048 x 2048 pixels would
have 100 pixels a byte is refused as soon as its header has inflated."""


@dataclass(frozen=True)
class Rejection:
    """An instance that will not be indexed, and why."""

    reason: RejectionReason
    detail: str
    metadata: InstanceMetadata | None = None
    """What could be read of the instance (``None`` when it is not DICOM at all)."""

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


@dataclass(frozen=True)
class TablePicture:
    """A picture not made yet: a frame's stored values looked up in a table of one value per stored
    value (:class:`_GreyFrame`). Indexing reads only the model's picture, so the displayed one is
    made where it is shown (a thumbnail, a preview), not for each instance a worker indexes (a
    lookup over every pixel: 0.19 ms of a 512 x 512 CT slice). It holds the stored values (2 bytes
    a pixel for a CT slice), less than the float32 picture it stands for."""

    table: np.ndarray
    """float32 (high - low + 1,): the picture's value of each stored value from ``low``."""
    stored: np.ndarray
    """The frame's stored values, (rows, columns)."""
    low: int

    def made(self) -> np.ndarray:
        return np.take(self.table, np.subtract(self.stored, self.low, dtype=np.intp))


@dataclass(frozen=True)
class NormalisedImage:
    """One frame, as displayed and as the model sees it before resizing."""

    display: np.ndarray | TablePicture = field(compare=False)
    """:attr:`pixels`, or what makes them when first read."""
    model_pixels: np.ndarray
    """float32, same shape, 0..1: the window-independent picture the model embeds (see the module docstring)."""
    frame_index: int
    """0-based frame number within the instance."""
    decisions: tuple[str, ...]
    """Each step taken, in order, in words (decoder, LUTs, window, inversion)."""
    hounsfield: bool = False
    """``model_pixels`` are CT Hounsfield units through :data:`CT_MODEL_MAPPING` (what the lung
    measure of :mod:`orthanc_cbir.model.lung_extent` reads)."""

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        """float32, shape (rows, columns), values in 0..1, 1 = brightest as displayed (the file's VOI)."""
        return self.display.made() if isinstance(self.display, TablePicture) else self.display


@dataclass(frozen=True)
class DecodedInstance:
    """An instance that decoded: its metadata and the frames chosen for the index."""

    metadata: InstanceMetadata
    number_of_frames: int
    images: tuple[NormalisedImage, ...]


# The DCMTK tools that decompress a transfer syntax in place of pydicom's plugins
# where those refuse (notably 12-bit JPEG Extended, which pylibjpeg and GDCM lack).
_DECODER_ENVIRONMENT = ("DCMDICTPATH", "LANG", "LC_ALL", "TMPDIR")
"""Variables a DCMTK decoder is given besides PATH (:func:`decoder_environment`)."""
_DCMTK_DECOMPRESSORS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "dcmdjpeg",
    "1.2.840.10008.1.2.4.51": "dcmdjpeg",
    "1.2.840.10008.1.2.4.57": "dcmdjpeg",
    "1.2.840.10008.1.2.4.70": "dcmdjpeg",
    "1.2.840.10008.1.2.4.80": "dcmdjpls",
    "1.2.840.10008.1.2.4.81": "dcmdjpls",
    "1.2.840.10008.1.2.5": "dcmdrle",
}

_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# CT defaults (centre, width in HU) where the file carries no VOI: lung for the
# chest, brain for the head, soft tissue elsewhere.
_CT_WINDOWS: tuple[tuple[frozenset[str], str, float, float], ...] = (
    (frozenset({"CHEST", "LUNG", "THORAX"}), "lung", -600.0, 1500.0),
    (frozenset({"HEAD", "BRAIN", "SKULL"}), "brain", 40.0, 80.0),
)
_CT_SOFT_TISSUE = ("soft tissue", 40.0, 400.0)
_AUTO_PERCENTILES = (0.5, 99.5)

CT_MODEL_MAPPING: tuple[tuple[float, float], ...] = (
    (-1000.0, 0.0), (-400.0, 0.3), (-100.0, 0.4), (200.0, 0.8), (1000.0, 1.0),
)  # fmt: skip
"""(HU, grey) knots of the one piecewise-linear mapping from Hounsfield units to the model's
input (clipped outside). It keeps what a lung window shows (parenchyma -900..-400 HU in
0.03-0.3) and what a soft-tissue window shows (fat -100 at 0.4, muscle, liver and vessels
40-60 at 0.59-0.61, contrast 200 at 0.8) in one picture, and bone above; recorded in the
model card."""


def hounsfield_to_grey(hounsfield: np.ndarray | float) -> np.ndarray:
    """CT values through :data:`CT_MODEL_MAPPING` (clipped outside its knots): the model's picture."""
    knots_hu, knots_grey = zip(*CT_MODEL_MAPPING, strict=True)
    return np.asarray(np.interp(hounsfield, knots_hu, knots_grey))


# ITU-R BT.601 luma weights, the Y of DICOM's YBR_FULL (PS3.3 C.7.6.3.1.2).
_BT601_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_dataset(
    source: Source,
    *,
    max_inflated_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME,
) -> Dataset:
    """Parse a DICOM file, with or without its preamble and file meta.

    Files written without file meta (old ACR-NEMA style) get a Transfer Syntax UID
    inferred from their encoding, so that the pixel decoders can run. A Deflated file is
    inflated here in 1 MiB chunks, never past ``max_inflated_bytes``, nor past
    :data:`HEADER_INFLATE_CAP` before its pixel data begins, nor past the end of the pixel
    data its header declares (plus :data:`INFLATE_SLACK`); a frame over
    ``max_pixels_per_frame`` stops it as soon as the header is read.

    Raises:
        pydicom.errors.InvalidDicomError: the data is not DICOM.
        InflationRefused: a Deflated dataset past those bounds.
    """
    with _opened(source) as fp:
        deflated = _read_deflated(fp, max_inflated_bytes, max_pixels_per_frame, header_only=False)
        if deflated is not None:
            return deflated
        start = fp.tell()
        try:
            ds = pydicom.dcmread(fp)
        except InvalidDicomError:
            fp.seek(start)
            ds = pydicom.dcmread(fp, force=True)
            if not _looks_like_dicom(ds):
                raise InvalidDicomError("no DICOM preamble and no recognisable DICOM elements") from None
    if not (_looks_like_dicom(ds) or "DirectoryRecordSequence" in ds
            or "MediaStorageSOPClassUID" in getattr(ds, "file_meta", {})):  # fmt: skip
        raise InvalidDicomError("a DICOM preamble followed by no recognisable DICOM elements")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _infer_transfer_syntax(ds)
    return ds


def read_header(source: Source, *, max_inflated_bytes: int = HEADER_INFLATE_CAP) -> Dataset:
    """The elements before the pixel data of a DICOM Part 10 file (pydicom's ``stop_before_pixels``,
    without ``force``), for a receiver that needs the UIDs. A Deflated file is inflated in 1 MiB
    chunks only as far as its pixel data, at most ``max_inflated_bytes``.

    Raises:
        pydicom.errors.InvalidDicomError (or what pydicom raises): the data is not DICOM.
        InflationRefused: the elements before the pixel data inflate past ``max_inflated_bytes``.
    """
    with _opened(source) as fp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deflated = _read_deflated(fp, max_inflated_bytes, DEFAULT_MAX_PIXELS_PER_FRAME, header_only=True)
            if deflated is not None:
                return deflated
            return pydicom.dcmread(fp, stop_before_pixels=True)


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            yield fp
    else:
        yield source


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_INFLATE_CHUNK = 2**20


def _read_deflated(fp: BinaryIO, max_bytes: int, max_pixels: int, *, header_only: bool) -> Dataset | None:
    """A Deflated Explicit VR Little Endian file read with a bounded inflation (see
    :func:`read_dataset`); ``None``, and ``fp`` where it was, for any other file."""
    start = fp.tell()
    try:
        preamble = read_preamble(fp, True)  # None, and fp where it was, without one
        file_meta = _read_file_meta_info(fp)
        deflated = file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - not a Part 10 file: pydicom's own reading says what it is
        deflated = False
    if not deflated:
        fp.seek(start)
        return None
    here = fp.tell()
    compressed = fp.seek(0, io.SEEK_END) - here
    fp.seek(here)
    body = _inflate(fp, max_bytes, max_pixels, header_only, compressed)
    buffer = DicomBytesIO(body)
    del body
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    stop = _at_pixel_data if header_only else None
    # pydicom's read_dataset is annotated for a BinaryIO; it reads its own DicomBytesIO as well
    dataset = _read_elements(buffer, False, True, stop_when=stop)  # type: ignore[arg-type]
    ds = FileDataset(getattr(fp, "name", None) or "", dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    """The ``stop_when`` of pydicom's read_dataset that stops before the Pixel Data element."""
    return tag == 0x7FE00010


def _inflate(fp: BinaryIO, max_bytes: int, max_pixels: int, header_only: bool, compressed: int) -> bytes:
    """The rest of ``fp`` inflated (raw deflate) in bounded chunks; see :func:`read_dataset`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    cap, what = min(max_bytes, HEADER_INFLATE_CAP), "its elements before the pixel data"
    if max_bytes <= HEADER_INFLATE_CAP:
        what = "the file size limit"
    pixel_data_at, next_look = None, 2**16
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(_INFLATE_CHUNK)
        piece = inflater.decompress(data, _INFLATE_CHUNK)
        if not piece and not data:
            raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")
        out += piece
        if pixel_data_at is None and (len(out) >= next_look or inflater.eof or len(out) > cap):
            next_look = 4 * len(out)
            found = _pixel_data_end(out, max_pixels, compressed)
            if found is not None:
                pixel_data_at, end = found
                if header_only:
                    return bytes(out[:pixel_data_at])
                if end < max_bytes:
                    cap, what = end, "the end of the pixel data its header declares"
                else:
                    cap, what = max_bytes, "the file size limit"
        if len(out) > cap:
            raise InflationRefused(f"the Deflated dataset inflates past {what} ({cap} bytes)")
    return bytes(out)


def _pixel_data_end(inflated: bytearray, max_pixels: int, compressed: int) -> tuple[int, int] | None:
    """(where the pixel data element starts, how far the dataset may inflate) once the inflated
    bytes reach the pixel data, else ``None``. Raises :class:`InflationRefused` for a frame over
    ``max_pixels``, or one of more pixels than the ``compressed`` bytes can honestly hold
    (:data:`DEFLATE_PIXELS_PER_BYTE`)."""
    buffer = DicomBytesIO(bytes(inflated))
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = _read_elements(buffer, False, True, stop_when=_at_pixel_data)  # type: ignore[arg-type]  # as above
    except Exception:  # noqa: BLE001 - cut inside an element: more is needed
        return None
    at = buffer.tell()
    if inflated[at:at + 4] != _PIXEL_DATA_TAG or len(inflated) < at + 12:
        return None
    try:
        rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        samples, bits = int(header.get("SamplesPerPixel") or 1), int(header.get("BitsAllocated") or 16)
        frames = max(int(header.get("NumberOfFrames") or 1), 1)
    except Exception:  # noqa: BLE001 - the geometry check names it once the dataset is read
        rows = columns = samples = bits = frames = 0
    if rows * columns * samples > max_pixels:
        raise InflationRefused(f"a frame of {rows} x {columns} x {samples} samples is more than the "
                               f"{max_pixels} pixels allowed")  # fmt: skip
    if rows * columns * samples > max(CODESTREAM_FREE_PIXELS, DEFLATE_PIXELS_PER_BYTE * compressed):
        raise InflationRefused(f"{compressed} deflated bytes declare a frame of {rows} x {columns} x {samples} "
                               f"samples, more than {DEFLATE_PIXELS_PER_BYTE} pixels a byte "
                               "(a decompression bomb)")  # fmt: skip
    declared = (frames * rows * columns * samples * max(bits, 1) + 7) // 8
    return at, at + 12 + declared + 1 + INFLATE_SLACK


def decode_instance(
    source: Source,
    *,
    max_frames: int = 1,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME,
) -> DecodedInstance | Rejection:
    """Decode a DICOM file into up to ``max_frames`` normalised images, or reject it:
    :func:`read_instance`, then :func:`decode_dataset`.

    A file over ``max_file_bytes`` is refused before it is read, a frame over
    ``max_pixels_per_frame`` (or whose pixel data is shorter than its attributes
    declare) before anything the size of a frame is allocated.
    """
    ds = read_instance(source, max_file_bytes=max_file_bytes, max_pixels_per_frame=max_pixels_per_frame)
    if isinstance(ds, Rejection):
        return ds
    return decode_dataset(ds, max_frames=max_frames, max_pixels_per_frame=max_pixels_per_frame)


def read_instance(
    source: Source,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME,
) -> Dataset | Rejection:
    """The parsed dataset of a DICOM file for :func:`decode_dataset`, or why it cannot be decoded
    (too large, not DICOM, truncated); never raises. A caller that needs more of the file than the
    decoded instance holds (the worker: the identifiers Orthanc's ids are made of) reads it here
    once instead of parsing the file twice."""
    size = _source_size(source)
    if size is not None and size > max_file_bytes:
        return Rejection(
            RejectionReason.TOO_LARGE, f"the file has {size} bytes, more than the {max_file_bytes} allowed"
        )
    # pydicom warns about malformed values by quoting them, names included: such
    # text must not reach a log, and the outcome already says what matters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dataset(source, max_inflated_bytes=max_file_bytes, max_pixels_per_frame=max_pixels_per_frame)
        except InflationRefused as exc:
            return Rejection(RejectionReason.TOO_LARGE, str(exc))
        except MemoryError:
            return Rejection(RejectionReason.TOO_LARGE, "the file does not fit in memory")
        except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the caller
            return Rejection(RejectionReason.NOT_DICOM, _first_line(exc))
        truncated = _truncated_element(ds)
        if truncated:
            return Rejection(RejectionReason.TRUNCATED, truncated, _metadata_or_none(ds))
    return ds


def decode_dataset(
    ds: Dataset, *, max_frames: int = 1, max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME
) -> DecodedInstance | Rejection:
    """Decode an already parsed dataset (see :func:`decode_instance`); never raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _decode_dataset(ds, max_frames, max_pixels_per_frame)
        except MemoryError:
            return Rejection(RejectionReason.TOO_LARGE, "a frame does not fit in memory", _metadata_or_none(ds))
        except Exception as exc:  # noqa: BLE001 - a malformed value met where no rule above expected it
            detail = f"malformed dataset: {type(exc).__name__}: {_first_line(exc)}"
            return Rejection(RejectionReason.CORRUPT_PIXEL_DATA, detail, _metadata_or_none(ds))


def _decode_dataset(ds: Dataset, max_frames: int, max_pixels_per_frame: int) -> DecodedInstance | Rejection:
    try:
        metadata = extract_metadata(ds)
    except Exception as exc:  # noqa: BLE001 - a malformed attribute rejects the file, never raises
        return Rejection(RejectionReason.NOT_DICOM, f"unreadable attributes: {_first_line(exc)}")

    try:  # raw elements are converted on first use: a malformed one raises here
        not_image = _not_an_image(ds)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    except Exception as exc:  # noqa: BLE001 - a malformed attribute rejects the file, never raises
        return Rejection(RejectionReason.NOT_DICOM, f"unreadable attributes: {_first_line(exc)}", metadata)
    if not_image:
        return Rejection(RejectionReason.NOT_AN_IMAGE, not_image, metadata)
    if photometric not in _GREY + _COLOUR + ("PALETTE COLOR",):
        return Rejection(
            RejectionReason.UNSUPPORTED_IMAGE,
            f"photometric interpretation {photometric or '(absent)'!r} has no grey rendering",
            metadata,
        )
    if "PixelData" not in ds:
        return Rejection(
            RejectionReason.UNSUPPORTED_IMAGE, "floating-point pixel data (e.g. a parametric map)", metadata
        )

    bad_geometry = _geometry_problem(ds, metadata.number_of_frames, max_pixels_per_frame)
    if bad_geometry:
        return Rejection(bad_geometry[0], bad_geometry[1], metadata)
    frames = select_frames(metadata.number_of_frames, max_frames)
    bad_codestream = _codestream_problem(ds, frames, metadata.number_of_frames, max_pixels_per_frame)
    if bad_codestream:
        return Rejection(bad_codestream[0], bad_codestream[1], metadata)
    pixel_source, decoder_note = ds, None
    images = []
    for index in frames:
        try:
            raw, decoded_photometric, note = _decode_frame(pixel_source, index)
        except _DecodeFailure as failure:
            if pixel_source is not ds or not _dcmtk_tool(ds):
                return Rejection(failure.reason, failure.detail, metadata)
            try:
                pixel_source, tool = _dcmtk_decompress(ds)
                decoder_note = f"decoder: DCMTK {tool} (no pydicom plugin decodes this {_syntax_name(ds)} file)"
                raw, decoded_photometric, note = _decode_frame(pixel_source, index)
            except _DecodeFailure as second:
                return Rejection(second.reason, f"{failure.detail}; DCMTK: {second.detail}", metadata)
        decisions = [decoder_note or note]
        try:
            pixels, model_pixels, hounsfield = _to_grey(pixel_source, raw, index, decoded_photometric, metadata,
                                                        decisions)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a LUT or window that contradicts the pixel data
            return Rejection(RejectionReason.CORRUPT_PIXEL_DATA, f"frame {index}: {_first_line(exc)}", metadata)
        images.append(NormalisedImage(display=pixels, model_pixels=model_pixels, frame_index=index,
                                      decisions=tuple(decisions), hounsfield=hounsfield))  # fmt: skip
    return DecodedInstance(metadata=metadata, number_of_frames=metadata.number_of_frames, images=tuple(images))


def select_frames(number_of_frames: int, max_frames: int) -> list[int]:
    """Which frames of a multi-frame instance become index entries.

    All frames when there are at most ``max_frames``; otherwise ``max_frames`` frames
    spread evenly, each at the centre of its share (so ``max_frames=1`` takes the
    middle frame: the representative one of a cine loop or an enhanced volume).
    """
    if max_frames < 1:
        raise ValueError("max_frames must be at least 1")
    if number_of_frames <= max_frames:
        return list(range(number_of_frames))
    return [int((k + 0.5) * number_of_frames / max_frames) for k in range(max_frames)]


def _source_size(source: Source) -> int | None:
    """The size in bytes of a file, bytes or seekable file object; ``None`` when it cannot be told."""
    try:
        if isinstance(source, (bytes, bytearray)):
            return len(source)
        if isinstance(source, memoryview):
            return source.nbytes
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source)
        if source.seekable():
            here = source.tell()
            end = source.seek(0, io.SEEK_END)
            source.seek(here)
            return end - here
    except (OSError, ValueError, AttributeError):
        return None  # read_dataset says what is wrong with it
    return None


def _truncated_element(ds: Dataset) -> str | None:
    """Which top-level element ends before the length it declares (a cut file), or ``None``."""
    for tag in list(ds.keys()):
        raw = ds._dict.get(tag)  # the element as read, not converted
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
            return f"the file ends inside element {tag}: {len(value)} of its {length} bytes are there"
    return None


def _metadata_or_none(ds: Dataset) -> InstanceMetadata | None:
    try:
        return extract_metadata(ds)
    except Exception:  # noqa: BLE001 - what could be read of a broken file: nothing, here
        return None


_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                    DeflatedExplicitVRLittleEndian)  # deflated: native once read  # fmt: skip


def _geometry_problem(ds: Dataset, frames: int, max_pixels: int) -> tuple[RejectionReason, str] | None:
    """Why the pixel attributes cannot describe the pixel data, checked before any decoder
    allocates a frame: an absurd size, impossible bits, or less data than declared."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 0)
    except Exception as exc:  # noqa: BLE001 - a value that is no number, or an element pydicom cannot convert
        return RejectionReason.CORRUPT_PIXEL_DATA, f"unreadable image size: {_first_line(exc)}"
    if rows < 1 or columns < 1:
        return RejectionReason.CORRUPT_PIXEL_DATA, f"image size {rows} x {columns}"
    if samples not in (1, 3):
        return RejectionReason.CORRUPT_PIXEL_DATA, f"{samples} samples per pixel (1 or 3 expected)"
    if bits != 1 and (bits < 8 or bits > 64 or bits % 8):
        return RejectionReason.CORRUPT_PIXEL_DATA, f"bits allocated {bits} (1 or a multiple of 8 up to 64 expected)"
    pixels = rows * columns * samples
    if pixels > max_pixels:
        return RejectionReason.TOO_LARGE, (f"a frame of {rows} x {columns} x {samples} samples is more than the "
                                           f"{max_pixels} pixels allowed")  # fmt: skip
    data = ds["PixelData"].value
    length = len(data) if isinstance(data, (bytes, bytearray)) else 0
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax in _NATIVE_SYNTAXES:
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
            pixels = pixels * 2 // 3  # two chroma samples shared by each pair of pixels
        if frames * pixels * bits > 8 * length:  # 1-bit frames are packed back to back
            declared = f"{frames} frames of " if frames > 1 else ""
            shape = f"{declared}{rows} x {columns} x {samples} x {bits} bits declared"
            return RejectionReason.CORRUPT_PIXEL_DATA, f"pixel data has {length} bytes, shorter than the {shape}"
    elif length and frames > 1:
        try:
            fragments = _count_fragments(data)
        except Exception as exc:  # noqa: BLE001 - whatever pydicom's parser raises, the fragments are unreadable
            return RejectionReason.CORRUPT_PIXEL_DATA, f"unreadable encapsulated pixel data: {_first_line(exc)}"
        if frames > fragments:
            return RejectionReason.CORRUPT_PIXEL_DATA, f"{frames} frames declared, {fragments} fragments present"
    return None


# Transfer syntaxes whose frames declare their own size: JPEG (SOFn), JPEG-LS (SOF55), JPEG 2000 (SIZ).
_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})  # fmt: skip
_J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                           "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                           "1.2.840.10008.1.2.4.203"})  # fmt: skip
# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC) and JPEG-LS's SOF55 (F7)
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _codestream_problem(ds: Dataset, frames: list[int], number_of_frames: int,
                        max_pixels: int) -> tuple[RejectionReason, str] | None:  # fmt: skip
    """Why a compressed frame must not reach a decoder: its codestream's own header (JPEG SOF,
    JPEG-LS SOF55, JPEG 2000 SIZ) declares a size other than Rows x Columns, more than
    ``max_pixels``, or more pixels than its bytes can honestly hold (a decompression bomb:
    :data:`CODESTREAM_PIXELS_PER_BYTE`). Read from the frame's first bytes, nothing decoded."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax not in _JPEG_SYNTAXES and syntax not in _J2K_SYNTAXES:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    for index in frames:
        try:
            frame = get_frame(ds.PixelData, index, number_of_frames=number_of_frames)
        except Exception as exc:  # noqa: BLE001 - whatever pydicom's parser raises, the frame is unreadable
            return (
                RejectionReason.CORRUPT_PIXEL_DATA,
                f"frame {index}: unreadable encapsulated pixel data: {_first_line(exc)}",
            )
        declared = _j2k_size(frame) if syntax in _J2K_SYNTAXES else _jpeg_size(frame)
        if declared is None:
            header = "SIZ" if syntax in _J2K_SYNTAXES else "SOF"
            return RejectionReason.CORRUPT_PIXEL_DATA, (f"frame {index}: no readable frame header ({header}) "
                                                        "in its codestream")  # fmt: skip
        height, width, components = declared
        if height * width * components > max_pixels:
            return RejectionReason.TOO_LARGE, (f"frame {index}'s codestream declares {height} x {width} x {components} "
                                               f"samples, more than the {max_pixels} pixels allowed")  # fmt: skip
        if (height, width, components) != (rows, columns, samples):
            return RejectionReason.CORRUPT_PIXEL_DATA, (f"frame {index}'s codestream declares {height} x {width} x "
                                                        f"{components} samples, the header "
                                                        f"{rows} x {columns} x {samples}")  # fmt: skip
        pixels = height * width * components
        if pixels > max(CODESTREAM_FREE_PIXELS, CODESTREAM_PIXELS_PER_BYTE * len(frame)):
            return RejectionReason.TOO_LARGE, (f"frame {index}: {len(frame)} bytes of codestream declare {height} x "
                                               f"{width} x {components} samples, more than "
                                               f"{CODESTREAM_PIXELS_PER_BYTE} pixels a byte "
                                               "(a decompression bomb)")  # fmt: skip
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG or JPEG-LS frame's SOF segment, walking the
    marker segments from SOI; ``None`` when there is none before the scan."""
    if frame[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the scan before any frame header
            return None
        length = struct.unpack_from(">H", frame, at + 2)[0]
        if marker in _SOF_MARKERS:
            if at + 10 > len(frame) or length < 8:
                return None
            height, width = struct.unpack_from(">HH", frame, at + 5)
            return height, width, frame[at + 9]
        at += 2 + length
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG 2000 codestream's SIZ segment (also inside a JP2 box)."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if at < 0 or at + 42 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, at + 8)
    components = struct.unpack_from(">H", frame, at + 40)[0]
    if xsiz <= xosiz or ysiz <= yosiz:
        return None
    return ysiz - yosiz, xsiz - xosiz, components


def _count_fragments(data: bytes) -> int:
    """Fragments of encapsulated pixel data (a frame has at least one), without copying them."""
    buffer = io.BytesIO(data)
    parse_basic_offsets(buffer)
    return parse_fragments(buffer)[0]


class _DecodeFailure(Exception):
    def __init__(self, reason: RejectionReason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _decode_frame(ds: Dataset, index: int) -> tuple[np.ndarray, str, str]:
    """The raw stored values of one frame, its photometric interpretation after
    decoding (YBR becomes RGB), and a note naming the decoder."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise _DecodeFailure(RejectionReason.NO_DECODER, f"no pixel decoder for transfer syntax {syntax.name}") from exc
    if not decoder.is_available:
        raise _DecodeFailure(
            RejectionReason.NO_DECODER, f"no installed decoder for {syntax.name}: {decoder.missing_dependencies}"
        )
    refusals = []
    for plugin in _plugins(decoder):
        try:
            array, meta = decoder.as_array(
                ds,
                index=index,
                as_rgb=True,  # type: ignore[arg-type]  # pydicom: **kwargs: DecodeOptions, not Unpack[DecodeOptions]
                decoding_plugin=plugin,
            )
            break
        except MemoryError as exc:
            raise _DecodeFailure(RejectionReason.TOO_LARGE, f"{syntax.name}: a frame does not fit in memory") from exc
        except BaseException as exc:  # noqa: BLE001 - re-raised below unless a plugin's refusal
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # pylibjpeg-rle panics on some corrupt segments: pyo3's PanicException is a BaseException
            refusals.append(f"{plugin}: {_first_line(exc)}" if plugin else _first_line(exc))
    else:  # every plugin refused: the message lists why
        raise _DecodeFailure(RejectionReason.CORRUPT_PIXEL_DATA, f"{syntax.name}: {'; '.join(refusals)}")
    photometric = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    return array, photometric, f"decoder: pydicom ({syntax.name})"


# pydicom's decoding plugins in the order they are tried. GDCM is left out where another plugin
# can decode the syntax: on some corrupt JPEG 2000 streams it aborts the whole process (found by
# fuzzing), which no ``except`` can catch; DCMTK, the fallback, runs in a subprocess. pylibjpeg
# before pyjpegls for JPEG-LS although CharLS decodes a sound 512x512 slice 4-5x faster (4 against 18
# ms, the NEMA JLSL files): on 27 of 120 corrupted codestreams CharLS took 3 s to give up, libjpeg at
# most 0.6 s, and a sender of broken files would hold a worker that long per file.
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")
_ABORTS_ON_CORRUPT_DATA = ("gdcm",)


def _plugins(decoder: Decoder) -> list[str]:
    """The plugins to try one by one (``[""]``, pydicom's choice, for native pixel data)."""
    available = tuple(decoder.available_plugins)
    if not available:
        return [""]
    ordered = [name for name in _PLUGIN_ORDER if name in available]
    ordered += [name for name in available if name not in ordered and name not in _ABORTS_ON_CORRUPT_DATA]
    return ordered or list(available)


def decoder_environment() -> dict[str, str]:
    """The environment of a DCMTK decoder: what DCMTK reads, nothing else. A decoder parses
    untrusted pixel data; should a file ever take it over, the worker's secrets
    (``CBIR_REDIS_PASSWORD``, ``CBIR_ORTHANC_PASSWORD``...) are not in its environment to read."""
    kept = {name: os.environ[name] for name in _DECODER_ENVIRONMENT if name in os.environ}
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **kept}


def _dcmtk_tool(ds: Dataset) -> str | None:
    tool = _DCMTK_DECOMPRESSORS.get(str(ds.file_meta.TransferSyntaxUID))
    return tool if tool and shutil.which(tool) else None


def _dcmtk_decompress(ds: Dataset) -> tuple[Dataset, str]:
    """The dataset decompressed by DCMTK into Explicit VR Little Endian, and the tool used."""
    tool = _dcmtk_tool(ds)
    assert tool is not None
    with tempfile.TemporaryDirectory(prefix="cbir-dcmtk-") as tmp:
        src, dst = Path(tmp, "in.dcm"), Path(tmp, "out.dcm")
        try:
            ds.save_as(src, enforce_file_format=True)
        except Exception as exc:  # noqa: BLE001 - a malformed element pydicom read but cannot write back
            detail = f"cannot hand the file to {tool}: {_first_line(exc)}"
            raise _DecodeFailure(RejectionReason.CORRUPT_PIXEL_DATA, detail) from exc
        try:
            done = subprocess.run([tool, str(src), str(dst)], capture_output=True, text=True, timeout=120,
                                  env=decoder_environment())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _DecodeFailure(RejectionReason.NO_DECODER, f"{tool} failed: {_first_line(exc)}") from exc
        if done.returncode != 0 or not dst.exists():
            raise _DecodeFailure(RejectionReason.NO_DECODER, f"{tool} failed: {_first_line(done.stderr)}")
        try:
            return pydicom.dcmread(dst), tool
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, DCMTK's output is unreadable
            detail = f"{tool} wrote an unreadable file: {_first_line(exc)}"
            raise _DecodeFailure(RejectionReason.CORRUPT_PIXEL_DATA, detail) from exc


def _to_grey(
    ds: Dataset,
    raw: np.ndarray,
    index: int,
    photometric: str,
    metadata: InstanceMetadata,
    decisions: list[str],
) -> tuple[np.ndarray | TablePicture, np.ndarray, bool]:
    """Map one decoded frame to (display, model) float32 grey in 0..1 (the display made when first
    read: :class:`TablePicture`), appending each decision, and whether the model's picture is
    Hounsfield units through :data:`CT_MODEL_MAPPING`."""
    photometric = photometric.strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, _native_order_luts(ds))
        bits = 8 if rgb.dtype == np.uint8 else 16
        decisions.append(f"palette colour -> {bits}-bit RGB -> BT.601 luma (display and model)")
        luma = _luma(rgb, bits)
        return luma, luma, False
    if photometric in _COLOUR or raw.ndim == 3:
        bits = int(ds.get("BitsStored", 8) or 8)
        if photometric.startswith("YBR"):
            decisions.append(f"{photometric}: luma from the Y channel (display and model)")
            luma = _clip01(raw[..., 0].astype(np.float32) / float(2**bits - 1))
            return luma, luma, False
        decisions.append(f"{photometric} -> BT.601 luma (display and model)")
        luma = _luma(raw, bits)
        return luma, luma, False

    view = _frame_view(ds, index)
    frame = _GreyFrame(raw, view)
    decisions.append(frame.modality_note)
    display = _voi(frame, view, metadata, decisions)
    model = _model_grey(frame, view, metadata, decisions)
    inverse_shape = str(view.get("PresentationLUTShape", "")).upper() == "INVERSE"
    inverted = photometric == "MONOCHROME1" or inverse_shape
    if inverted:
        display, model = 1.0 - display, 1.0 - model
        decisions.append(
            "inverted (MONOCHROME1)" if photometric == "MONOCHROME1" else "inverted (Presentation LUT INVERSE)"
        )
    hounsfield = _in_hounsfield_units(view, metadata) and not inverted
    return frame.deferred(_clip01(display)), frame.per_pixel(_clip01(model)), hounsfield


class _GreyFrame:
    """One grey frame's modality-LUT values, worked out once per stored value where that is cheaper.

    Every step from the stored value to the clipped float32 picture (modality LUT, window, the
    CT mapping, the percentile scaling once its range is known, inversion) maps one stored value
    to one number wherever the value stands in the frame. An integer frame with far fewer
    possible values than pixels (a 12-bit 512 x 512 CT slice: at most 4,096 values for 262,144
    pixels) is therefore mapped as a table of its value range, which the frame then indexes
    (:meth:`per_pixel`): the same pictures, bit for bit, for a fraction of the float64
    arithmetic. Only the percentile range reads the whole frame, through the table. A VOI LUT
    Sequence is applied to the whole frame: whether its input is integral is a property of the
    frame, not of one value.
    """

    values: np.ndarray
    """The modality-LUT values (float64) of the table's stored values, else of every pixel."""
    modality_note: str

    def __init__(self, raw: np.ndarray, view: Dataset) -> None:
        self._offsets: np.ndarray | None = None
        self._range: tuple[float, float] | None = None
        self._stored, self._low = raw, 0
        stored = raw
        table = _table_range(raw, view)
        if table is not None:
            low, high = table
            # the table's values in the frame's own dtype: the modality LUT sees what it would have
            stored = (np.arange(high - low + 1, dtype=np.int64) + low).astype(raw.dtype)
            self._offsets = np.subtract(raw, low, dtype=np.intp)  # made once, indexed twice (or thrice)
            self._low = low
        self.values, self.modality_note = _modality_lut(stored, view)

    def percentile_range(self) -> tuple[float, float]:
        """:func:`_percentile_range` of the whole frame's values (the display and the model may both ask)."""
        if self._range is None:
            whole = self.values if self._offsets is None else np.take(self.values, self._offsets)
            self._range = _percentile_range(whole)
        return self._range

    def per_pixel(self, picture: np.ndarray) -> np.ndarray:
        """A picture computed from :attr:`values`, as the frame's pixels."""
        return picture if self._offsets is None else np.take(picture, self._offsets)

    def deferred(self, picture: np.ndarray) -> np.ndarray | TablePicture:
        """:meth:`per_pixel`, made when first read (:class:`TablePicture`)."""
        return picture if self._offsets is None else TablePicture(picture, self._stored, self._low)


def _table_range(raw: np.ndarray, view: Dataset) -> tuple[int, int] | None:
    """(lowest, highest) stored value of a frame that :class:`_GreyFrame` maps as a table, ``None``
    for a frame mapped pixel by pixel: not integers of 32 bits at most (whose offsets are exact
    in intp), a VOI LUT Sequence, or more possible values than half the pixels."""
    if raw.dtype.kind not in "iu" or raw.dtype.itemsize > 4 or not raw.size or view.get("VOILUTSequence"):
        return None
    low, high = int(raw.min()), int(raw.max())
    return (low, high) if high - low < raw.size // 2 else None


_PALETTE_DATA = tuple(f"{colour}PaletteColorLookupTableData" for colour in ("Red", "Green", "Blue"))


def _native_order_luts(ds: Dataset) -> Dataset:
    """The dataset as apply_color_lut should see it: pydicom 3.0 reads 16-bit palette LUT data in
    the machine's byte order, so a big-endian file's palette came out byte-swapped (nearly black)."""
    if ds.original_encoding[1] is not False or not any(k in ds for k in _PALETTE_DATA):
        return ds
    view = Dataset()
    for element in ds:
        if element.tag.group == 0x0028:
            view.add(element)
    for keyword in _PALETTE_DATA:
        descriptor = ds.get(keyword.replace("Data", "Descriptor"))
        if keyword in ds and descriptor is not None and int(descriptor[2]) > 8:
            # a new element: the caller's dataset keeps its own bytes
            setattr(view, keyword, np.frombuffer(ds[keyword].value, dtype=">u2").astype("<u2").tobytes())
    return view


def _modality_lut(raw: np.ndarray, view: Dataset) -> tuple[np.ndarray, str]:
    if view.get("ModalityLUTSequence"):
        explanation = view.ModalityLUTSequence[0].get("LUTExplanation", "")
        note = f"modality LUT: sequence {explanation}".strip()
    elif "RescaleSlope" in view or "RescaleIntercept" in view:
        view.RescaleSlope = float(view.get("RescaleSlope", 1.0) or 1.0)
        view.RescaleIntercept = float(view.get("RescaleIntercept", 0.0) or 0.0)
        note = f"modality LUT: slope {view.RescaleSlope:g}, intercept {view.RescaleIntercept:g}"
    else:
        return raw.astype(np.float64), "modality LUT: none (stored values)"
    return np.asarray(apply_modality_lut(raw, view), dtype=np.float64), note


def _model_grey(frame: _GreyFrame, view: Dataset, metadata: InstanceMetadata, decisions: list[str]) -> np.ndarray:
    """The model's picture: CT in Hounsfield units through :data:`CT_MODEL_MAPPING`, anything else
    through its own 0.5-99.5 percentile range; never the file's window."""
    values = frame.values
    if _in_hounsfield_units(view, metadata):
        decisions.append("model input: CT Hounsfield units through the fixed mapping (file window ignored)")
        return hounsfield_to_grey(values)
    low, high = frame.percentile_range()
    decisions.append("model input: 0.5-99.5 percentile range of the modality-LUT values (file window ignored)")
    return (values - low) / (high - low)


def _in_hounsfield_units(view: Dataset, metadata: InstanceMetadata) -> bool:
    """A CT frame whose modality LUT is given: its values are Hounsfield units."""
    return metadata.modality == "CT" and ("RescaleIntercept" in view or bool(view.get("ModalityLUTSequence")))


def _percentile_range(values: np.ndarray) -> tuple[float, float]:
    """The :data:`_AUTO_PERCENTILES` of ``values``, never an empty range."""
    low, high = np.percentile(values, _AUTO_PERCENTILES)
    return float(low), float(high if high > low else low + 1.0)


def _voi(frame: _GreyFrame, view: Dataset, metadata: InstanceMetadata, decisions: list[str]) -> np.ndarray:
    """The display picture: the file's VOI (LUT sequence, else its first window), else a default."""
    values = frame.values
    if view.get("VOILUTSequence"):
        item = view.VOILUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        # A LUT is indexed by stored values: keep integral input integral.
        lut_input = values.astype(np.int64) if np.array_equal(values, np.round(values)) else values
        grey = np.asarray(apply_voi(lut_input, view, index=0), dtype=np.float64) / float(2**out_bits - 1)
        decisions.append(f"display VOI: LUT sequence {item.get('LUTExplanation', '')}".strip())
        return grey
    window = _file_window(view)
    if window is not None:
        centre, width, function, note = window
        decisions.append(f"display VOI: window centre {centre:g} width {width:g} ({note})")
        return _apply_window(values, centre, width, function)
    if _in_hounsfield_units(view, metadata):
        name, centre, width = _ct_default(metadata.body_part_examined)
        decisions.append(f"display VOI: none in file; CT {name} default centre {centre:g} width {width:g}")
        return _apply_window(values, centre, width, "LINEAR")
    low, high = frame.percentile_range()
    decisions.append(
        f"display VOI: none in file; auto window {_AUTO_PERCENTILES[0]:g}-{_AUTO_PERCENTILES[1]:g} percentile "
        f"[{low:g}, {high:g}]"
    )
    return (values - low) / (high - low)


def _file_window(view: Dataset) -> tuple[float, float, str, str] | None:
    """The first usable window of the file: (centre, width, function, note)."""
    if "WindowCenter" not in view or "WindowWidth" not in view:
        return None
    centres, widths = _as_list(view.WindowCenter), _as_list(view.WindowWidth)
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    explanations = _as_list(view.get("WindowCenterWidthExplanation", []))
    for i, (centre, width) in enumerate(zip(centres, widths, strict=False)):  # a window lacking a width is no window
        try:
            centre, width = float(centre), float(width)
        except (TypeError, ValueError):
            continue
        if width >= 1.0 or (function != "LINEAR" and width > 0):
            named = i < len(explanations) and explanations[i]
            label = str(explanations[i]) if named else f"window {i + 1} of {len(centres)}"
            return centre, width, function, f"{label}, {function}"
    return None


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    # pydicom's windowing maps into the stored value range of the dataset it is
    # given; a one-bit unsigned range makes that range exactly 0..1.
    unit_range = Dataset()
    unit_range.PhotometricInterpretation = "MONOCHROME2"
    unit_range.BitsStored = 1
    unit_range.PixelRepresentation = 0
    unit_range.WindowCenter = centre
    unit_range.WindowWidth = width
    unit_range.VOILUTFunction = function
    return np.asarray(apply_windowing(values, unit_range), dtype=np.float64)


def _ct_default(body_part: str | None) -> tuple[str, float, float]:
    for parts, name, centre, width in _CT_WINDOWS:
        if body_part in parts:
            return name, centre, width
    return _CT_SOFT_TISSUE


_VIEW_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation",
    "VOILUTSequence", "PresentationLUTShape",
)  # fmt: skip
_VIEW_TAGS = tuple(Tag(keyword) for keyword in _VIEW_KEYWORDS)


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The pixel-module attributes that hold for one frame.

    Enhanced multi-frame objects keep rescale and window in functional groups
    (shared, then per frame, the per-frame value winning); pydicom's LUT functions
    read them from the top level, so they are copied there.
    """
    view = Dataset()
    for tag in _VIEW_TAGS:
        if tag in ds:  # a copy of the element: a value set on the view (the modality LUT's) stays there
            view.add(copy.copy(ds[tag]))  # not setattr, which validates the value again (0.14 against 0.04 ms)
    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        if group.get("PixelValueTransformationSequence"):
            item = group.PixelValueTransformationSequence[0]
            for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                if keyword in item:
                    setattr(view, keyword, item[keyword].value)
        if group.get("FrameVOILUTSequence"):
            item = group.FrameVOILUTSequence[0]
            for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"):
                if keyword in item:
                    setattr(view, keyword, item[keyword].value)
    return view


def _not_an_image(ds: Dataset) -> str | None:
    """Why the dataset is not an image, or ``None`` when it is one."""
    sop_class = UID(str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")))
    if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (media directory), not an image"
    known = bool(sop_class) and sop_class.name != sop_class
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return f"{sop_class.name if known else 'the object'} has no pixel data"
    if known and "Image Storage" not in sop_class.name:
        return f"{sop_class.name} holds pixel data that is not an image for retrieval"
    return None


def _luma(rgb: np.ndarray, bits: int) -> np.ndarray:
    luma = rgb.astype(np.float32) @ _BT601_LUMA
    return _clip01(luma / float(2**bits - 1))


def _clip01(values: np.ndarray) -> np.ndarray:
    """``values`` clipped to 0..1 as float32, NaN as 0 (what ``np.nan_to_num`` then ``np.clip`` give,
    without nan_to_num's copy and its four infinity and NaN masks: clip sends infinities to 0 or 1)."""
    clipped = np.clip(values, 0.0, 1.0)
    if clipped.dtype.kind == "f":
        np.copyto(clipped, 0.0, where=np.isnan(clipped))
    return clipped.astype(np.float32, copy=False)


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def _looks_like_dicom(ds: Dataset) -> bool:
    return len(ds) > 0 and any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "PixelData", "Modality", "Rows"))


def _infer_transfer_syntax(ds: Dataset) -> None:
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
        ds.file_meta = FileMetaDataset()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _syntax_name(ds: Dataset) -> str:
    return UID(ds.file_meta.TransferSyntaxUID).name


def _first_line(value: object) -> str:
    """A message on one line, short enough for a rejection list."""
    text = " ".join(str(value).split())
    return text[:300] if text else type(value).__name__
