"""Every error orthanc-cbir raises on purpose, under one base class.

Bad input is a value, not an exception (:class:`orthanc_cbir.dicom.Rejection`); these
are what a caller must handle. None carries an HTTP status: an adapter (the Orthanc
plugin, the standalone server, the CLI) decides what each one means to its client,
with :func:`orthanc_cbir.api.similar.status_of` for the HTTP ones.

>>> try:
...     raise NotIndexed("no instance with this identifier is indexed")
... except CbirError as exc:
...     type(exc).__name__
'NotIndexed'
"""

from __future__ import annotations

from typing import Protocol


class CbirError(Exception):
    """The base of every error below."""


class BadParameters(CbirError, ValueError):
    """What a caller asked cannot be searched or made: an unknown parameter, a value out of
    range. The message is fixed text: it never repeats the caller's input (which a browser
    could otherwise be made to render)."""


class NotFound(CbirError, LookupError):
    """What a caller named is not there: an instance the archive does not hold, a job that
    expired, a search that found nothing to store."""


class NotIndexed(NotFound):
    """The instance, series or study is not in the index: not stored, not indexed yet, or rejected."""


class Busy(CbirError):
    """Too many requests of this process wait for a worker now; try again in a few seconds."""


class Unavailable(CbirError):
    """A part the answer needs did not answer in time: no worker, or a worker that makes no
    "Similar cases" series."""


class TooLarge(CbirError):
    """What a caller sent or named is larger than this service takes."""


class Undrawable(CbirError):
    """A stored file the pixel step cannot draw."""


class UpstreamFailed(CbirError):
    """Orthanc refused or failed a request made on the caller's behalf (storing a series)."""


class WorkerFailed(CbirError):
    """A worker failed on a request (a fault of this service, not of the request): the entry is
    kept as a dead letter for the operator."""


# -- what the parts raise --------------------------------------------------------------------


class ServiceError(CbirError, RuntimeError):
    """A service did not start; the message ends with the tail of its log."""


class ModelContractError(CbirError, ValueError):
    """The ONNX file and its model card disagree, or the card breaks the contract."""


class InflationRefused(CbirError, ValueError):
    """A Deflated dataset that would inflate past its bound (a zlib bomb): "too large"."""


class StreamKindError(CbirError, RuntimeError):
    """The stream belongs to workers of the other kind (another deployment on this Redis)."""


class OhifError(CbirError, RuntimeError):
    """The OHIF viewer could not be fetched, or is not the pinned one."""


class IndexStillNeeded(CbirError, RuntimeError):
    """The index asked to be dropped is the current one, or the current one is not complete yet."""


class IndexLayoutError(CbirError, ValueError):
    """The index in Redis was written with another layout or another shard count than this store's."""


class Progress(Protocol):
    """What a long run had done when it stopped (:class:`~orthanc_cbir.ingest.backfill.BackfillSummary`)."""

    studies: int

    def line(self) -> str:
        """One line for an operator."""
        ...


class BackfillError(CbirError, RuntimeError):
    """The DICOMweb server cannot be used: unreachable, credentials refused, or failing.

    The run stopped; what it indexed stays and the next run resumes. ``summary``
    holds the counts up to that point."""

    def __init__(self, message: str, summary: Progress | None = None):
        super().__init__(message)
        self.summary = summary
