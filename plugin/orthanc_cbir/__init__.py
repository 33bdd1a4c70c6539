"""orthanc-cbir: content-based medical image retrieval next to an Orthanc server.

The package is one core with thin adapters: :mod:`orthanc_cbir.dicom` turns DICOM
into normalised images and metadata, the Orthanc entry script and the CLI call it.
"""

__version__ = "0.1.0"
