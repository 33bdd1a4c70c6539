"""DICOM that the tests build themselves, so that the suite runs anywhere.

Each builder returns a complete pydicom Dataset (file meta included) whose pixel
values the test chose, so that expected outputs can be computed by hand.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.1")
COMPREHENSIVE_SR = UID("1.2.840.10008.5.1.4.1.1.88.33")
US_IMAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")

PATIENT_NAME = "Doe^Jane^Q"
PATIENT_ID = "PID-0042-SECRET"


def base_dataset(sop_class: UID = CT_IMAGE, modality: str = "CT", **attributes: Any) -> Dataset:
    """Patient, study, series and instance attributes, no pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    ds.StudyDate = "20240131"
    ds.Modality = modality
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "AXIAL 5MM"
    ds.Manufacturer = "TestVendor"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def grey_image(
    stored: np.ndarray,
    *,
    sop_class: UID = CT_IMAGE,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes: Any,
) -> Dataset:
    """A single-frame (or multi-frame, for a 3-D ``stored``) grey image of ``stored`` values."""
    signed = np.issubdtype(stored.dtype, np.signedinteger)
    bits_allocated = stored.dtype.itemsize * 8
    ds = base_dataset(sop_class, modality, **attributes)
    _set_pixels(ds, stored, photometric=photometric, samples=1, bits_allocated=bits_allocated,
                bits_stored=bits_stored or bits_allocated, signed=signed)  # fmt: skip
    return ds


def colour_image(rgb: np.ndarray, *, photometric: str = "RGB", **attributes: Any) -> Dataset:
    """An 8-bit colour image; ``rgb`` is (rows, columns, 3) and stored as given."""
    ds = base_dataset(US_IMAGE, "US", **attributes)
    _set_pixels(ds, rgb, photometric=photometric, samples=3, bits_allocated=8, bits_stored=8, signed=False)
    ds.PlanarConfiguration = 0
    return ds


def palette_image(indices: np.ndarray, red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> Dataset:
    """An 8-bit PALETTE COLOR image with 16-bit lookup tables of 256 entries."""
    ds = base_dataset(US_IMAGE, "US")
    _set_pixels(ds, indices.astype(np.uint8), photometric="PALETTE COLOR", samples=1, bits_allocated=8,
                bits_stored=8, signed=False)  # fmt: skip
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    return ds


def enhanced_ct(frames: np.ndarray, per_frame_rescale: list[tuple[float, float]],
                per_frame_window: list[tuple[float, float]]) -> Dataset:  # fmt: skip
    """An Enhanced CT whose rescale and window live in per-frame functional groups."""
    ds = grey_image(frames, sop_class=ENHANCED_CT)
    ds.NumberOfFrames = frames.shape[0]
    groups = []
    for (slope, intercept), (centre, width) in zip(per_frame_rescale, per_frame_window, strict=False):
        group = Dataset()
        transformation = Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept = slope, intercept
        transformation.RescaleType = "HU"
        group.PixelValueTransformationSequence = Sequence([transformation])
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = centre, width
        group.FrameVOILUTSequence = Sequence([voi])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    return ds


def structured_report() -> Dataset:
    """A Comprehensive SR: a DICOM object with no pixels."""
    ds = base_dataset(COMPREHENSIVE_SR, "SR")
    ds.ValueType = "CONTAINER"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _set_pixels(ds: Dataset, values: np.ndarray, *, photometric: str, samples: int, bits_allocated: int,
                bits_stored: int, signed: bool) -> None:  # fmt: skip
    frames = values.shape[0] if values.ndim == (4 if samples == 3 else 3) else 1
    rows, columns = values.shape[-3:-1] if samples == 3 else values.shape[-2:]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(values).tobytes()
