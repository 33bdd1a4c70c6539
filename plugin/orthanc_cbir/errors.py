"""Every error orthanc-cbir raises on purpose, under one base class.

Bad input is a value, not an exception (:class:`orthanc_cbir.dicom.Rejection`); these
are what a caller must handle. None carries an HTTP status: an adapter (the Orthanc
plugin, the standalone server, the CLI) decides what each one means to its client,
with :func:`orthanc_cbir.api.routes.status_of` for the HTTP ones.

>>> try:
...     raise NotIndexed("no instance with this identifier is indexed")
... except CbirError as exc:
...     type(exc).__name__
'NotIndexed'
"""

from __future__ import annotations


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


class UpstreamFailed(CbirError):
    """Orthanc refused or failed a request made on the caller's behalf (storing a series)."""


class WorkerFailed(CbirError):
    """A worker failed on a request (a fault of this service, not of the request): the entry is
    kept as a dead letter for the operator."""
