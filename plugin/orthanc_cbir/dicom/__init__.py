"""DICOM in: decoded, normalised grey images and one metadata record per instance.

:func:`decode_instance` is the entry point; see :mod:`.pixels` for the grey value
pipeline, :mod:`.metadata` for the record and :mod:`.own_output` for how this service's
own "Similar cases" objects (:mod:`orthanc_cbir.answers`) are told apart.
"""

from .metadata import InstanceMetadata, element_text, extract_metadata, looks_like_uid, parse_age, parse_da
from .pixels import (
    DecodedInstance,
    NormalisedImage,
    Rejection,
    RejectionReason,
    decode_dataset,
    decode_instance,
    read_dataset,
    read_instance,
    select_frames,
)

__all__ = [
    "DecodedInstance",
    "InstanceMetadata",
    "NormalisedImage",
    "Rejection",
    "RejectionReason",
    "decode_dataset",
    "decode_instance",
    "element_text",
    "extract_metadata",
    "looks_like_uid",
    "parse_age",
    "parse_da",
    "read_dataset",
    "read_instance",
    "select_frames",
]
