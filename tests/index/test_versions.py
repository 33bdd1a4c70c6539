"""Model versions in Redis (index.versions, ``orthanc-cbir indexes``): an old index is dropped only
once the current model's index holds as many instances, and nothing of the current one goes."""

from __future__ import annotations

import pytest

from orthanc_cbir.cli import main
from orthanc_cbir.index import IndexStore
from orthanc_cbir.index.graph_file import GraphFiles
from orthanc_cbir.index.versions import IndexStillNeeded, drop_version, index_versions
from tests.records_factory import make_info, make_records

OLD, NEW = "cbir-old@111111111111", "cbir-new@222222222222"


def keys_of(client, version: str) -> list[bytes]:
    return list(client.scan_iter(match=f"cbir:{{{version}*"))


@pytest.mark.parametrize("shards", [1, 3])
def test_an_old_index_is_dropped_only_once_the_new_one_is_complete(client, shards):
    IndexStore(client, make_info(OLD), shards=shards).add(make_records(40))
    new = IndexStore(client, make_info(NEW), shards=shards)
    new.add(make_records(25))
    assert [(v.version, v.indexed, v.shards) for v in index_versions(client)] == [(NEW, 25, shards), (OLD, 40, shards)]

    with pytest.raises(IndexStillNeeded, match="holds 25 instances"):
        drop_version(client, OLD, current=NEW)
    with pytest.raises(IndexStillNeeded, match="current"):
        drop_version(client, NEW, current=NEW)
    assert keys_of(client, OLD)

    new.add(make_records(40))  # the re-index caught up (the first 25 are already there)
    assert drop_version(client, OLD, current=NEW) > 0
    assert keys_of(client, OLD) == []
    assert [(v.version, v.indexed) for v in index_versions(client)] == [(NEW, 40)]
    assert new.count() == 40 and new.describe([make_records(40)[39].metadata.sop_instance_uid])[0] is not None


def test_the_cli_lists_versions_and_refuses_an_early_drop(client, redis_url, capsys):
    IndexStore(client, make_info(OLD)).add(make_records(5))
    assert main(["indexes", "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert f"{OLD}: 5 instances, 1 shard(s)" in out and "nothing indexed yet (current model)" in out
    assert main(["indexes", "--drop", OLD, "--redis-url", redis_url]) == 1
    assert "holds 0 instances" in capsys.readouterr().err and keys_of(client, OLD)


def test_a_dropped_index_leaves_no_graph_behind_and_the_others_keep_theirs(client, redis_url, tmp_path, monkeypatch):
    old, record = IndexStore(client, make_info(OLD)), make_records(1)[0]
    old.add([record])
    old.remove(record.key)  # nothing left in it: the current index holds as many, it may go
    dropped, kept = GraphFiles(tmp_path, OLD).directory, GraphFiles(tmp_path, NEW).directory
    for folder in (dropped, kept):
        folder.mkdir(parents=True)
        (folder / "current.json").write_text("{}")
    monkeypatch.setenv("CBIR_GRAPH_DIR", str(tmp_path))
    assert main(["indexes", "--drop", OLD, "--redis-url", redis_url]) == 0
    assert keys_of(client, OLD) == [] and not dropped.exists() and (kept / "current.json").exists()
