"""The plugin's catch-up after an Orthanc restart (:mod:`orthanc_cbir.ingest.change_log`), against a
fake change log and a fake Redis: what the callback never saw is enqueued again; the cursor only
moves past changes known to be in the stream."""

from __future__ import annotations

from orthanc_cbir.ingest.change_log import ChangeCursor


class FakeRedis(dict):
    def get(self, key):
        return super().get(key)

    def set(self, key, value):
        self[key] = str(value).encode()


def change_log(changes):
    def get_json(path: str):
        if path == "/changes?last":
            return {"Changes": changes[-1:], "Last": changes[-1]["Seq"] if changes else 0, "Done": True}
        since = int(path.split("since=")[1].split("&")[0])
        page = [c for c in changes if c["Seq"] > since]
        return {"Changes": page, "Last": page[-1]["Seq"] if page else since, "Done": True}

    return get_json


CHANGES = [{"Seq": 1, "ChangeType": "NewPatient", "ResourceType": "Patient", "ID": "p"},
           {"Seq": 2, "ChangeType": "NewInstance", "ResourceType": "Instance", "ID": "a"},
           {"Seq": 3, "ChangeType": "NewSeries", "ResourceType": "Series", "ID": "s"},
           {"Seq": 4, "ChangeType": "NewInstance", "ResourceType": "Instance", "ID": "b"},
           {"Seq": 5, "ChangeType": "Deleted", "ResourceType": "Instance", "ID": "a"},
           {"Seq": 6, "ChangeType": "StableStudy", "ResourceType": "Study", "ID": "t"}]  # fmt: skip


def test_the_first_start_only_records_where_the_log_is():
    client, enqueued = FakeRedis(), []
    cursor = ChangeCursor(change_log(CHANGES), client, lambda i, a: enqueued.append((i, a)), lambda: 0, log=print)
    assert cursor.replay() == 0 and enqueued == [] and client["cbir:orthanc-changes-seq"] == b"6"


def test_a_restart_enqueues_again_what_follows_the_cursor():
    client, enqueued = FakeRedis({"cbir:orthanc-changes-seq": b"1"}), []
    cursor = ChangeCursor(change_log(CHANGES), client, lambda i, a: enqueued.append((i, a)), lambda: 0,
                          series_on_stable_study=True, log=print)  # fmt: skip
    assert cursor.replay() == 4
    assert enqueued == [("a", "store"), ("b", "store"), ("a", "delete"), ("t", "stable-study")]
    assert client["cbir:orthanc-changes-seq"] == b"6"


def test_the_cursor_stops_before_the_first_change_the_callback_has_not_handled():
    client = FakeRedis({"cbir:orthanc-changes-seq": b"0"})
    pending = [0]
    cursor = ChangeCursor(change_log(CHANGES), client, lambda i, a: None, lambda: pending[0], log=print)
    cursor.handled("a", "store")
    assert cursor.advance() == 3  # past a and the series, not b
    cursor.handled("b", "store")
    pending[0] = 1  # b may still wait in the enqueue buffer
    assert cursor.advance() == 3
    pending[0] = 0
    cursor.handled("a", "delete")
    assert cursor.advance() == 6  # the stable study is nothing to do without the setting
