"""``GET /cbir/ui/instances/{id}``: the results page a radiologist opens from a link.

One static HTML file (``static/results.html``, no build step) that asks
``GET /cbir/instances/{id}/similar`` from the browser and draws the query and its
hits as thumbnails (``/cbir/instances/{id}/thumbnail``, :mod:`.thumbnail`) with rank, distance,
modality and body part, a strategy and filter selector, links that open each
hit's study in OHIF and in Orthanc Explorer, and a button that stores the hits as
a "Similar cases" series. The server fills in only the JSON the script starts from.
"""

from __future__ import annotations

import json
from importlib import resources

from ..config import Settings

_TEMPLATE = "results.html"
_SLOT = "__PAGE_DATA__"


CONTENT_TYPE = "text/html; charset=utf-8"


def results_page(settings: Settings, identifier: str, orthanc_id: str | None) -> bytes:
    """The page for the instance ``identifier`` (an Orthanc id or a SOPInstanceUID); ``orthanc_id``
    is its Orthanc id when Orthanc holds it (the query's thumbnail), else ``None``."""
    data = {"id": identifier, "orthancId": orthanc_id, "label": f"instance {identifier}",
            "defaultStrategy": settings.default_strategy, "ohifUrl": settings.ohif_url.rstrip("/")}  # fmt: skip
    # inside <script>, "</" would end the element: JSON's \u003c spelling keeps the data inert
    payload = json.dumps(data).replace("<", "\\u003c")
    page = resources.files(__package__).joinpath("static", _TEMPLATE).read_text(encoding="utf-8")
    return page.replace(_SLOT, payload).encode()
