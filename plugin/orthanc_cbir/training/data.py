"""Training and validation images: readers for each source and the block split.

Every reader returns an :class:`ImageSet`: images already passed through the
runtime's :func:`~orthanc_cbir.model.preprocess.to_model_input` (stored as uint8,
the precision of the sources) with their labels. Labels are indices into
:data:`LABELS`; ``-1`` means "not known for this image" and is left out of that
head's loss.

This module needs numpy and Pillow only; the training loop adds torch.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..model.preprocess import INPUT_SIZE, read_picture, to_model_input

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

LABELS: dict[str, tuple[str, ...]] = {
    "modality": ("CT", "MR", "XR"),
    "region": ("abdomen", "breast", "chest", "hand", "head"),
    "pathology": ("normal", "pneumonia"),
}
"""The label heads and their classes, in output order."""

MEDNIST_CLASSES: dict[str, tuple[str, str]] = {
    "AbdomenCT": ("CT", "abdomen"),
    "BreastMRI": ("MR", "breast"),
    "CXR": ("XR", "chest"),
    "ChestCT": ("CT", "chest"),
    "Hand": ("XR", "hand"),
    "HeadCT": ("CT", "head"),
}
"""MedNIST's six folders as (modality, region)."""

AUX_LABELS: dict[str, tuple[str, ...]] = {
    "plane": ("axial", "coronal", "sagittal"),
    "organ": ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
              "lung-right", "pancreas", "spleen"),
}  # fmt: skip
"""Heads trained to shape the features but not exported: the image plane of real CT/MR
volumes and their reformats, and OrganAMNIST's organ (in its label order)."""

VOLUME_CLASSES = frozenset({"AbdomenCT", "BreastMRI", "ChestCT", "HeadCT"})
"""MedNIST classes cut from volumes: neighbouring file numbers are neighbouring slices."""


@dataclass
class ImageSet:
    """Preprocessed images with their labels, one row per image."""

    images: np.ndarray
    """uint8 (N, INPUT_SIZE, INPUT_SIZE)."""
    labels: dict[str, np.ndarray]
    """Per head (see :data:`LABELS`): int64 (N,), -1 where unknown."""
    group: np.ndarray
    """int64 (N,): images of one group come from one ordered stack (a class folder
    cut from volumes, a DICOM series); -1 for images without neighbours."""
    position: np.ndarray
    """int64 (N,): order within the group (file number, slice index)."""
    names: list[str]
    """Where each image came from (``Class/file``), for reports."""
    fine_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """int64 (N,): the finest label known (MedNIST class, or pathology), for reports and metrics."""
    aux: dict[str, np.ndarray] = field(default_factory=dict)
    """Training-only targets per :data:`AUX_LABELS` name (int64, -1 unknown), ``level`` (float32 mm
    along the body axis within its group, NaN unknown), ``anatomical_level`` (the same in the
    lung frame of :mod:`.landmarks`, NaN unknown) and ``lung_mm2`` (an axial CT slice's aerated
    lung, NaN unknown); filled in for every row."""

    def __post_init__(self) -> None:
        n = len(self.images)
        for name in AUX_LABELS:
            self.aux.setdefault(name, np.full(n, -1, dtype=np.int64))
        for name in ("level", "anatomical_level", "lung_mm2"):
            self.aux.setdefault(name, np.full(n, np.nan, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> ImageSet:
        index = np.asarray(index)
        return ImageSet(
            images=self.images[index],
            labels={head: values[index] for head, values in self.labels.items()},
            group=self.group[index],
            position=self.position[index],
            names=[self.names[i] for i in index],
            fine_class=self.fine_class[index],
            aux={name: values[index] for name, values in self.aux.items()},
        )

    @staticmethod
    def concatenate(parts: list[ImageSet]) -> ImageSet:
        return ImageSet(
            images=np.concatenate([p.images for p in parts]),
            labels={head: np.concatenate([p.labels[head] for p in parts]) for head in LABELS},
            group=np.concatenate([p.group for p in parts]),
            position=np.concatenate([p.position for p in parts]),
            names=[name for p in parts for name in p.names],
            fine_class=np.concatenate([p.fine_class for p in parts]),
            aux={name: np.concatenate([p.aux[name] for p in parts]) for name in parts[0].aux},
        )

    def as_float(self) -> np.ndarray:
        """float32 (N, 1, INPUT_SIZE, INPUT_SIZE) in 0..1: the model's input."""
        return as_model_input(self.images)


def as_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) -> float32 (N, 1, S, S) in 0..1."""
    return (images.astype(np.float32) / 255.0)[:, None]


def image_digests(images: np.ndarray) -> list[bytes]:
    """A digest per image of its pixel bytes: equal exactly for byte-identical images."""
    return [hashlib.blake2b(image.tobytes(), digest_size=12).digest() for image in images]


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A normalised image as the model's uint8 input."""
    return np.round(to_model_input(pixels) * 255.0).astype(np.uint8)


def label_arrays(n: int, **known: int) -> dict[str, np.ndarray]:
    """Per head of :data:`LABELS`, ``n`` labels: the index given by name in ``known``, else -1 (unknown)."""
    return {head: np.full(n, known.get(head, -1), dtype=np.int64) for head in LABELS}


def _label_index(head: str, value: str) -> int:
    return LABELS[head].index(value)


def read_mednist(archive: Path, cache_dir: Path | None = None) -> ImageSet:
    """All images of the MedNIST archive (``Class/NNNNNN.jpeg`` members of a tar.gz).

    Decoding 50,000 JPEGs takes a while: with ``cache_dir`` the decoded set is kept
    there as .npz, keyed by the archive's size and mtime.
    """
    archive = Path(archive)
    stat = archive.stat()
    cache = Path(cache_dir) / f"mednist-{stat.st_size}-{int(stat.st_mtime)}-{INPUT_SIZE}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        return _load_cache(cache)
    images, classes, numbers, names = [], [], [], []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpeg", ".jpg", ".png")):
                continue
            folder, filename = Path(member.name).parts[-2:]
            if folder not in MEDNIST_CLASSES:
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            images.append(to_uint8(read_picture(data)))
            classes.append(folder)
            numbers.append(int(re.sub(r"\D", "", Path(filename).stem) or 0))
            names.append(f"{folder}/{filename}")
    order = np.lexsort((np.array(numbers), np.array(classes)))
    image_set = _mednist_set(
        np.stack(images)[order], [classes[i] for i in order], np.array(numbers)[order], [names[i] for i in order]
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _save_cache(cache, image_set)
    return image_set


def _mednist_set(images: np.ndarray, classes: list[str], numbers: np.ndarray, names: list[str]) -> ImageSet:
    class_names = sorted(MEDNIST_CLASSES)
    labels = label_arrays(len(images))
    for i, name in enumerate(classes):
        modality, region = MEDNIST_CLASSES[name]
        labels["modality"][i] = _label_index("modality", modality)
        labels["region"][i] = _label_index("region", region)
    class_index = np.array([class_names.index(c) for c in classes], dtype=np.int64)
    group = np.where([c in VOLUME_CLASSES for c in classes], class_index, -1).astype(np.int64)
    return ImageSet(images, labels, group, numbers.astype(np.int64), names, fine_class=class_index)


def read_image_folder(root: Path, class_names: list[str] | None = None) -> tuple[ImageSet, list[str]]:
    """An ImageFolder tree (``root/<class>/<image>``): images and their class index
    in ``fine_class`` (folders sorted by name unless ``class_names`` is given)."""
    root = Path(root)
    class_names = class_names or sorted(p.name for p in root.iterdir() if p.is_dir())
    images, classes, names = [], [], []
    for index, name in enumerate(class_names):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                images.append(to_uint8(read_picture(path)))
                classes.append(index)
                names.append(f"{name}/{path.name}")
    n = len(images)
    numbers = np.array([int(re.sub(r"\D", "", Path(x).stem) or 0) for x in names], dtype=np.int64)
    image_set = ImageSet(
        np.stack(images), label_arrays(n), np.full(n, -1, dtype=np.int64), numbers, names,
        fine_class=np.array(classes, dtype=np.int64),
    )  # fmt: skip
    return image_set, class_names


def read_pneumonia(root: Path, split: str) -> ImageSet:
    """PneumoniaMNIST ``root/<split>/{normal,pneumonia}``: chest X-rays with a pathology label."""
    image_set, class_names = read_image_folder(Path(root) / split, list(LABELS["pathology"]))
    n = len(image_set)
    image_set.labels = label_arrays(n, modality=_label_index("modality", "XR"), region=_label_index("region", "chest"))
    image_set.labels["pathology"] = image_set.fine_class.copy()
    return image_set


def read_dicom_series(folder: Path, group: int = 0) -> ImageSet:
    """The slices of one DICOM series (:func:`decoded_slices`) as an ordered stack."""
    slices = decoded_slices(folder)
    n = len(slices)
    return ImageSet(
        np.stack([to_uint8(s.pixels) for s in slices]), label_arrays(n), np.full(n, group, dtype=np.int64),
        np.arange(n, dtype=np.int64), [f"{Path(folder).name}/{s.name}" for s in slices],
        fine_class=np.full(n, -1, dtype=np.int64),
    )  # fmt: skip


@dataclass(frozen=True)
class DecodedSlice:
    position: float
    """Along the slice normal (ImagePositionPatient projected on the cross product of
    ImageOrientationPatient; InstanceNumber when geometry is missing)."""
    name: str
    pixels: np.ndarray
    """The pixel step's model picture."""
    header: Dataset
    """The pydicom header (no pixel data)."""


def decoded_slices(folder: Path) -> list[DecodedSlice]:
    """Every file of a folder that decodes, through the runtime's pixel step, ordered by position."""
    import pydicom

    from ..dicom import DecodedInstance, decode_instance

    slices = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        outcome = decode_instance(path)
        if not isinstance(outcome, DecodedInstance):
            continue
        header = pydicom.dcmread(path, stop_before_pixels=True)
        slices.append(DecodedSlice(_slice_key(header), path.name, outcome.images[0].model_pixels, header))
    return sorted(slices, key=lambda s: s.position)


def _slice_key(header: Dataset) -> float:
    try:
        orientation = np.array(header.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        return float(np.dot(normal, np.array(header.ImagePositionPatient, dtype=float)))
    except (AttributeError, ValueError, TypeError):
        return float(getattr(header, "InstanceNumber", 0) or 0)


def block_split(image_set: ImageSet, block: int = 300, every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(train index, validation index): per class, files in file-number order are cut
    into contiguous blocks of ``block``; every ``every``-th block (from the middle
    one of the first ``every``) is validation. Near-duplicate neighbours stay on one
    side, unlike a random split."""
    train, validation = [], []
    for fine in np.unique(image_set.fine_class):
        members = np.flatnonzero(image_set.fine_class == fine)
        members = members[np.argsort(image_set.position[members], kind="stable")]
        blocks = np.arange(len(members)) // block
        is_validation = blocks % every == every // 2
        validation.append(members[is_validation])
        train.append(members[~is_validation])
    return np.concatenate(train), np.concatenate(validation)


def pneumonia_holdback(image_set: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """(train index, our own test index) of PneumoniaMNIST's train split: file-number blocks of
    50 per label, every 10th held back. Its official val split flatters (about 0.1 mAP), so the
    model card quotes this part, which training never sees."""
    return block_split(image_set, block=50)


def drop_duplicates(queries: np.ndarray, image_set: ImageSet) -> np.ndarray:
    """``queries`` without images whose pixels are byte-identical to another image of the set."""
    digests = image_digests(image_set.images)
    counts: dict[bytes, int] = {}
    for digest in digests:
        counts[digest] = counts.get(digest, 0) + 1
    return np.array([i for i in queries if counts[digests[i]] == 1], dtype=np.int64)


def _save_cache(path: Path, image_set: ImageSet) -> None:
    # mypy matches the **label_... arrays against savez's allow_pickle: bool as well as its **kwds: ArrayLike
    np.savez(
        path, images=image_set.images, group=image_set.group, position=image_set.position,
        names=np.array(image_set.names), fine_class=image_set.fine_class,
        **{f"label_{head}": values for head, values in image_set.labels.items()},  # type: ignore[arg-type]
    )  # fmt: skip


def _load_cache(path: Path) -> ImageSet:
    data = np.load(path)
    return ImageSet(
        images=data["images"], labels={head: data[f"label_{head}"] for head in LABELS}, group=data["group"],
        position=data["position"], names=[str(n) for n in data["names"]], fine_class=data["fine_class"],
    )  # fmt: skip
