"""``orthanc-cbir serve``: the product without Orthanc, for an archive that cannot load a plugin.

One process runs

- the DICOM SCP (:class:`~orthanc_cbir.ingest.scp.StoreSCP`) on ``scp_host:scp_port``, with
  ``scp_processes`` - 1 receiving processes beside it on the same port
  (:mod:`~orthanc_cbir.ingest.receivers`), each started again if it ends,
- the HTTP API (:mod:`orthanc_cbir.api.http_server`: the routes Orthanc serves, STOW-RS,
  OpenAPI) on ``http_host:http_port``,
- ``workers`` worker threads that index what both receivers spool,

and stops them all on SIGINT / SIGTERM. What was received and acknowledged but not yet
indexed waits in ``spool_dir`` and is enqueued again at the next start; what was refused
(0xA700, or a STOW-RS failure, while Redis did not answer) is not kept: the sender sends it
again. More ``orthanc-cbir worker`` processes may share the work if they see the same spool
directory (``CBIR_SPOOL_DIR``) and stream (``CBIR_INGEST_STREAM``). The stream is the server's
own: one that Orthanc's workers read (another deployment on the same Redis) is refused at start.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from .answers.similar_series import SimilarSeriesMaker
from .config import Settings
from .ingest.queue import SPOOL_WORKERS, IngestQueue, StreamKindError
from .ingest.receivers import ReceivingProcesses, shared_port_supported
from .ingest.scp import StoreSCP, allowed_calling_aets
from .ingest.spool import Spool
from .ingest.worker import Worker
from .redis_client import client_for

log = logging.getLogger(__name__)


def serve(settings: Settings, workers: int = 1) -> int:
    """Run the standalone server until interrupted; returns the exit status."""
    from .api.http_server import HttpServerThread, create_app, is_loopback

    allowed = allowed_calling_aets(settings.scp_allowed_aets)
    if settings.scp_port and not allowed and not is_loopback(settings.scp_host):  # before Redis, before any port
        print(f"orthanc-cbir serve: the DICOM SCP would accept any calling AE title on {settings.scp_host}: set "
              "CBIR_SCP_ALLOWED_AETS to the AE titles that may send (comma-separated), or * to accept any, "
              "or listen on 127.0.0.1", file=sys.stderr, flush=True)  # fmt: skip
        return 2
    if settings.scp_processes < 1 or (settings.scp_processes > 1 and not shared_port_supported()):
        print("orthanc-cbir serve: CBIR_SCP_PROCESSES (--scp-processes) must be 1 or more (more than 1 only where "
              "the system has SO_REUSEPORT: Linux)", file=sys.stderr, flush=True)  # fmt: skip
        return 2
    client = client_for(settings)  # connects on its first command
    queue = IngestQueue.for_settings(client, settings)
    spool = Spool(Path(settings.spool_dir), queue)
    receivers = ReceivingProcesses(settings, settings.scp_processes - 1) if settings.scp_port and \
        settings.scp_processes > 1 else None  # fmt: skip
    try:  # refuses a non-loopback address without authentication
        app = create_app(settings, spool, receiving=receivers.status if receivers is not None else None)
    except ValueError as exc:
        print(f"orthanc-cbir serve: {exc}", file=sys.stderr, flush=True)
        return 2
    try:  # before anything is received or taken: the stream must not be another deployment's
        queue.bind(SPOOL_WORKERS)
    except StreamKindError as exc:
        print(f"orthanc-cbir serve: {exc}", file=sys.stderr, flush=True)
        return 2
    recovered = spool.recover()
    if recovered:
        log.info("%d received instance(s) waiting in %s enqueued again", recovered, spool.directory)
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    series_maker = SimilarSeriesMaker.factory(settings, client)  # for the Orthanc of CBIR_ORTHANC_URL, if any
    threads = [threading.Thread(target=Worker.from_settings(settings, client, series_maker).run, args=(stop,),
                                name=f"worker-{n}", daemon=True) for n in range(workers)]  # fmt: skip
    shared = receivers is not None
    scp = StoreSCP(spool, settings.scp_aet, allowed).start(settings.scp_host, settings.scp_port, shared_port=shared) \
        if settings.scp_port else None  # fmt: skip
    if scp is not None and receivers is not None:
        try:
            receivers.start(scp.port)
        except RuntimeError as exc:
            print(f"orthanc-cbir serve: {exc}", file=sys.stderr, flush=True)
            scp.stop()
            return 1
    for thread in threads:  # what was received meanwhile waits on the stream
        thread.start()
    http = HttpServerThread(app, settings.http_host, settings.http_port).start()
    dicom = f"{settings.scp_host}:{settings.scp_port}" if scp else "(off)"
    if receivers is not None:
        dicom += f" in {settings.scp_processes} processes"
    print(f"orthanc-cbir serve: DICOM {settings.scp_aet}@{dicom}, HTTP http://{settings.http_host}:"
          f"{settings.http_port} (OpenAPI at /docs), {workers} worker(s), spool {spool.directory}", flush=True)
    while not stop.wait(1.0):  # until SIGTERM / SIGINT (a timed wait: the handler runs between waits)
        if receivers is not None:
            receivers.check()
    # receivers first, so nothing is acknowledged that no one indexes
    if scp is not None:
        scp.stop()
    if receivers is not None:
        receivers.stop()
    http.stop()
    for thread in threads:
        thread.join(timeout=30)
    return 0
