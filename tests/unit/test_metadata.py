"""The metadata record: what is kept, how values are parsed, and that identity is not kept."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from orthanc_cbir.dicom import extract_metadata, parse_age, parse_da
from tests import dicom_factory as factory


@pytest.mark.parametrize(
    ("value", "years"),
    [("063Y", 63.0), ("006M", 0.5), ("052W", 0.997), ("010D", 0.027), (" 045Y", 45.0), ("45", None), ("", None),
     ("0XXY", None)],
)
def test_patient_age_is_parsed_to_years(value, years):
    assert parse_age(value) == (pytest.approx(years, abs=1e-3) if years is not None else None)


@pytest.mark.parametrize(
    ("value", "date"),
    [("20240131", dt.date(2024, 1, 31)), ("2024.01.31", dt.date(2024, 1, 31)), ("20241340", None), ("", None),
     (None, None)],
)
def test_study_date_is_parsed_from_da(value, date):
    assert parse_da(value) == date


def test_record_holds_uids_modality_and_geometry():
    ds = factory.grey_image(np.zeros((4, 6), dtype=np.uint16), BodyPartExamined="chest", PixelSpacing=[0.7, 0.8],
                            SliceLocation="-120.5", ImagePositionPatient=[-200, -180, -120.5])  # fmt: skip
    record = extract_metadata(ds)
    assert record.sop_instance_uid == ds.SOPInstanceUID
    assert record.series_instance_uid == ds.SeriesInstanceUID and record.study_instance_uid == ds.StudyInstanceUID
    assert record.sop_class_uid == factory.CT_IMAGE
    assert (record.modality, record.body_part_examined, record.patient_sex) == ("CT", "CHEST", "F")
    assert record.patient_age_years == 63.0 and record.study_date == dt.date(2024, 1, 31)
    assert (record.rows, record.columns, record.number_of_frames) == (4, 6, 1)
    assert record.pixel_spacing_mm == (0.7, 0.8) and record.slice_location == -120.5
    assert record.image_position_patient == (-200.0, -180.0, -120.5)
    assert record.study_description == "CT CHEST" and record.manufacturer == "TestVendor"


def test_age_falls_back_to_birth_date_and_study_date():
    ds = factory.grey_image(np.zeros((2, 2), dtype=np.uint16), PatientBirthDate="19940131")
    del ds.PatientAge
    assert extract_metadata(ds).patient_age_years == pytest.approx(30.0, abs=0.01)


def test_record_keeps_no_patient_identity_but_a_stable_key():
    first = factory.grey_image(np.zeros((2, 2), dtype=np.uint16))
    second = factory.grey_image(np.zeros((2, 2), dtype=np.uint16))
    other = factory.grey_image(np.zeros((2, 2), dtype=np.uint16), PatientID="SOMEONE-ELSE")
    records = [extract_metadata(ds) for ds in (first, second, other)]
    text = json.dumps([record.to_json() for record in records])
    assert factory.PATIENT_ID not in text and "Doe" not in text
    assert records[0].patient_key == records[1].patient_key != records[2].patient_key


def test_malformed_values_become_none_instead_of_raising():
    ds = factory.grey_image(np.zeros((2, 2), dtype=np.uint16), PatientSex="unknown", StudyDate="yesterday")
    ds.PatientAge = "sixty"
    ds.add_new(0x00280030, "DS", None)  # PixelSpacing present but empty
    record = extract_metadata(ds)
    assert (record.patient_sex, record.study_date, record.patient_age_years, record.pixel_spacing_mm) == (None,) * 4
    assert json.loads(json.dumps(record.to_json()))["study_date"] is None


@pytest.fixture
def key_secret(monkeypatch):
    """The patient key's secret as the environment gives it; reset afterwards."""
    from orthanc_cbir.dicom.metadata import use_patient_key_secret

    monkeypatch.delenv("CBIR_PATIENT_KEY_SECRET", raising=False)
    use_patient_key_secret(None)
    yield monkeypatch
    use_patient_key_secret(None)


def test_the_patient_key_is_a_keyed_hmac_not_a_hash_anyone_can_recompute(key_secret):
    import hashlib
    import hmac

    from orthanc_cbir.dicom.metadata import patient_key, use_patient_key_secret

    ds = factory.grey_image(np.zeros((2, 2), dtype=np.uint16), PatientID="1234567", IssuerOfPatientID="HOSP")
    unkeyed = hashlib.sha256(b"HOSP\x001234567").hexdigest()[:16]  # what an attacker with the index tries
    use_patient_key_secret("site-secret-1")
    first = extract_metadata(ds).patient_key
    assert first == hmac.new(b"site-secret-1", b"HOSP\x001234567", hashlib.sha256).hexdigest()[:16] != unkeyed
    assert extract_metadata(ds).patient_key == first  # stable: exclude=same-patient still matches
    use_patient_key_secret("site-secret-2")
    assert patient_key("1234567", "HOSP") != first
    assert patient_key("1234567", "OTHER") != patient_key("1234567", "HOSP")
    assert patient_key("") is None and patient_key(None) is None


def test_every_process_takes_the_secret_from_the_setting_in_its_environment(key_secret):
    import hashlib
    import hmac

    from orthanc_cbir.dicom.metadata import patient_key, use_patient_key_secret

    key_secret.setenv("CBIR_PATIENT_KEY_SECRET", "from-the-environment")
    use_patient_key_secret(None)  # as a worker or CLI process starts: nothing set explicitly
    assert patient_key("1234567") == hmac.new(b"from-the-environment", b"\x001234567", hashlib.sha256).hexdigest()[:16]
    key_secret.delenv("CBIR_PATIENT_KEY_SECRET")
    use_patient_key_secret(None)
    built_in = patient_key("1234567")  # no secret: a built-in key, still not the bare hash
    assert built_in != hashlib.sha256(b"\x001234567").hexdigest()[:16]


@pytest.mark.parametrize(
    ("orientation", "position"),
    [([1, 0, 0, 0, 1, 0], -120.5),  # axial
     ([1, 0, 0, 0, 0.94, -0.342], -120.5),  # a 20 degree gantry tilt: still one level
     ([1, 0, 0, 0, 0, -1], None),  # coronal: every row at another level
     ([0, 1, 0, 0, 0, -1], None),  # sagittal
     ([0, 0, 0, 0, 0, 0], None)],  # no direction at all
)
def test_an_axial_slice_says_where_it_lies_along_the_body_and_no_other_image_does(orientation, position):
    ds = factory.grey_image(np.zeros((4, 6), dtype=np.uint16), ImagePositionPatient=[-200, -180, -120.5],
                            ImageOrientationPatient=orientation)  # fmt: skip
    record = extract_metadata(ds)
    assert record.image_orientation_patient == tuple(float(v) for v in orientation)
    assert record.axial_position_mm == position


def test_a_slice_without_its_orientation_or_position_has_no_position_along_the_body():
    no_orientation = factory.grey_image(np.zeros((4, 6), dtype=np.uint16), ImagePositionPatient=[0, 0, 10])
    no_position = factory.grey_image(np.zeros((4, 6), dtype=np.uint16), ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    assert extract_metadata(no_orientation).axial_position_mm is None
    assert extract_metadata(no_position).axial_position_mm is None
