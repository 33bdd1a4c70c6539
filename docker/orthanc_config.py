"""Write the container's Orthanc configuration from the repository's orthanc.json.

Run by the entry point at every container start (the calling AE titles come from the
environment, which only then is known): ``orthanc_config.py SOURCE TARGET``.

Inside a container Orthanc is reached over the container network, so remote access
is on; authentication stays on, with the password taken from the environment
(Orthanc expands ``${ORTHANC_PASSWORD}`` when it reads the file; the entry point
refuses to start without it). Storage goes to the volume.

Orthanc's DICOM server stores only what the AE titles of ``CBIR_DICOM_ALLOWED_AETS``
(comma-separated) send: each becomes a modality allowed C-ECHO and C-STORE, nothing else
(no C-FIND, C-MOVE or C-GET of what Orthanc holds), and ``DicomAlwaysAllowStore`` and
``DicomAlwaysAllowEcho`` are off: a title not listed is refused the association, so it is not
even told that the AE answers.
``*`` accepts a C-ECHO and a C-STORE from any calling AE title. Unset or empty, no configuration is
written and the container does not start.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ALLOWED_AETS = "CBIR_DICOM_ALLOWED_AETS"
ANY_AET = "*"


def dicom_permissions(allowed: str) -> dict[str, Any]:
    """Orthanc's options that admit C-STOREs from the comma-separated AE titles ``allowed`` only.

    Raises ``ValueError`` for an empty list or a title DICOM does not allow (16 characters at most,
    no backslash, no control character)."""
    titles = [title.strip() for title in allowed.split(",") if title.strip()]
    if not titles:
        raise ValueError(f"set {ALLOWED_AETS} to the calling AE titles that may store (comma-separated), "
                         f"or {ANY_AET} to accept any")  # fmt: skip
    if ANY_AET in titles:
        return {"DicomAlwaysAllowStore": True}
    for title in titles:
        if len(title) > 16 or "\\" in title or not title.isprintable():
            raise ValueError(f"{ALLOWED_AETS}: {title!r} is no AE title (16 characters at most, no backslash)")
    # Orthanc wants a host and a port per modality. It connects to neither (no C-MOVE to these, no
    # C-GET), and with DicomCheckModalityHost off an incoming association is told by its AE title alone.
    modalities = {
        title: {"AET": title, "Host": "127.0.0.1", "Port": 104, "AllowEcho": True, "AllowStore": True,
                "AllowFind": False, "AllowMove": False, "AllowGet": False}
        for title in dict.fromkeys(titles)
    }  # fmt: skip
    return {"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": False,
            "DicomModalities": modalities}  # fmt: skip


def container_configuration(source: dict[str, Any], allowed: str) -> dict[str, Any]:
    """``source`` (orthanc.json) as the container runs it."""
    config = {
        **source,
        "StorageDirectory": "/var/lib/orthanc-cbir/storage",
        "IndexDirectory": "/var/lib/orthanc-cbir/storage",
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"cbir": "${ORTHANC_PASSWORD}"},
        "PythonScript": "/opt/orthanc-cbir/plugin/orthanc_entry.py",
        **dicom_permissions(allowed),
    }
    config["Cbir"] = {**source["Cbir"], "RedisUrl": "redis://redis:6379/0"}
    return config


def main(argv: list[str]) -> int:
    source, target = Path(argv[1]), Path(argv[2])
    try:
        config = container_configuration(json.loads(source.read_text()), os.environ.get(ALLOWED_AETS, ""))
    except ValueError as exc:
        print(f"orthanc-cbir: {exc}", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(config, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
