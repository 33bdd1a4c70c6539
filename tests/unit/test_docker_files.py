"""The container files: the generated Orthanc configuration and the entry point's guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def container_configuration(tmp_path: Path, allowed_aets: str | None,
                            target_name: str = "orthanc.json") -> tuple[subprocess.CompletedProcess, Path]:  # fmt: skip
    """Run docker/orthanc_config.py as the entry point does, ``CBIR_DICOM_ALLOWED_AETS`` set to
    ``allowed_aets`` (``None``: unset), writing ``target_name`` under ``tmp_path``."""
    target = tmp_path / target_name
    env = {"PATH": "/usr/bin:/bin"} | ({} if allowed_aets is None else {"CBIR_DICOM_ALLOWED_AETS": allowed_aets})
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "orthanc_config.py"), str(ROOT / "orthanc.json"),
                           str(target)], env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    return done, target


def test_container_configuration_keeps_authentication_and_takes_the_password_from_the_environment(tmp_path):
    done, target = container_configuration(tmp_path, "PACS")
    assert done.returncode == 0, done.stderr
    config = json.loads(target.read_text())
    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"cbir": "${ORTHANC_PASSWORD}"}
    assert config["PythonScript"] == "/opt/orthanc-cbir/plugin/orthanc_entry.py"
    assert config["Cbir"]["RedisUrl"] == "redis://redis:6379/0"
    assert config["StorageDirectory"].startswith("/var/lib/orthanc-cbir")


def test_orthancs_dicom_server_stores_only_what_the_listed_ae_titles_send(tmp_path):
    # in a folder to be made, as /etc/orthanc-cbir is in the image
    done, target = container_configuration(tmp_path, " PACS_MAIN, CT-2 ,,PACS_MAIN", "etc/orthanc-cbir/orthanc.json")
    assert done.returncode == 0, done.stderr
    config = json.loads(target.read_text())
    assert config["DicomAlwaysAllowStore"] is False and config["DicomAlwaysAllowEcho"] is False
    assert config["DicomCheckModalityHost"] is False  # told by AE title: the PACS's address is not known here
    modalities = config["DicomModalities"].values()
    assert sorted(modality["AET"] for modality in modalities) == ["CT-2", "PACS_MAIN"]
    for modality in modalities:  # they may send, not read what Orthanc holds
        assert modality["AllowStore"] is True and modality["AllowEcho"] is True
        assert modality["AllowFind"] is False and modality["AllowMove"] is False and modality["AllowGet"] is False


def test_a_star_lets_orthanc_store_from_any_ae_title(tmp_path):
    done, target = container_configuration(tmp_path, "*")
    assert done.returncode == 0, done.stderr
    config = json.loads(target.read_text())
    assert config["DicomAlwaysAllowStore"] is True
    assert not config.get("DicomModalities")


@pytest.mark.parametrize("allowed_aets", [None, "", " , "])
def test_no_container_configuration_without_a_list_of_ae_titles(tmp_path, allowed_aets):
    done, target = container_configuration(tmp_path, allowed_aets)
    assert done.returncode == 1 and "CBIR_DICOM_ALLOWED_AETS" in done.stderr
    assert not target.exists()


@pytest.mark.parametrize("title", ["SEVENTEEN_CHARS_X", "BACK\\SLASH"])
def test_no_container_configuration_with_what_is_no_ae_title(tmp_path, title):
    done, target = container_configuration(tmp_path, f"PACS,{title}")
    assert done.returncode == 1 and "is no AE title" in done.stderr and "CBIR_DICOM_ALLOWED_AETS" in done.stderr
    assert not target.exists()


def test_entry_point_refuses_to_start_orthanc_without_a_password():
    done = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh")], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1 and "ORTHANC_PASSWORD" in done.stderr


@pytest.mark.parametrize("allowed_aets", [None, ""])
def test_entry_point_refuses_to_start_orthanc_without_a_list_of_ae_titles(allowed_aets):
    env = {"PATH": "/usr/bin:/bin", "ORTHANC_PASSWORD": "secret"}
    if allowed_aets is not None:
        env["CBIR_DICOM_ALLOWED_AETS"] = allowed_aets
    done = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh")], env=env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 1 and "CBIR_DICOM_ALLOWED_AETS" in done.stderr
