"""Training the retrieval model (the ``train`` extra: torch).

:mod:`.data` reads the sources, :mod:`.net` is the network, :mod:`.train` the
loop and its losses, :mod:`.itq` the appearance code, :mod:`.export` the ONNX
file and its model card. The runtime never imports this package.
"""
