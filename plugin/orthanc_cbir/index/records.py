"""From decoded images to :class:`~.schema.IndexRecord`: the step every adapter shares
(CLI ``index``, the Orthanc worker, the evaluation).

One record per instance. When several frames of a multi-frame instance were
decoded (``FramesPerInstance`` > 1), the instance's features are the normalised
mean of its frames' features, and its code and class probabilities are those of
the frame nearest to that mean (a code cannot be averaged).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from ..dicom import Rejection, RejectionReason, decode_instance
from ..dicom.metadata import InstanceMetadata
from ..dicom.pixels import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS_PER_FRAME, DecodedInstance, NormalisedImage
from ..model.embedder import Embedder, Embeddings
from ..model.lung_extent import aerated_lung_mm2
from ..model.preprocess import read_picture
from ..model.regions import embed_regions
from .schema import IndexRecord

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def picture_metadata(name: str, namespace: str = "orthanc-cbir") -> InstanceMetadata:
    """A metadata record for a non-DICOM picture (PNG, JPEG): a UID derived from its name,
    so indexing the same picture twice is a no-op; nothing else is known."""
    uid = generate_uid(entropy_srcs=[namespace, name])
    return InstanceMetadata(
        sop_instance_uid=uid, series_instance_uid=uid, study_instance_uid=uid, sop_class_uid=None, modality=None,
        body_part_examined=None, study_description=None, series_description=name, patient_sex=None,
        patient_age_years=None, study_date=None, manufacturer=None, rows=None, columns=None, number_of_frames=1,
        pixel_spacing_mm=None, slice_location=None, image_position_patient=None, patient_key=None,
    )  # fmt: skip


def picture_records(names: Sequence[str], embedded: Embeddings, namespace: str) -> list[IndexRecord]:
    """Index records of already embedded pictures (row i of ``embedded`` is ``names[i]``)."""
    return [
        IndexRecord(picture_metadata(name, namespace), embedded.features[i], embedded.codes[i],
                    {head: p[i] for head, p in embedded.probabilities.items()})
        for i, name in enumerate(names)
    ]  # fmt: skip


def decode_file(path: Path, max_frames: int = 1, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME) -> DecodedInstance | Rejection:  # fmt: skip
    """A DICOM file through the pixel step, or a PNG / JPEG picture as one grey image
    (its UID derived from its absolute path); never raises. The limits are those of
    :func:`~orthanc_cbir.dicom.decode_instance`."""
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        return decode_instance(path, max_frames=max_frames, max_file_bytes=max_file_bytes,
                               max_pixels_per_frame=max_pixels_per_frame)  # fmt: skip
    size = path.stat().st_size if path.is_file() else 0
    if size > max_file_bytes:
        return Rejection(RejectionReason.TOO_LARGE,
                         f"the file has {size} bytes, more than the {max_file_bytes} allowed")  # fmt: skip
    return _picture(path, str(path.resolve()), max_pixels_per_frame)


def decode_bytes(data: bytes, name: str, max_frames: int = 1, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME) -> DecodedInstance | Rejection:  # fmt: skip
    """The same for bytes (an upload): PNG and JPEG are told by their signature. Never raises;
    the limits are those of :func:`~orthanc_cbir.dicom.decode_instance`."""
    if len(data) > max_file_bytes:
        return Rejection(RejectionReason.TOO_LARGE,
                         f"the file has {len(data)} bytes, more than the {max_file_bytes} allowed")  # fmt: skip
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        return _picture(data, name, max_pixels_per_frame)
    return decode_instance(data, max_frames=max_frames, max_file_bytes=max_file_bytes,
                           max_pixels_per_frame=max_pixels_per_frame)  # fmt: skip


def _picture(source: Path | bytes, name: str,
             max_pixels: int = DEFAULT_MAX_PIXELS_PER_FRAME) -> DecodedInstance | Rejection:  # fmt: skip
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as picture:
            width, height = picture.size  # from the header: nothing decoded yet
        if width * height > max_pixels:
            return Rejection(RejectionReason.TOO_LARGE, f"a picture of {width} x {height} is more than the "
                                                        f"{max_pixels} pixels allowed")  # fmt: skip
        pixels = read_picture(source)
    except (MemoryError, Image.DecompressionBombError):
        return Rejection(RejectionReason.TOO_LARGE,
                         "the picture does not fit in memory (or claims a size that would not)")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - whatever Pillow refuses is a picture we cannot use (never raises)
        return Rejection(RejectionReason.UNSUPPORTED_IMAGE, f"unreadable picture ({type(exc).__name__})")
    if pixels.ndim != 2 or 0 in pixels.shape:
        return Rejection(RejectionReason.UNSUPPORTED_IMAGE, f"a picture of shape {pixels.shape} is not one grey image")
    return DecodedInstance(picture_metadata(name), 1, (NormalisedImage(pixels, pixels, 0, ()),))


REGION_MODALITIES = frozenset({"CT", "MR"})
"""Modalities whose single-frame images get region entries (the ``regions`` setting)."""


def embed_instances(
    embedder: Embedder, instances: Sequence[DecodedInstance], orthanc: Sequence[dict[str, str]] | None = None,
    *, regions: bool = False,
) -> list[IndexRecord]:
    """Embed the decoded frames of each instance (one onnxruntime pass for all) into records;
    with ``regions``, each single-frame CT and MR image's region entries too."""
    embedded = embedder.embed_pixels([image.model_pixels for instance in instances for image in instance.images])
    records, start = [], 0
    for n, instance in enumerate(instances):
        span = slice(start, start + len(instance.images))
        start += len(instance.images)
        features = embedded.features[span]
        mean = features.mean(axis=0)
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        chosen = span.start + int(np.argmax(features @ mean))
        records.append(IndexRecord(
            instance.metadata, mean.astype(np.float32), embedded.codes[chosen],
            {head: p[chosen] for head, p in embedded.probabilities.items()},
            orthanc=dict(orthanc[n]) if orthanc else {}, frame=instance.images[chosen - span.start].frame_index,
            lung_mm2=_lung_mm2(instance),
            regions=embed_regions(embedder, instance.images[0].model_pixels) if regions and _has_regions(instance)
            else None,
        ))  # fmt: skip
    return records


def _has_regions(instance: DecodedInstance) -> bool:
    """Region entries are for cross-sectional slices (CT, MR) of one frame."""
    return len(instance.images) == 1 and instance.metadata.modality in REGION_MODALITIES


def _lung_mm2(instance: DecodedInstance) -> float | None:
    """The aerated lung of an axial CT slice in Hounsfield units with its pixel spacing (one frame)."""
    metadata, image = instance.metadata, instance.images[0]
    if (len(instance.images) != 1 or not image.hounsfield or metadata.pixel_spacing_mm is None
            or metadata.axial_position_mm is None):  # fmt: skip
        return None
    row_mm, column_mm = metadata.pixel_spacing_mm
    return aerated_lung_mm2(image.model_pixels, row_mm, column_mm)
