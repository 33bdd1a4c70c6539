"""HTTP answers, written once: :mod:`.routes` holds transport-free handlers, the
adapters mount them (:mod:`.orthanc_adapter` inside Orthanc)."""
