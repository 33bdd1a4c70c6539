"""One settings object for every adapter (Orthanc plugin, worker, CLI).

Where a value comes from, strongest first:

1. a CLI flag (passed to :func:`load_settings` as an override);
2. an environment variable ``CBIR_<FIELD>`` (``CBIR_REDIS_URL``);
3. inside Orthanc, the ``Cbir`` section of its configuration, keys in CamelCase
   (``"RedisUrl"``);
4. the default below.

>>> load_settings(env={"CBIR_FRAMES_PER_INSTANCE": "3"}).frames_per_instance
3
>>> load_settings(orthanc_section={"RedisUrl": "redis://cache:6379/2"}, env={}).redis_url
'redis://cache:6379/2'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "CBIR_"
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "onnx_models" / "cbir-resnet-64.onnx"
"""The model this checkout ships."""


@dataclass(frozen=True)
class Settings:
    """Everything an operator can set. Each field's docstring says what it does."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis that holds the index, the ingest stream and the rejected list."""

    redis_password: str = ""
    """Password of Redis (``requirepass``), used when ``redis_url`` carries none; prefer the
    CBIR_REDIS_PASSWORD variable to writing it in a file. Unlike a password in the URL it needs no
    quoting (``@``, ``/``, ``%``...). TLS: a ``rediss://`` URL."""

    redis_cluster: bool = False
    """``redis_url`` names a node of a Redis Cluster: the client finds the others and sends each
    key to the master that owns it (:mod:`orthanc_cbir.redis_client`)."""

    index_shards: int = 1
    """Shards of the index (``cbir:{<version>#<shard>}`` key spaces; on a cluster, each one's keys
    live on one master). The index records the number when it is first written; a process
    told another one refuses to start on it, so every process must say the same."""

    frames_per_instance: int = 1
    """Frames of a multi-frame instance that become index entries, spread evenly
    (1 = the middle frame)."""

    max_file_bytes: int = 2 * 2**30
    """Largest DICOM file (or query upload) a worker decodes; a larger one is rejected as "too large"."""

    max_pixels_per_frame: int = 64 * 2**20
    """Largest frame (rows x columns x samples) a worker decodes; a larger one is rejected as "too
    large" before its pixels are allocated. Which frames are decoded is ``frames_per_instance``."""

    model: str = str(DEFAULT_MODEL)
    """The ONNX retrieval model; its card (same name, .json) must sit beside it."""

    embed_threads: int = 2
    """onnxruntime threads per embedder (per worker process)."""

    embed_batch_size: int = 32
    """Images per onnxruntime call."""

    regions: bool = False
    """Also index regions of each single-frame CT and MR image (:mod:`orthanc_cbir.model.regions`):
    what "Similar regions" in OHIF searches. It costs about 63 KB of Redis per image (122 patches
    of 516 bytes) and 244 more model inputs per image; ``benchmarks/regions.py`` measures both."""

    default_strategy: str = "graph"
    """Strategy of a similarity query that names none (graph, exact, hamming, class, cluster, multilateral)."""

    max_results: int = 100
    """Largest ``k`` a similarity query may ask for."""

    orthanc_url: str = "http://127.0.0.1:8042"
    """Orthanc's REST API, where workers fetch the stored files."""

    orthanc_username: str = ""
    """User for the workers' REST calls (empty: no authentication)."""

    orthanc_password: str = ""
    """Its password; prefer the CBIR_ORTHANC_PASSWORD variable to writing it in a file."""

    worker_batch_size: int = 32
    """Stream entries a worker takes, decodes and embeds together."""

    claim_after_s: float = 60.0
    """An entry a worker took but did not acknowledge for this long goes to another worker."""

    ingest_stream: str = "cbir:ingest"
    """The Redis stream (with its consumer group) between the receivers and the workers. Each
    deployment sharing a Redis needs its own: Orthanc's workers fetch from Orthanc, a standalone
    server's read its spool, and a worker refuses a stream that the other kind already reads."""

    enqueue_buffer_size: int = 100_000
    """Orthanc plugin: changes (stored, deleted instances) kept in memory while Redis does not
    answer, added to the ingest stream once it does; more are counted in Orthanc's log and left
    to ``orthanc-cbir reconcile``, as is what is kept when Orthanc stops."""

    similar_series_on_stable_study: bool = False
    """Make a "Similar cases" series (and a key object selection) in every study once Orthanc
    calls it stable (``StableAge`` seconds after its last instance)."""

    similar_series_parameters: str = "exclude=same-study"
    """Search parameters of a "Similar cases" series, as a query string (``k=10&strategy=exact``);
    a ``POST .../similar/series`` request may override each. The default leaves out the query's
    own study: a reader wants other cases, not the images already on screen."""

    similar_series_other_patients: bool = False
    """Draw another patient's image in "Similar cases" (never its identifiers) even when its file
    does not say ``BurnedInAnnotation`` NO; off (default), only a file that says NO is drawn, any
    other is a grey panel that says why. A file that says YES never is
    (:func:`orthanc_cbir.answers.similar_cases.withheld_reason`)."""

    ohif_url: str = ""
    """The OHIF viewer the results page links each hit's study to (empty: the page's own origin,
    as when ``orthanc-cbir viewer`` serves OHIF, Orthanc and the page together)."""

    spool_dir: str = "spool"
    """Standalone server (``orthanc-cbir serve``): where received instances wait, on disk, until a
    worker has indexed them (workers of a standalone server must see this directory)."""

    graph_dir: str = ""
    """Where the ``graph`` strategy's HNSW graph is written once built and read back: by every
    process on this host that answers queries over the index (the Orthanc plugin, ``serve``, the
    workers making "Similar cases" series), and by each when it starts again, instead of each
    building its own (about 4 minutes of a core at 10^6 instances). Empty: each process builds
    its own and keeps it in memory only. Give the processes one directory (a shared volume)."""

    scp_aet: str = "CBIR"
    """Standalone server: the DICOM AE title of its C-STORE SCP."""

    scp_host: str = "127.0.0.1"
    """Standalone server: the address its DICOM SCP listens on (``0.0.0.0`` for a PACS on the network)."""

    scp_port: int = 11112
    """Standalone server: the DICOM port (0 = no SCP)."""

    scp_allowed_aets: str = ""
    """Standalone server: calling AE titles allowed to associate, comma-separated; ``*`` admits any.
    Empty admits any too, but only while ``scp_host`` is a loopback address: off loopback the
    server refuses to start without a list (or ``*``)."""

    scp_processes: int = 1
    """Standalone server: processes that receive on the DICOM port (1 = the server's own). pynetdicom
    runs every association in a thread of one interpreter, so one process receives 100-170 instances/s
    however many associations a PACS opens; each more process (``SO_REUSEPORT``: the kernel hands it
    a share of the associations, Linux only) adds to that where the host has a core for it. They all
    write the one spool and stream."""

    http_host: str = "127.0.0.1"
    """Standalone server: the address its HTTP API listens on."""

    http_port: int = 8043
    """Standalone server: the HTTP port (routes as in Orthanc, OpenAPI at /docs, STOW-RS)."""

    http_token: str = ""
    """Standalone server: the bearer token clients send (``Authorization: Bearer ...``)."""

    http_username: str = ""
    """Standalone server: HTTP Basic user (with ``http_password``); empty with an empty token
    means no authentication, which the server allows on loopback only."""

    http_password: str = ""
    """Standalone server: HTTP Basic password; prefer the CBIR_HTTP_PASSWORD variable."""

    viewer_allowed_hosts: str = ""
    """``orthanc-cbir viewer``: the ``Host`` names it answers to, comma-separated (``name`` for any
    port, ``name:port``); anything else is refused, which defeats DNS rebinding. Empty: the
    loopback names and addresses with the viewer's port (and its ``--host`` address). Behind a
    reverse proxy, the name users type (``viewer.hospital.example``)."""

    log_level: str = "INFO"
    """Python logging level of the worker and CLI (Orthanc has its own verbosity)."""

    audit_retention_days: float = 365.0
    """How long the audit trail (``cbir:audit``: who asked for similar images of which query, and
    the hits' StudyInstanceUIDs) keeps an entry; 0 keeps every one. ``GET /cbir/audit`` reads it."""

    audit_readers: str = ""
    """Orthanc users allowed to read ``GET /cbir/audit``, comma-separated (empty: every Orthanc
    user). In the standalone server whoever holds its token (or Basic user) may."""

    http_token_name: str = "token"
    """Standalone server: the user name the audit trail records for a request with ``http_token``."""

    max_query_bytes: int = 64 * 2**20
    """Largest ``POST /cbir/query`` body. Orthanc refuses a larger declared Content-Length (403)
    before it reads the body; the standalone server answers 413."""

    dicomweb_deadline_s: float = 300.0
    """``orthanc-cbir backfill``: the most one DICOMweb answer may take, start to end (the connection's
    own timeout only bounds the wait between two bytes: a server dripping a byte a second was never
    cut). Past it the run stops with a message; the next run resumes."""

    max_worker_waits: int = 4
    """Requests that wait for a worker at once in one server (``POST /cbir/query``, ``POST
    .../similar/series``); more are answered 429 at once, so that Orthanc keeps its HTTP threads
    (``HttpThreadsCount``, 50) for everything else, the workers' own REST calls included."""

    patient_key_secret: str = ""
    """Key of the HMAC that turns issuer and PatientID into the index's patient key (the
    ``exclude=same-patient`` filter). Keep it out of Redis and give every process of a deployment
    the same one (``CBIR_PATIENT_KEY_SECRET``); empty uses a built-in key, which anyone holding
    the index and this source can test MRNs against. Changing it needs a re-index."""

    def decode_limits(self) -> dict[str, int]:
        """``max_file_bytes`` and ``max_pixels_per_frame`` as keyword arguments of the pixel step's
        decoders: every entry point (worker, ``index``, ``query``, ``preview``, backfill, the
        "Similar cases" pictures) decodes under the same configured limits."""
        return {"max_file_bytes": self.max_file_bytes, "max_pixels_per_frame": self.max_pixels_per_frame}

    @property
    def graph_path(self) -> Path | None:
        """:attr:`graph_dir` as a path, ``None`` when it is empty (each process builds its own graph)."""
        return Path(self.graph_dir) if self.graph_dir else None


def load_settings(
    orthanc_section: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from the Orthanc ``Cbir`` section, the environment and overrides.

    ``overrides`` whose value is ``None`` are ignored, so CLI flags that were not
    given can be passed straight through.

    Raises:
        ValueError: a value cannot be read as its field's type, or a key is unknown.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    for key, value in (orthanc_section or {}).items():
        name = _snake_case(key)
        if name not in fields:
            raise ValueError(f"unknown setting {key!r} in the Cbir section (known: {', '.join(sorted(fields))})")
        values[name] = value
    for name in fields:
        if ENV_PREFIX + name.upper() in env:
            values[name] = env[ENV_PREFIX + name.upper()]
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    return Settings(**{name: _coerce(name, fields[name].type, value) for name, value in values.items()})


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in {"1", "true", "yes", "on"}:
                return True
            if text.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ValueError(f"setting {name} must be {kind.__name__}, got {value!r}") from None


def _snake_case(key: str) -> str:
    out = []
    for i, char in enumerate(key):
        if char.isupper() and i and not key[i - 1].isupper():
            out.append("_")
        out.append(char.lower())
    return "".join(out)
