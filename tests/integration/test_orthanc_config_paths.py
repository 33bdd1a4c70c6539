"""The shipped ``orthanc.json`` and where Orthanc starts (issue 17, item 15; README, Deploy).

Orthanc reads ``StorageDirectory`` and ``IndexDirectory`` relative to the configuration file's
folder, while its Python plugin reads ``PythonScript`` relative to Orthanc's working directory:
the shipped file works when Orthanc starts in the checkout, stops Orthanc when it starts
elsewhere, and works from anywhere with an absolute ``PythonScript``. Real Orthanc processes,
started in a copy of the checkout's layout (``orthanc.json``, ``plugin/``, ``.venv``)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orthanc_cbir.local_services import ORTHANC_BINARY, REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def checkout_copy(folder: Path, redis_url: str, **changes) -> tuple[Path, int]:
    """The checkout's layout under ``folder``: the shipped ``orthanc.json`` with free ports and
    this test's Redis (and ``changes``), beside links to ``plugin/`` and ``.venv``."""
    folder.mkdir(parents=True)
    (folder / "plugin").symlink_to(REPO_ROOT / "plugin")
    (folder / ".venv").symlink_to(REPO_ROOT / ".venv")
    config = json.loads((REPO_ROOT / "orthanc.json").read_text())
    port = free_port()
    config.update({"HttpPort": port, "DicomPort": free_port(), **changes})
    config["Cbir"]["RedisUrl"] = redis_url
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    return folder / "orthanc.json", port


def run_orthanc(config: Path, port: int, cwd: Path, log: Path) -> tuple[int | None, str]:
    """Start Orthanc with ``config`` in ``cwd``: (HTTP status of ``/cbir/status``, or ``None`` if
    Orthanc stopped or never answered), and its log. Orthanc is stopped before returning."""
    user, password = next(iter(json.loads(config.read_text())["RegisteredUsers"].items()))
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    with log.open("wb") as out:
        process = subprocess.Popen([ORTHANC_BINARY, str(config)], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline, status = time.monotonic() + 30, None
            while time.monotonic() < deadline and process.poll() is None:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/cbir/status", headers={"Authorization": auth}
                )
                try:
                    with urllib.request.urlopen(request, timeout=2) as answer:
                        status = answer.status
                        break
                except urllib.error.HTTPError as error:
                    status = error.code
                    break
                except OSError:
                    time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
    return status, log.read_text(errors="replace")


def test_the_shipped_file_works_when_orthanc_starts_in_the_checkout(tmp_path, redis_server):
    config, port = checkout_copy(tmp_path / "checkout", redis_server.url)
    status, text = run_orthanc(config, port, config.parent, tmp_path / "orthanc.log")
    assert status == 200, text[-3000:]
    assert (config.parent / "state" / "orthanc" / "storage").is_dir()


def test_the_shipped_file_stops_orthanc_started_elsewhere_as_the_readme_says(tmp_path, redis_server):
    config, port = checkout_copy(tmp_path / "checkout", redis_server.url)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status, text = run_orthanc(config, port, elsewhere, tmp_path / "orthanc.log")
    assert status is None and "Inexistent directory for the Python script" in text, text[-3000:]
    readme = (REPO_ROOT / "README.md").read_text()
    assert "Inexistent directory for the Python script" in readme and "WorkingDirectory=" in readme


def test_an_absolute_python_script_works_from_anywhere_with_storage_beside_the_file(tmp_path, redis_server):
    folder = tmp_path / "checkout"
    config, port = checkout_copy(folder, redis_server.url, PythonScript=str(folder / "plugin" / "orthanc_entry.py"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status, text = run_orthanc(config, port, elsewhere, tmp_path / "orthanc.log")
    assert status == 200, text[-3000:]
    assert (folder / "state" / "orthanc" / "storage").is_dir() and not (elsewhere / "state").exists()
