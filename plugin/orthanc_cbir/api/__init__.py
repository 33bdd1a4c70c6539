"""The HTTP adapters: :mod:`.routes` (transport-free handlers and the error -> status map),
:mod:`.similar` (the similarity routes over the core), mounted inside Orthanc by
:mod:`.orthanc_adapter` and served without Orthanc by :mod:`.http_server`."""
