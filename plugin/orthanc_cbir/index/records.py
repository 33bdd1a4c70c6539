"""From decoded images to :class:`~.schema.IndexRecord`: the step every adapter shares
(CLI ``index``, the Orthanc worker, the evaluation).

One record per instance. When several frames of a multi-frame instance were
decoded (``FramesPerInstance`` > 1), the instance's features are the normalised
mean of its frames' features, and its code and class probabilities are those of
the frame nearest to that mean (a code cannot be averaged).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.uid import generate_uid

from ..dicom.metadata import InstanceMetadata
from ..dicom.pixels import DecodedInstance
from ..model.embedder import Embedder
from .schema import IndexRecord


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


def embed_instances(
    embedder: Embedder, instances: Sequence[DecodedInstance], orthanc: Sequence[dict[str, str]] | None = None
) -> list[IndexRecord]:
    """Embed the decoded frames of each instance (one onnxruntime pass for all) into records."""
    embedded = embedder.embed_pixels([image.pixels for instance in instances for image in instance.images])
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
        ))  # fmt: skip
    return records
