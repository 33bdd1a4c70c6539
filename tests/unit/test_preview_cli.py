"""`orthanc-cbir preview`: one line per file, a contact sheet, exit 0 when all files ended."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from orthanc_cbir import cli
from tests import dicom_factory as factory


def test_preview_prints_one_line_per_file_and_draws_the_sheet(tmp_path, capsys):
    ct = tmp_path / "ct.dcm"
    factory.grey_image(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), RescaleSlope=1, RescaleIntercept=-1024,
                       BodyPartExamined="CHEST").save_as(ct, enforce_file_format=True)  # fmt: skip
    sr = tmp_path / "report.dcm"
    factory.structured_report().save_as(sr, enforce_file_format=True)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all")
    out = tmp_path / "sheet" / "grid.png"

    status = cli.main(["preview", str(ct), str(sr), str(notes), "--out", str(out), "--columns", "3"])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[0].startswith(f"{ct}: image 64x64 CT CHEST, frame 1/1; decoder: pydicom")
    assert "display VOI: none in file; CT lung default centre -600 width 1500" in lines[0]
    assert lines[1] == f"{sr}: rejected: not an image: Comprehensive SR Storage has no pixel data"
    assert lines[2].startswith(f"{notes}: rejected: not DICOM")
    sheet = Image.open(out)
    assert sheet.width == 3 * 256 and sheet.height > 256


def test_preview_walks_folders(tmp_path, capsys):
    for i in range(3):
        factory.grey_image(np.full((8, 8), i, dtype=np.uint16), sop_class=factory.MR_IMAGE,
                           modality="MR").save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)  # fmt: skip
    assert cli.main(["preview", str(tmp_path), "--out", str(tmp_path / "out" / "g.png")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_console_script_runs_without_arguments_and_explains_itself():
    done = subprocess.run([sys.executable, "-m", "orthanc_cbir.cli"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "preview" in done.stdout
