#!/bin/sh
# Write Orthanc's configuration (the calling AE titles allowed to store come from the environment),
# then start Orthanc with the plugin. An empty password would let anyone in, an empty list of AE
# titles would let any host on the network store: refuse both.
set -eu
if [ -z "${ORTHANC_PASSWORD:-}" ]; then
  echo "orthanc-cbir: set ORTHANC_PASSWORD (the password of Orthanc user 'cbir')" >&2
  exit 1
fi
if [ -z "${CBIR_DICOM_ALLOWED_AETS:-}" ]; then
  echo "orthanc-cbir: set CBIR_DICOM_ALLOWED_AETS to the calling AE titles that may store (comma-separated)," \
       "or * to accept any" >&2
  exit 1
fi
/opt/orthanc-cbir/.venv/bin/python /opt/orthanc-cbir/docker/orthanc_config.py \
  /opt/orthanc-cbir/orthanc.json /etc/orthanc-cbir/orthanc.json
exec /usr/sbin/Orthanc /etc/orthanc-cbir/orthanc.json
