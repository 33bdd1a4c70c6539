"""Real anatomy for training and validation: OrganAMNIST organ crops and real CT/MR volumes
with their coronal and sagittal reformats.

MedNIST's 64 px JPEGs teach six coarse classes and nothing about where in the body a
slice lies. These readers add what it cannot:

- **organ identity**: OrganAMNIST (MedMNIST v3), abdominal CT organ crops with splits
  disjoint by patient (``read_organamnist``);
- **anatomical level and plane**: every slice of a real volume with its position along
  the body axis in mm, plus coronal and sagittal reformats of the same volume
  (``read_volume``). Levels are compared within a volume (the body-part regression idea:
  slice order and spacing are free labels) and, where a CT shows the lungs, across
  patients too: the lung apex and base (:mod:`.landmarks`) put every such volume on one
  frame. The validation measures the agreement on two patients training never sees.

None of this data is in the project; :data:`SOURCES` says where each piece comes from,
under which licence, and how to bring it (README, "The model"). Volumes are rendered the
way the runtime renders them: DICOM through the pixel step's window-independent
``model_pixels``, NIfTI (Hounsfield units) through the same fixed CT mapping.

This module needs numpy, Pillow and pydicom; nibabel only for NIfTI volumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..dicom.pixels import hounsfield_to_grey
from ..model.lung_extent import aerated_lung_mm2
from .data import AUX_LABELS, LABELS, ImageSet, decoded_slices, label_arrays, to_uint8
from .landmarks import lung_landmarks

SOURCES: dict[str, dict[str, str]] = {
    "OrganAMNIST": {
        "what": "58,830 abdominal CT organ crops, 28 px, 11 organs, splits disjoint by patient (MedMNIST v3, "
        "Yang et al. 2023, from LiTS, Bilic et al.)",
        "licence": "CC BY 4.0",
        "obtained": "file kosmos/ml/datasets/data/organamnist.npz of the PyPI wheel kosmos-core==0.6.2",
        "md5": "68e3f8846a6bd62f0c9bf841c0d9eacc",
    },
    "LIDC-IDRI-0314": {
        "what": "a 275-slice 1 mm chest CT (TCIA LIDC-IDRI, subject 0314)",
        "licence": "CC BY 3.0 (TCIA)",
        "obtained": "GitHub FNNDSC/data, folder dicom/andrei_abdomen/data/",
        "commit": "d2960f20b1df63f201265bf2b09d5a77ea0d6bab",
    },
    "TotalSegmentator examples": {
        "what": "a 20-slice abdominal CT in DICOM (example_ct_dicom/) and a 3 mm abdomen-pelvis CT volume "
        "(example_ct.nii.gz)",
        "licence": "Apache-2.0 (repository)",
        "obtained": "GitHub wasserth/TotalSegmentator, folder tests/reference_files/",
        "commit": "0e65a448d557382b1e925276212b3bec7f5aff83",
    },
    "Lung-PET-CT-Dx A0001": {
        "what": "a 64-slice 5 mm chest CT (TCIA Lung-PET-CT-Dx)",
        "licence": "CC BY 4.0",
        "obtained": "../shared/data/dicom/series/lung_pet_ct_dx",
    },
    "QIN-Prostate ADC": {
        "what": "a 20-slice prostate ADC MR series",
        "licence": "BSD-3 (dcmqi test data)",
        "obtained": "../shared/data/dicom/series/qin_prostate_adc_mr_20sl",
    },
}
"""Every source of real anatomy beyond MedNIST and PneumoniaMNIST, for the model card."""

ORGAN_FINE_OFFSET = 100
"""OrganAMNIST organs get fine classes 100 + organ, clear of MedNIST's and PneumoniaMNIST's."""

REFORMAT_FRACTIONS = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85)
"""Where coronal (front to back) and sagittal (right to left) reformats cut a volume: from the
front and side walls of the body to its back, as a viewer's reformats run."""
HELD_OUT_PATIENTS = ("LIDC-IDRI-0314", "Lung_Dx-A0001")
"""The two chest CTs of the cross-patient level measure: training never sees them."""

MIN_REFORMAT_MM = 100.0
"""A volume thinner than this along the body axis gives no reformat (it would be a strip)."""


@dataclass(frozen=True)
class VolumeSource:
    """One real volume: where it is, what it shows, and which patient it belongs to."""

    path: Path
    """A folder of DICOM slices or a NIfTI file (Hounsfield units for CT)."""
    modality: str
    region: str | None
    """A :data:`~.data.LABELS` region, or None when none fits (e.g. the pelvis)."""
    patient: str
    """Volumes of one patient share this; validation counts hits from other patients only (the two
    TotalSegmentator examples may be one person: they share one)."""


@dataclass
class Volume:
    """A volume in the model's grey scale, indexed [z, row, column] with z ascending towards the head."""

    grey: np.ndarray
    """float32 (Z, R, C) in 0..1 (the model's picture of each slice)."""
    z_mm: np.ndarray
    """float64 (Z,): slice positions along the body axis, mm, ascending."""
    row_mm: float
    column_mm: float


def read_organamnist(npz: Path, split: str) -> ImageSet:
    """OrganAMNIST's ``split`` (train / val / test): modality CT, organ as aux label and fine class."""
    data = np.load(npz)
    crops, organs = data[f"{split}_images"], data[f"{split}_labels"].ravel().astype(np.int64)
    images = np.stack([to_uint8(crop.astype(np.float32) / 255.0) for crop in crops])
    n = len(images)
    labels = label_arrays(n, modality=LABELS["modality"].index("CT"))
    image_set = ImageSet(images, labels, np.full(n, -1, dtype=np.int64), np.arange(n, dtype=np.int64),
                         [f"organamnist/{split}/{i}" for i in range(n)],
                         fine_class=ORGAN_FINE_OFFSET + organs)  # fmt: skip
    image_set.aux["organ"] = organs
    return image_set


def load_volume(path: Path) -> Volume:
    """A DICOM series folder (the pixel step's ``model_pixels``) or a CT NIfTI file (Hounsfield units)."""
    path = Path(path)
    if path.is_dir():
        return _dicom_volume(path)
    return _nifti_volume(path)


def read_volume(source: VolumeSource, group: int, reformats: tuple[float, ...] = REFORMAT_FRACTIONS, *,
                lung_frame: bool = False) -> ImageSet:  # fmt: skip
    """Every axial slice and the coronal and sagittal reformats of a volume, cut at the ``reformats``
    fractions of its depth and width (none: axial slices only). Axial slices carry their level: the
    volume's own z in mm (aux ``level``), a CT's aerated lung as the index measures it (aux
    ``lung_mm2``, :func:`~orthanc_cbir.model.lung_extent.aerated_lung_mm2`; NaN otherwise) and,
    with ``lung_frame`` (training: finding the lungs in 3-D takes seconds a volume) for a CT
    showing the lungs, the same in the frame of :mod:`.landmarks` (aux
    ``anatomical_level``, NaN otherwise)."""
    volume = load_volume(source.path)
    anatomical = None
    if lung_frame and source.modality == "CT":
        anatomical = lung_landmarks(volume.grey, volume.z_mm, volume.row_mm, volume.column_mm).frame(volume.z_mm)
    pictures, planes, levels, anatomical_mm, lung_mm2, names = [], [], [], [], [], []
    for k in range(len(volume.z_mm)):
        pictures.append(volume.grey[k])
        planes.append("axial")
        levels.append(volume.z_mm[k])
        anatomical_mm.append(np.nan if anatomical is None else anatomical[k])
        lung_mm2.append(aerated_lung_mm2(volume.grey[k], volume.row_mm, volume.column_mm)
                        if source.modality == "CT" else np.nan)  # fmt: skip
        names.append(f"{source.path.name}/axial/{k}")
    if volume.z_mm[-1] - volume.z_mm[0] >= MIN_REFORMAT_MM:
        slice_mm = float(np.median(np.diff(volume.z_mm)))
        for fraction in reformats:
            row = int(fraction * (volume.grey.shape[1] - 1))
            column = int(fraction * (volume.grey.shape[2] - 1))
            # Rows of a reformat run from the head down, as a viewer shows them.
            coronal = _resample(volume.grey[::-1, row, :], slice_mm, volume.column_mm)
            sagittal = _resample(volume.grey[::-1, :, column], slice_mm, volume.row_mm)
            for plane, picture in (("coronal", coronal), ("sagittal", sagittal)):
                pictures.append(picture)
                planes.append(plane)
                levels.append(np.nan)
                anatomical_mm.append(np.nan)
                lung_mm2.append(np.nan)
                names.append(f"{source.path.name}/{plane}/{fraction:g}")
    n = len(pictures)
    region = {} if source.region is None else {"region": LABELS["region"].index(source.region)}
    labels = label_arrays(n, modality=LABELS["modality"].index(source.modality), **region)
    plane_index = np.array([AUX_LABELS["plane"].index(p) for p in planes], dtype=np.int64)
    image_set = ImageSet(
        np.stack([to_uint8(p) for p in pictures]), labels, np.full(n, group, dtype=np.int64),
        np.arange(n, dtype=np.int64), names, fine_class=np.full(n, -1, dtype=np.int64),
    )  # fmt: skip
    image_set.aux["plane"] = plane_index
    image_set.aux["level"] = np.array(levels, dtype=np.float32)
    image_set.aux["anatomical_level"] = np.array(anatomical_mm, dtype=np.float32)
    image_set.aux["lung_mm2"] = np.array(lung_mm2, dtype=np.float32)
    return image_set


def anatomy_volumes(anatomy_root: Path, shared_series: Path) -> list[VolumeSource]:
    """The real volumes of :data:`SOURCES` where ``anatomy_root`` holds what README says to bring,
    then those :func:`extra_sources` lists."""
    root, series = Path(anatomy_root), Path(shared_series)
    return [
        VolumeSource(root / "lidc0314", "CT", "chest", "LIDC-IDRI-0314"),
        VolumeSource(
            series / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl", "CT", "chest", "Lung_Dx-A0001"
        ),
        VolumeSource(root / "ts_ct" / "example_ct.nii.gz", "CT", "abdomen", "TotalSegmentator"),
        VolumeSource(root / "ts_ct" / "example_ct_dicom", "CT", "abdomen", "TotalSegmentator"),
        VolumeSource(series / "qin_prostate_adc_mr_20sl", "MR", None, "QIN-Prostate"),
    ] + [
        VolumeSource(root / entry["path"], entry.get("modality", "CT"),
                     entry["region"] if entry["region"] in LABELS["region"] else None, entry["patient"])
        for entry in extra_sources(root)
    ]  # fmt: skip


def extra_sources(anatomy_root: Path) -> list[dict]:
    """More public volumes, as ``<anatomy_root>/extra/SOURCES.json`` lists them (each with its
    repository, commit and licence, which the model card copies); none when absent."""
    listing = Path(anatomy_root) / "extra" / "SOURCES.json"
    if not listing.exists():
        return []
    return [entry for entry in json.loads(listing.read_text()) if (Path(anatomy_root) / entry["path"]).exists()]


def read_volumes(sources: list[VolumeSource]) -> ImageSet:
    """:func:`read_volume` of each source with its lung frame, one group per volume (groups from 1000 up,
    clear of MedNIST's): the training set's volumes."""
    return ImageSet.concatenate([read_volume(source, 1000 + i, lung_frame=True) for i, source in enumerate(sources)])


def _dicom_volume(folder: Path) -> Volume:
    slices = decoded_slices(folder)
    orientation = np.array(slices[0].header.ImageOrientationPatient, dtype=float)
    # Patient z grows towards the head; an axial slice normal may point either way.
    towards_head = 1.0 if np.cross(orientation[:3], orientation[3:])[2] >= 0 else -1.0
    if towards_head < 0:
        slices = slices[::-1]
    shapes = {s.pixels.shape for s in slices}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: slices of several sizes {sorted(shapes)}")
    row_mm, column_mm = (float(v) for v in slices[0].header.PixelSpacing)
    return Volume(np.stack([s.pixels for s in slices]).astype(np.float32),
                  np.array([s.position * towards_head for s in slices]), row_mm, column_mm)  # fmt: skip


def _nifti_volume(path: Path) -> Volume:
    import nibabel

    image = nibabel.as_closest_canonical(nibabel.load(str(path)))  # RAS+: axis 0 to the right, 1 forwards, 2 up
    hu = np.asarray(image.get_fdata(dtype=np.float32))
    zooms = [float(v) for v in image.header.get_zooms()[:3]]
    # A DICOM axial image has rows front to back and columns from the patient's right to left.
    axial = np.transpose(hu[::-1, ::-1, :], (2, 1, 0))
    grey = hounsfield_to_grey(axial).astype(np.float32)
    z = image.affine[2, 3] + zooms[2] * np.arange(hu.shape[2])
    return Volume(grey, z, zooms[1], zooms[0])


def _resample(picture: np.ndarray, row_mm: float, column_mm: float) -> np.ndarray:
    """A reformat with square pixels (rows stretched to the columns' spacing)."""
    rows = max(1, int(round(picture.shape[0] * row_mm / column_mm)))
    resized = Image.fromarray(picture.astype(np.float32), mode="F").resize(
        (picture.shape[1], rows), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
