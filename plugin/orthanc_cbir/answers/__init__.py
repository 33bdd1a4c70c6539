"""Answers: what a search becomes for the people who asked.

:mod:`.hits` (a hit as JSON), :mod:`.dicom_json` (a hit as a QIDO-RS object), :mod:`.results_page`
(the page a radiologist opens), :mod:`.thumbnail` (a hit's picture), :mod:`.similar_cases` (the
"Similar cases" Secondary Capture series and key object selection, built by highdicom) and
:mod:`.similar_series` (searching, fetching the hits and storing that series in the query's
study). They take typed hits from the similarity core (:mod:`orthanc_cbir.search.service`) and
raise :mod:`orthanc_cbir.errors`; the adapters (:mod:`orthanc_cbir.api`, the CLI) turn them
into HTTP answers.
"""
