"""The standalone DICOM receiver: a pynetdicom C-STORE / C-ECHO SCP that spools what it gets.

A PACS (or any SCU) sends to :data:`~orthanc_cbir.config.Settings.scp_aet` on
``scp_port``; each C-STORE is streamed to disk by pynetdicom
(``STORE_RECV_CHUNKED_DATASET``: a large file never sits in memory), copied into the
spool and put on the ingest stream (:meth:`Spool.accept_copy`), and only then answered
with Success. If that fails the SCU gets 0xA700 (out of resources) and keeps its copy
to send again. Only calling AE titles in ``scp_allowed_aets`` may associate when it is set.

Accepted: every storage SOP class, in the transfer syntaxes the pixel step decodes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from .spool import Spool

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]  # fmt: skip
"""What the SCP accepts: the syntaxes :mod:`orthanc_cbir.dicom.pixels` decodes (pydicom's
plugins, GDCM, DCMTK for 12-bit JPEG), uncompressed first so an SCU that offers both sends raw."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700

# pynetdicom writes each received dataset to a temporary file instead of memory.
_config.STORE_RECV_CHUNKED_DATASET = True


class StoreSCP:
    """A C-STORE / C-ECHO SCP that hands every instance to a :class:`Spool` before answering."""

    def __init__(self, spool: Spool, ae_title: str = "CBIR", allowed_calling_aets: tuple[str, ...] = ()):
        """``allowed_calling_aets``: the calling AE titles that may associate (empty: any)."""
        self.spool = spool
        self.ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ae.require_calling_aet = list(allowed_calling_aets)
        self.ae.maximum_associations = 16
        self._server: ThreadedAssociationServer | None = None

    def start(self, host: str, port: int) -> StoreSCP:
        """Listen on ``host:port`` in background threads; returns at once."""
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        log.info("DICOM SCP %s listening on %s:%d", self.ae.ae_title, host, self.port)
        return self

    @property
    def port(self) -> int:
        """The port it listens on (useful after ``start(host, 0)``)."""
        return self._server.server_address[1] if self._server else 0

    def stop(self) -> None:
        """Stop listening and end the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        """Spool, then answer: Success only once the file and its queue entry are durable."""
        uid = str(event.request.AffectedSOPInstanceUID)
        try:
            self.spool.accept_copy(Path(event.dataset_path), uid)
        except Exception as exc:  # the SCU keeps the instance and may send it again
            log.error("C-STORE from %s not spooled: %s: %s", event.assoc.requestor.ae_title, type(exc).__name__, exc)
            return OUT_OF_RESOURCES
        return SUCCESS
