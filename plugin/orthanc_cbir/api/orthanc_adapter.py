"""Mount the handlers of :mod:`.routes` in Orthanc through its Python plugin.

Orthanc runs every Python callback under one interpreter lock, so a handler here
must stay short: heavy work belongs to the worker processes.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

from ..config import Settings, load_settings
from . import routes


def settings_from_orthanc(orthanc: Any) -> Settings:
    """The settings of the ``Cbir`` section of Orthanc's configuration (and ``CBIR_*`` variables)."""
    return load_settings(orthanc_section=json.loads(orthanc.GetConfiguration()).get("Cbir", {}))


def register(orthanc: Any, settings: Settings) -> None:
    """Register every ``/cbir/...`` route with Orthanc."""
    _get(orthanc, "/cbir/status", lambda request: routes.status(settings))


def _get(orthanc: Any, uri: str, handler: Callable[[dict[str, Any]], routes.Response]) -> None:
    def callback(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        try:
            response = handler(request)
        except Exception as exc:  # the client gets a message, the log gets the trace
            orthanc.LogError(f"cbir: {uri} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            response = routes.Response.error(500, f"internal error ({type(exc).__name__}); see the Orthanc log")
        _send(output, response)

    orthanc.RegisterRestCallback(uri, callback)


def _send(output: Any, response: routes.Response) -> None:
    for name, value in response.headers.items():
        output.SetHttpHeader(name, value)
    if response.status == 200:
        output.AnswerBuffer(response.body, response.content_type)
    else:
        output.SendHttpStatus(response.status, response.body)
