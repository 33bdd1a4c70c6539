"""From Orthanc to the index: the queue (:mod:`.queue`), the REST client
(:mod:`.orthanc_client`) and the worker (:mod:`.worker`)."""
