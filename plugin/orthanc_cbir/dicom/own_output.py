"""What this service writes into an archive, told apart from what it reads.

The "Similar cases" series and key object selections (:mod:`orthanc_cbir.answers.similar_cases`)
carry these Manufacturer and SeriesDescription values. Every path that indexes passes its decoded
instances through :func:`reject_own_output`: indexed, the service's own images would answer every
query with copies of earlier hits.
"""

from __future__ import annotations

from .metadata import InstanceMetadata
from .pixels import DecodedInstance, Rejection, RejectionReason

MANUFACTURER = "orthanc-cbir"
SERIES_DESCRIPTION = "Similar cases"
KOS_DESCRIPTION = "Similar cases (key objects)"


def is_own_output(metadata: InstanceMetadata) -> bool:
    """Whether an instance is one this service made (never indexed: it would answer queries with copies)."""
    return made_here(metadata.manufacturer, metadata.series_description)


def reject_own_output(outcome: DecodedInstance | Rejection) -> DecodedInstance | Rejection:
    """The pixel step's outcome, or a rejection when it is one of this service's images: every path
    that indexes (worker, backfill, ``orthanc-cbir index``) passes its outcomes through this."""
    if isinstance(outcome, DecodedInstance) and is_own_output(outcome.metadata):
        return Rejection(RejectionReason.OWN_OUTPUT, "a Similar cases image made by this service", outcome.metadata)
    return outcome


def made_here(manufacturer: str | None, series_description: str | None) -> bool:
    """Whether a series with this Manufacturer and SeriesDescription is one this service made."""
    return manufacturer == MANUFACTURER and series_description in (SERIES_DESCRIPTION, KOS_DESCRIPTION)
