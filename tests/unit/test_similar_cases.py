"""The "Similar cases" objects, built from DICOM the test makes: what each image shows, whose
identity the objects carry, and when a key object selection exists."""

from __future__ import annotations

import numpy as np

from orthanc_cbir.answers.similar_cases import (
    CAPTION_HEIGHT,
    IMAGE_SIZE,
    SimilarCase,
    key_object_selection,
    render_case,
    secondary_capture_series,
)
from orthanc_cbir.dicom import extract_metadata
from orthanc_cbir.dicom.own_output import is_own_output
from tests import dicom_factory as factory

GRADIENT = np.tile(np.linspace(0, 1, 100, dtype=np.float32), (50, 1))


def case(rank: int, *, pixels=GRADIENT, reference=None, same_patient=False, withheld=None) -> SimilarCase:
    return SimilarCase(rank, 0.25 * rank, "exact", "CT", "CHEST", same_patient, pixels, withheld, reference)


def test_a_case_picture_shows_the_hit_above_a_caption_band():
    picture = render_case(case(1))
    assert picture.shape == (IMAGE_SIZE + CAPTION_HEIGHT, IMAGE_SIZE) and picture.dtype == np.uint8
    assert picture[IMAGE_SIZE // 2, 10] < 30 and picture[IMAGE_SIZE // 2, IMAGE_SIZE - 10] > 220  # the gradient
    caption = picture[IMAGE_SIZE:]
    assert 0.02 < (caption < 128).mean() < 0.5  # dark text on a white band


def test_a_withheld_case_is_a_grey_panel():
    picture = render_case(case(2, pixels=None, withheld="another patient's image (switched off)"))
    assert np.mean(picture[:IMAGE_SIZE] == 48) > 0.9


def test_the_series_takes_identity_from_the_query_only_and_keeps_rank_order():
    query = factory.grey_image(np.zeros((8, 8), np.uint16))
    images = secondary_capture_series(query, [case(1), case(2), case(3)])
    assert [int(ds.InstanceNumber) for ds in images] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    for ds in images:
        assert (ds.PatientID, ds.StudyInstanceUID) == (query.PatientID, query.StudyInstanceUID)
        assert ds.SeriesInstanceUID != query.SeriesInstanceUID and ds.BurnedInAnnotation == "NO"
        assert is_own_output(extract_metadata(ds))
    assert not is_own_output(extract_metadata(query))


def test_there_is_no_key_object_selection_without_a_hit_in_the_query_study():
    query = factory.grey_image(np.zeros((8, 8), np.uint16))
    elsewhere = factory.grey_image(np.zeros((8, 8), np.uint16))
    assert key_object_selection(query, [case(1), case(2, reference=elsewhere, same_patient=True)]) is None
    here = factory.grey_image(np.zeros((8, 8), np.uint16), StudyInstanceUID=query.StudyInstanceUID)
    kos = key_object_selection(query, [case(1), case(2, reference=here, same_patient=True)])
    references = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence
                  if item.ValueType == "IMAGE"]  # fmt: skip
    assert references == [here.SOPInstanceUID] and kos.StudyInstanceUID == query.StudyInstanceUID


def identified(**attributes):
    """A header of a patient (the factory's name, ID and the birth date below), with ``attributes``."""
    return factory.grey_image(np.zeros((2, 2), dtype=np.uint16), **{"PatientBirthDate": "19600101", **attributes})


def test_the_same_patient_has_the_same_id_issuer_birth_date_and_name():
    from orthanc_cbir.answers.similar_cases import same_patient

    query = identified(IssuerOfPatientID="SITE-A")
    assert same_patient(query, identified(IssuerOfPatientID="SITE-A"))
    assert same_patient(
        query, identified(IssuerOfPatientID=" SITE-A", PatientName=str(query.PatientName).lower() + "^^")
    )
    assert not same_patient(query, identified())  # no issuer: another site's numbering
    assert not same_patient(query, identified(IssuerOfPatientID="SITE-B"))
    assert not same_patient(query, identified(IssuerOfPatientID="SITE-A", PatientBirthDate="19600102"))
    assert not same_patient(query, identified(IssuerOfPatientID="SITE-A", PatientName="Someone^Else"))
    # a different person sharing the query's PatientID without an issuer is not "this patient"
    assert not same_patient(identified(), identified(PatientName="Other^Person", PatientBirthDate="19770707"))
    assert not same_patient(identified(PatientID=""), identified(PatientID=""))


def test_another_patients_pixels_only_when_the_file_declares_no_burned_in_text():
    from orthanc_cbir.answers.similar_cases import withheld_reason

    query = identified()
    other = {"PatientName": "Other^Person", "PatientID": "OTHER-1"}
    assert withheld_reason(query, identified(BurnedInAnnotation="NO", **other)) is None
    assert "burned-in" in withheld_reason(query, identified(**other))  # absent: a grey panel by default
    assert "burned-in" in withheld_reason(query, identified(BurnedInAnnotation="YES", **other))
    assert withheld_reason(query, identified(**other), other_patients=True) is None  # turned on explicitly
    assert withheld_reason(query, identified(BurnedInAnnotation="YES", **other), other_patients=True)
    assert withheld_reason(query, identified(BurnedInAnnotation="YES")) is None  # the query's own images are drawn
