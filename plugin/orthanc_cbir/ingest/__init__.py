"""From the archive to the index. The receivers: C-STORE (:mod:`.scp`), STOW-RS (:mod:`.stow`),
both into the spool (:mod:`.spool`); Orthanc's change feed (:mod:`.change_log`, with
:mod:`.enqueue_buffer` when Redis is away) and :mod:`.reconcile`; a DICOMweb archive's walk
(:mod:`.backfill`). Between them and the index: the queue (:mod:`.queue`), the worker
(:mod:`.worker`, reading Orthanc through :mod:`.orthanc_client`) and the steps every way in
shares (:mod:`.pipeline`)."""
