"""The container files: the generated Orthanc configuration and the entry point's guard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_container_configuration_keeps_authentication_and_takes_the_password_from_the_environment(tmp_path):
    target = tmp_path / "orthanc.json"
    subprocess.run([sys.executable, str(ROOT / "docker" / "orthanc_config.py"), str(ROOT / "orthanc.json"),
                    str(target)], check=True, timeout=30)  # fmt: skip
    config = json.loads(target.read_text())
    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"cbir": "${ORTHANC_PASSWORD}"}
    assert config["PythonScript"] == "/opt/orthanc-cbir/plugin/orthanc_entry.py"
    assert config["Cbir"]["RedisUrl"] == "redis://redis:6379/0"
    assert config["StorageDirectory"].startswith("/var/lib/orthanc-cbir")


def test_entry_point_refuses_to_start_orthanc_without_a_password():
    done = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh")], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1 and "ORTHANC_PASSWORD" in done.stderr
