"""What the spool keeps of a store it refuses (issue 21, item 6): nothing, unless a copy of the
same instance was acknowledged before, whose stream entry still names the file. Real
redis-server, stopped and started again."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.ingest.stow import OUT_OF_RESOURCES, spool_parts
from orthanc_cbir.local_services import RedisServer
from tests import dicom_factory as factory


def _ct() -> tuple[bytes, str]:
    """A small CT file and its SOPInstanceUID."""
    ds = factory.grey_image(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    return factory.to_bytes(ds), str(ds.SOPInstanceUID)


def _stow_part(spool: Spool, data: bytes):
    """A STOW-RS part as the HTTP adapter leaves it: a ``.part-*`` file in the spool directory."""
    part = spool.directory / ".part-test"
    part.write_bytes(data)
    return part


def test_a_store_refused_while_redis_is_down_leaves_nothing_in_the_spool(tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    spool = Spool(tmp_path / "spool", IngestQueue(redis.Redis.from_url(redis_server.url)))
    redis_server.stop()
    data, uid = _ct()
    with pytest.raises(redis.ConnectionError):
        spool.accept(data, uid)
    referenced, failed = spool_parts(spool, [_stow_part(spool, _ct()[0])], None)
    assert referenced == [] and [int(item.FailureReason) for item in failed] == [OUT_OF_RESOURCES]
    assert sorted(path.name for path in spool.directory.iterdir()) == []
    assert spool.pending() == 0 and spool.recover() == 0  # nothing for the next start to index either


def test_a_refused_resend_keeps_the_copy_acknowledged_before(tmp_path):
    """A STOW-RS resend of an instance still waiting for a worker, refused: the earlier copy,
    whose entry is on the stream, stays (the STOW-RS receiver deleted it, so the acknowledged
    instance was never indexed)."""
    redis_server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        queue = IngestQueue(redis.Redis.from_url(redis_server.url))
        spool = Spool(tmp_path / "spool", queue)
        data, uid = _ct()
        accepted = spool.accept(data, uid)
        redis_server.stop()
        referenced, failed = spool_parts(spool, [_stow_part(spool, data)], None)
        assert referenced == [] and [int(item.FailureReason) for item in failed] == [OUT_OF_RESOURCES]
        assert (spool.directory / accepted.name).read_bytes() == data
        redis_server.start()
        assert [event.orthanc_id for event in queue.read("test", block_ms=100)] == [accepted.name]
    finally:
        redis_server.stop()
