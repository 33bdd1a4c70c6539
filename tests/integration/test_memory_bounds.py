"""Decompression bombs sent to a real ``orthanc-cbir serve`` by STOW-RS (issue 17 item 5): a
1 MB Deflated part that inflates to 1 GiB and 2 KB JPEG-LS parts that declare 8192 x 8192, in one
request with ordinary instances. The receiver reads only each part's header, the worker refuses
the bombs as "too large" from their headers, the ordinary instances are indexed, and the
process's peak RSS (VmHWM) grows by less than 300 MB over what indexing an ordinary instance
took (before the fix: 2 GB inside the STOW-RS route, then gigabytes more in the worker)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import requests

from orthanc_cbir.local_services import StandaloneServer
from tests import dicom_factory as factory
from tests.integration.pushing import wait_until
from tests.unit.test_memory_bounds import deflated_bomb, jpeg_ls

pytestmark = pytest.mark.integration

GROWTH_BOUND_MB = 300


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def multipart(*parts: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                    for part in parts) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def ordinary() -> bytes:
    rng = np.random.default_rng()
    return factory.to_bytes(factory.grey_image(rng.integers(0, 4000, (128, 128), dtype=np.uint16)))


def test_bombs_sent_by_stow_rs_are_refused_and_the_server_stays_small(redis_server, tmp_path):
    with StandaloneServer(tmp_path / "serve", redis_url=redis_server.url) as server:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {server.token}"

        def stow(*parts: bytes) -> dict:
            body, content_type = multipart(*parts)
            answer = http.post(server.url + "/dicom-web/studies", data=body, headers={"Content-Type": content_type},
                               timeout=120)  # fmt: skip
            assert answer.status_code == 200, answer.text
            return answer.json()

        def status() -> dict:
            answer = http.get(server.url + "/cbir/status", timeout=10)
            assert answer.status_code == 200, answer.text
            return answer.json()

        stow(ordinary())  # the model loaded and one batch embedded: the process's working size
        wait_until(lambda: status().get("indexed") == 1 and status()["spooled"] == 0, 90, "the first instance")
        before = peak_rss_mb(server.process.pid)

        bombs = [deflated_bomb(2**30)] + [jpeg_ls(8192, 8192) for _ in range(3)]
        stow(*bombs, ordinary())  # one request: one batch for the worker
        stow(ordinary())
        wait_until(lambda: status().get("indexed", 0) >= 3 and status()["spooled"] == 0, 180, "the spool emptied")
        growth = peak_rss_mb(server.process.pid) - before
        print(f"serve's peak RSS {before:.0f} MB after an ordinary instance, grown by {growth:.0f} MB by the bombs")
        assert growth < GROWTH_BOUND_MB, f"serve's peak RSS grew by {growth:.0f} MB (it was {before:.0f} MB)"

        assert status()["indexed"] == 3  # the ordinary ones
        rejected = http.get(server.url + "/cbir/rejected", timeout=10).json()["rejected"]
        assert sorted(item["reason"] for item in rejected) == ["too large"] * len(bombs), json.dumps(rejected)
        assert server.process.poll() is None and "Traceback" not in server.log_tail(400)
