#!/bin/sh
# Start Orthanc with the plugin; an empty password would let anyone in, so refuse.
set -eu
if [ -z "${ORTHANC_PASSWORD:-}" ]; then
  echo "orthanc-cbir: set ORTHANC_PASSWORD (the password of Orthanc user 'cbir')" >&2
  exit 1
fi
exec /usr/sbin/Orthanc /etc/orthanc-cbir/orthanc.json
