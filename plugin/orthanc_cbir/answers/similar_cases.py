"""DICOM out: a similarity answer as objects any viewer shows beside the query's images.

Two kinds of object, both built by highdicom's validated constructors and both
placed in the query's study (so they carry the query patient's identity and
no one else's):

- a Secondary Capture series "Similar cases": one image per hit in rank order,
  the hit's pixels above a caption band (rank, distance, modality, body part,
  whose image it is). Another patient's image contributes its pixels only, and
  only when its file declares no burned-in annotation (:func:`withheld_reason`;
  "this patient" is :func:`same_patient`: ID, issuer, birth date and name);
- a Key Object Selection document (TID 2010, "Of Interest") referencing the hits
  that belong to the query's own study. A KOS cannot reference another
  patient's study, so there is none when no hit is in the query's study.

Both are made by ``orthanc-cbir`` (:data:`~orthanc_cbir.dicom.own_output.MANUFACTURER`): no
path indexes them (:func:`~orthanc_cbir.dicom.own_output.reject_own_output`).
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from .. import __version__
from ..dicom.own_output import KOS_DESCRIPTION, MANUFACTURER, SERIES_DESCRIPTION

# highdicom quotes a one-component PatientName ("SMITH") in a UserWarning, and in a log record
# when it refuses one: either would write the query patient's name to the worker's log. Neither
# says anything the series needs, so both are dropped, for every thread of the process.
warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name",
                        category=UserWarning)  # fmt: skip


class _NoPersonNames(logging.Filter):
    """Drops highdicom's records that quote a person name argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_name" not in str(record.msg) and "person name" not in str(record.msg)


for _name in [name for name in logging.root.manager.loggerDict if name.startswith("highdicom")] + ["highdicom"]:
    logging.getLogger(_name).addFilter(_NoPersonNames())

SECONDARY_CAPTURE_SERIES_NUMBER = 9901
KOS_SERIES_NUMBER = 9902
"""High series numbers: viewers sort series by number, so the answer sits after the images."""

IMAGE_SIZE = 512
"""Width and height of the hit's picture in each Secondary Capture image."""
CAPTION_HEIGHT = 72


@dataclass(frozen=True)
class SimilarCase:
    """One hit, as the series shows it."""

    rank: int
    distance: float
    strategy: str
    modality: str | None
    body_part: str | None
    same_patient: bool
    """The hit is an image of the query's patient."""
    pixels: np.ndarray | None
    """float32 (rows, columns) in 0..1 as displayed, or ``None`` when not shown."""
    withheld: str | None = None
    """Why the pixels are not shown (``None`` when they are)."""
    reference: Dataset | None = None
    """The hit's header (pixels not needed) when it is in the query's study: the KOS references it."""


def same_patient(query: Dataset, hit: Dataset) -> bool:
    """Whether ``hit`` is an image of the query's patient: the same PatientID and issuer (an
    absent issuer matches only an absent one), and the same birth date and name. An ID alone is
    not enough: without an issuer, two sites' MRNs may coincide, and such a person must not be
    captioned "this patient" nor drawn under the rules of the query's own images.

    Names compare without case, surrounding spaces and empty trailing components
    (``Doe^John^^`` is ``DOE^JOHN``), alphabetic group only."""
    patient_id = _plain(query.get("PatientID"))
    if not patient_id or patient_id != _plain(hit.get("PatientID")):
        return False
    same_issuer = _plain(query.get("IssuerOfPatientID")) == _plain(hit.get("IssuerOfPatientID"))
    same_birth = _plain(query.get("PatientBirthDate")) == _plain(hit.get("PatientBirthDate"))
    return same_issuer and same_birth and _person_name(query.get("PatientName")) == _person_name(hit.get("PatientName"))


def withheld_reason(query: Dataset, hit: Dataset, *, other_patients: bool = False) -> str | None:
    """Why the pixels of ``hit`` must not be drawn in the query patient's study, or ``None`` when
    they may be. The query's own images are drawn. Another patient's image may carry its name,
    ID or birth date burned into the pixels, so it is drawn only when its file says
    ``BurnedInAnnotation`` NO; a file that does not say is a grey panel unless ``other_patients``
    (the ``similar_series_other_patients`` setting) is turned on explicitly; YES never is."""
    if same_patient(query, hit):
        return None
    declared = _plain(hit.get("BurnedInAnnotation")).upper()
    if declared == "YES":
        return "another patient's image with burned-in text"
    if declared == "NO" or other_patients:
        return None
    return "another patient's image, not declared free of burned-in text"


def _plain(value: object) -> str:
    return "" if value is None else str(value).strip()


def _person_name(value: object) -> str:
    alphabetic = _plain(value).split("=")[0]
    return "^".join(part.strip() for part in alphabetic.split("^")).rstrip("^").upper()


def render_case(case: SimilarCase) -> np.ndarray:
    """The picture of one hit: ``uint8`` (IMAGE_SIZE + CAPTION_HEIGHT, IMAGE_SIZE), MONOCHROME2."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE + CAPTION_HEIGHT), color=0)
    draw = ImageDraw.Draw(canvas)
    if case.pixels is not None:
        picture = Image.fromarray(np.round(np.clip(case.pixels, 0, 1) * 255).astype(np.uint8), mode="L")
        scale = IMAGE_SIZE / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.LANCZOS)  # fmt: skip
        canvas.paste(picture, ((IMAGE_SIZE - picture.width) // 2, (IMAGE_SIZE - picture.height) // 2))
    else:
        draw.rectangle((0, 0, IMAGE_SIZE - 1, IMAGE_SIZE - 1), fill=48)
        _centred(draw, IMAGE_SIZE // 2 - 24, "image not shown", _font(26))
        _centred(draw, IMAGE_SIZE // 2 + 12, case.withheld or "", _font(16))
    draw.rectangle((0, IMAGE_SIZE, IMAGE_SIZE - 1, IMAGE_SIZE + CAPTION_HEIGHT - 1), fill=255)
    what = " ".join(filter(None, [case.modality, case.body_part])) or "unknown modality"
    draw.text((10, IMAGE_SIZE + 6), f"#{case.rank}  {what}", fill=0, font=_font(26))
    whose = "this patient" if case.same_patient else "another patient"
    draw.text((10, IMAGE_SIZE + 40), f"distance {case.distance:.4g} ({case.strategy}), {whose}", fill=0, font=_font(18))
    return np.asarray(canvas)


def secondary_capture_series(query: Dataset, cases: Sequence[SimilarCase]) -> list[hd.sc.SCImage]:
    """The "Similar cases" series: one Secondary Capture image per case, in the query's study.

    Patient and study attributes come from ``query`` (highdicom copies them); a case adds pixels only.
    """
    series_uid = hd.UID()
    now = dt.datetime.now()
    images = []
    for number, case in enumerate(cases, start=1):
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=query, pixel_array=render_case(case), photometric_interpretation="MONOCHROME2",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
            series_number=SECONDARY_CAPTURE_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=number,
            manufacturer=MANUFACTURER, patient_orientation=("L", "P"), series_description=SERIES_DESCRIPTION,
            software_versions=__version__, content_date=now.date(), content_time=now.time(),
            series_date=now.date(), series_time=now.time(),
        )  # fmt: skip
        # A picture of a hit, of any plane, states no orientation: PatientOrientation is type 2, so
        # empty is valid, but highdicom asks for a value with a patient coordinate system. (Through the
        # element, as pydicom's attribute setter does: highdicom's __init__ makes mypy read the attribute as a list.)
        image["PatientOrientation"].value = ""
        # Likewise laterality: a hit may show any body part, so it is unknown (type 2C, empty = unknown).
        image.Laterality = ""
        # The caption names no one, and a hit whose file declares burned-in text is never drawn here.
        image.BurnedInAnnotation = "NO"
        image.ImageComments = f"rank {case.rank}, distance {case.distance:.6g}, strategy {case.strategy}"
        images.append(image)
    return images


def key_object_selection(query: Dataset, cases: Sequence[SimilarCase]) -> hd.ko.KeyObjectSelectionDocument | None:
    """A KOS "Of Interest" in the query's study referencing the cases of that study, in rank order;
    ``None`` if there are none."""
    referenced = [case.reference for case in cases if case.reference is not None
                  and case.reference.StudyInstanceUID == query.StudyInstanceUID]  # fmt: skip
    if not referenced:
        return None
    evidence = [_evidence(query, hit) for hit in referenced]
    selection = hd.ko.KeyObjectSelection(  # an image reference (not composite) wherever the hit has Rows and Columns
        document_title=codes.DCM.OfInterest, referenced_objects=referenced,
        description=f"{len(evidence)} image(s) of this study most similar to the query (orthanc-cbir)",
    )  # fmt: skip
    return hd.ko.KeyObjectSelectionDocument(
        evidence=evidence, content=selection, series_instance_uid=hd.UID(), series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, series_description=KOS_DESCRIPTION,
    )  # fmt: skip


_PATIENT_AND_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                      "StudyDate", "StudyTime", "ReferringPhysicianName", "SpecificCharacterSet")  # fmt: skip


def _evidence(query: Dataset, hit: Dataset) -> Dataset:
    """The hit's references with the study's patient and study attributes, which highdicom copies
    from the evidence into the document (a hit in the query's study shares them; type 2, so they may be empty)."""
    evidence = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(evidence, keyword, hit[keyword].value)
    for keyword in _PATIENT_AND_STUDY:
        setattr(evidence, keyword, query.get(keyword))
    return evidence


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _centred(draw: ImageDraw.ImageDraw, y: int, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    width = draw.textlength(text, font=font)
    draw.text(((IMAGE_SIZE - width) / 2, y), text, fill=200, font=font)
