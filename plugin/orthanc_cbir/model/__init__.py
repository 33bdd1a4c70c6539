"""The retrieval model at run time: preprocessing, the ONNX embedder, hash codes.

Nothing here imports torch; :mod:`orthanc_cbir.training` (the ``train`` extra) does.
"""
