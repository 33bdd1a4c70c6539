"""The script Orthanc's Python plugin loads (``"PythonScript"`` in orthanc.json).

It only wires Orthanc to the ``orthanc_cbir`` package: the package and its
dependencies come from the project's virtual environment beside this folder
(``../.venv``, built with the same Python 3.11 that the plugin embeds).
An exception here would stop Orthanc, so a broken environment is reported in
Orthanc's log and the routes are simply not registered.
"""

import os
import site
import sys

import orthanc

_HERE = os.path.dirname(os.path.abspath(__file__))
_SITE_PACKAGES = os.path.join(_HERE, "..", ".venv", "lib", "python3.11", "site-packages")

site.addsitedir(os.path.normpath(_SITE_PACKAGES))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

try:
    from orthanc_cbir.api import orthanc_adapter

    orthanc_adapter.register(orthanc, orthanc_adapter.settings_from_orthanc(orthanc))
    orthanc.LogWarning("cbir: routes registered under /cbir/")
except Exception as exc:  # noqa: BLE001 - keep Orthanc up; the log says why the plugin is idle
    orthanc.LogError(f"cbir: plugin not started: {type(exc).__name__}: {exc}")
