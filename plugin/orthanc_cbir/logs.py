"""How the command-line processes log: to stderr, one line a record, pydicom silent."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    """Log to stderr. pydicom's own messages can quote element values (names included)
    and log every refused decoder plugin with a trace: outcomes say what matters, so
    they stay silent."""
    import pydicom  # noqa: F401  (importing it sets its logger's level: set ours after)

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
