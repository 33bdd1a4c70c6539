"""Write the container's Orthanc configuration from the repository's orthanc.json.

Inside a container Orthanc is reached over the container network, so remote access
is on; authentication stays on, with the password taken from the environment
(Orthanc expands ``${ORTHANC_PASSWORD}`` when it reads the file; the entry point
refuses to start without it). Storage goes to the volume.
"""

import json
import sys

source, target = sys.argv[1], sys.argv[2]
config = json.load(open(source))
config.update(
    {
        "StorageDirectory": "/var/lib/orthanc-cbir/storage",
        "IndexDirectory": "/var/lib/orthanc-cbir/storage",
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"cbir": "${ORTHANC_PASSWORD}"},
        "PythonScript": "/opt/orthanc-cbir/plugin/orthanc_entry.py",
    }
)
config["Cbir"]["RedisUrl"] = "redis://redis:6379/0"
with open(target, "w") as handle:
    json.dump(config, handle, indent=2)
