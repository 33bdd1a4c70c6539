"""The standalone DICOM receiver: a pynetdicom C-STORE / C-ECHO SCP that spools what it gets.

A PACS (or any SCU) sends to :data:`~orthanc_cbir.config.Settings.scp_aet` on
``scp_port``; each C-STORE is streamed to disk by pynetdicom
(``STORE_RECV_CHUNKED_DATASET``: a large file never sits in memory), copied into the
spool and put on the ingest stream (:meth:`Spool.accept_copy`), and only then answered
with Success. If that fails the SCU gets 0xA700 (out of resources) and keeps its copy
to send again. A dataset that cannot become an index entry because of its identity (no valid
SOPInstanceUID, or one other than the request's AffectedSOPInstanceUID) is refused with 0xC000
(cannot understand): the SCU is told, and nothing that no worker could handle is spooled. A
C-STORE whose SOP Class is not the one its presentation context was accepted for (a file whose
own SOP Class UID is garbage: DCMTK sends it as it is) is refused with 0xA900 (data set does not
match SOP class) instead of pynetdicom aborting the association, which lost every file after it.
Only calling AE titles in ``scp_allowed_aets`` may associate when it is set; ``*`` there admits
any (``orthanc-cbir serve`` wants a list or ``*`` before it listens off loopback).

Accepted: every storage SOP class, in the transfer syntaxes the pixel step decodes.

Several processes may listen on one port (``start(..., shared_port=True)``: ``SO_REUSEPORT``, the
kernel hands each new association to one of them): :mod:`.receivers`.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
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
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time, invisible to mypy
from pynetdicom.transport import ThreadedAssociationServer

from ..dicom import looks_like_uid
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
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
C_STORE_RQ = 0x0001
"""CommandField (0000,0100) of a C-STORE request (PS3.7 E.1)."""

MAXIMUM_PDU_BYTES = 2**20
"""The largest P-DATA PDU the SCP takes (pynetdicom's default is 16 KiB): pynetdicom handles each PDU in
Python, so a 512x512 CT slice in 32 PDUs took a fifth longer to receive than in one (storescu sends
PDUs as large as the receiver takes). A PDU is held whole before it goes to disk: 16 MiB for 16
associations at most."""

ANY_CALLING_AET = "*"
"""In an allowlist of calling AE titles: any may associate, said on purpose rather than by an empty list."""

# pynetdicom writes each received dataset to a temporary file instead of memory.
_config.STORE_RECV_CHUNKED_DATASET = True


class StoreSCP:
    """A C-STORE / C-ECHO SCP that hands every instance to a :class:`Spool` before answering."""

    def __init__(self, spool: Spool, ae_title: str = "CBIR", allowed_calling_aets: tuple[str, ...] = ()):
        """``allowed_calling_aets``: the calling AE titles that may associate (empty, or holding
        :data:`ANY_CALLING_AET`: any)."""
        self.spool = spool
        self.ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None  # every storage context names its SOP class
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        # pynetdicom admits any calling AE title when the list is empty; it would take "*" for a title
        self.ae.require_calling_aet = [] if ANY_CALLING_AET in allowed_calling_aets else list(allowed_calling_aets)
        self.ae.maximum_associations = 16
        self.ae.maximum_pdu_size = MAXIMUM_PDU_BYTES
        self._server: ThreadedAssociationServer | None = None
        self._mismatched: set[tuple[int, int]] = set()  # (association, MessageID) of C-STOREs re-routed below
        self._lock = threading.Lock()

    def start(self, host: str, port: int, shared_port: bool = False) -> StoreSCP:
        """Listen on ``host:port`` in background threads; returns at once. ``shared_port``: other
        processes may listen on the same port the same way (:mod:`.receivers`)."""
        handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                                            (evt.EVT_DIMSE_RECV, self._on_message)]  # fmt: skip
        server_class = _SharedPortServer if shared_port else ThreadedAssociationServer
        server = self.ae.make_server((host, port), evt_handlers=handlers, server_class=server_class)
        # what AE.start_server does for a server of its own class; its shutdown() takes it off the list
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"scp-{self.ae.ae_title}", daemon=True).start()
        self._server = server
        log.info("DICOM SCP %s listening on %s:%d%s", self.ae.ae_title, host, self.port,
                 " (a port shared with other receiving processes)" if shared_port else "")  # fmt: skip
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

    def _on_message(self, event: evt.Event) -> None:
        """A C-STORE request naming another SOP Class than its presentation context's: pynetdicom finds
        no service for it and aborts the association. Give it the context's SOP Class, so that the
        storage service (:meth:`_on_store`) answers it, with a refusal."""
        message = event.message
        command = message.command_set
        if command.get("CommandField") != C_STORE_RQ:
            return
        accepted = {cx.context_id: cx.abstract_syntax for cx in event.assoc.accepted_contexts}
        negotiated = accepted.get(message.context_id)
        if negotiated is not None and command.get("AffectedSOPClassUID") != negotiated:
            command.AffectedSOPClassUID = negotiated
            with self._lock:
                self._mismatched.add((id(event.assoc), int(command.MessageID)))

    def _on_store(self, event: evt.Event) -> int:
        """Spool, then answer: Success only once the file and its queue entry are durable."""
        request = cast(C_STORE, event.request)  # an EVT_C_STORE event carries a C-STORE request
        with self._lock:
            mismatched = (id(event.assoc), int(request.MessageID or 0)) in self._mismatched
            self._mismatched.discard((id(event.assoc), int(request.MessageID or 0)))
        if mismatched:
            log.warning("C-STORE from %s refused (0x%04X): its SOP Class is not its presentation context's",
                        event.assoc.requestor.ae_title, DOES_NOT_MATCH_SOP_CLASS)  # fmt: skip
            return DOES_NOT_MATCH_SOP_CLASS
        uid = str(request.AffectedSOPInstanceUID or "")
        refused = _identity_problem(Path(event.dataset_path), uid)
        if refused is not None:  # the reason names no UID nor any value: they may identify a patient
            log.warning("C-STORE from %s refused (0x%04X): %s", event.assoc.requestor.ae_title, *refused)
            return refused[0]
        try:
            self.spool.accept_copy(Path(event.dataset_path), uid)
        except Exception as exc:  # noqa: BLE001 - the SCU keeps the instance and may send it again
            log.error("C-STORE from %s not spooled: %s: %s", event.assoc.requestor.ae_title, type(exc).__name__, exc)
            return OUT_OF_RESOURCES
        return SUCCESS


class _SharedPortServer(ThreadedAssociationServer):
    """An association server whose port other processes may listen on too (``SO_REUSEPORT``, which
    Linux allows only to processes of the same user)."""

    def server_bind(self) -> None:
        assert self.socket is not None  # made by TCPServer before it binds
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def allowed_calling_aets(text: str) -> tuple[str, ...]:
    """The AE titles of a comma-separated list (``scp_allowed_aets``), blanks dropped.

    >>> allowed_calling_aets(" PACS_A, ,MODALITY_2 "), allowed_calling_aets("*"), allowed_calling_aets("")
    (('PACS_A', 'MODALITY_2'), ('*',), ())
    """
    return tuple(aet.strip() for aet in text.split(",") if aet.strip())


def _identity_problem(path: Path, affected_uid: str) -> tuple[int, str] | None:
    """``(status, reason)`` when the received dataset cannot be an index entry of its own, else ``None``."""
    if not _valid_uid(affected_uid):
        return CANNOT_UNDERSTAND, "the request's AffectedSOPInstanceUID is not a valid UID"
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on what is not DICOM
        return CANNOT_UNDERSTAND, f"the dataset cannot be read ({type(exc).__name__})"
    dataset_uid = str(header.get("SOPInstanceUID") or "")
    if not _valid_uid(dataset_uid):
        return CANNOT_UNDERSTAND, "the dataset has no valid SOPInstanceUID"
    if dataset_uid != affected_uid:
        return CANNOT_UNDERSTAND, "the dataset's SOPInstanceUID is not the request's AffectedSOPInstanceUID"
    return None


def _valid_uid(uid: str) -> bool:
    """A DICOM UID: at most 64 characters, digits in dot-separated components (none empty)."""
    return len(uid) <= 64 and looks_like_uid(uid)
