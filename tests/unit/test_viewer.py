"""Fetching the OHIF viewer (with a stand-in npm: no network) and its generated configuration."""

from __future__ import annotations

import io
import json
import re
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from orthanc_cbir import viewer
from orthanc_cbir.viewer import (
    OhifError,
    app_config_js,
    ensure_extension,
    ensure_ohif,
    extension_present,
    ohif_dist,
    ohif_present,
    passed_to_orthanc,
    sri_sha512,
)


def test_sri_is_npms_integrity_format(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # The published SRI of zero bytes.
    assert (
        sri_sha512(empty)
        == "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
    )


def make_tarball(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o777
            archive.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return path


def fake_npm(tmp_path: Path, tarball: Path) -> Path:
    """An ``npm`` that 'packs' ``tarball`` into --pack-destination, and logs each call."""
    script = tmp_path / "npm"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path / "npm.calls"}
while [ $# -gt 0 ]; do [ "$1" = "--pack-destination" ] && cp {tarball} "$2/"; shift; done
echo '[]'
""")
    script.chmod(0o755)
    return script


GOOD = {"package/package.json": b"{}", "package/dist/index.html": b"<html>", "package/dist/sub/app.js": b"x"}


def test_fetches_once_and_keeps_only_dist(tmp_path, monkeypatch):
    tarball = make_tarball(tmp_path / "ohif-app.tgz", GOOD)
    monkeypatch.setattr(viewer, "OHIF_INTEGRITY", sri_sha512(tarball))
    npm = fake_npm(tmp_path, tarball)
    cache = tmp_path / "cache"
    dist = ensure_ohif(cache, npm=str(npm))
    assert dist == ohif_dist(cache) and ohif_present(cache)
    assert sorted(str(p.relative_to(dist)) for p in dist.rglob("*") if p.is_file()) == ["index.html", "sub/app.js"]
    assert stat.S_IMODE((dist / "index.html").stat().st_mode) == 0o644
    assert json.loads((dist.parent / ".complete").read_text())["files"] == 2
    assert ensure_ohif(cache, npm=str(npm)) == dist
    assert len((tmp_path / "npm.calls").read_text().splitlines()) == 1  # the second call fetched nothing
    assert sorted(p.name for p in cache.iterdir()) == [dist.parent.name]  # no tarball or scratch left


def test_refuses_a_tarball_that_is_not_the_pinned_one(tmp_path):
    tarball = make_tarball(tmp_path / "ohif-app.tgz", GOOD)  # OHIF_INTEGRITY is the real package's
    cache = tmp_path / "cache"
    with pytest.raises(OhifError, match="expected the pinned"):
        ensure_ohif(cache, npm=str(fake_npm(tmp_path, tarball)))
    assert not ohif_present(cache) and list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "members, symlink",
    [({**GOOD, "package/dist/../../evil": b"x"}, None), (GOOD, "package/dist/passwd")],
    ids=["dot-dot", "symlink"],
)
def test_refuses_unsafe_members(tmp_path, monkeypatch, members, symlink):
    tarball = make_tarball(tmp_path / "ohif-app.tgz", members, symlink=symlink)
    monkeypatch.setattr(viewer, "OHIF_INTEGRITY", sri_sha512(tarball))
    with pytest.raises(OhifError, match="unsafe|not a plain file"):
        ensure_ohif(tmp_path / "cache", npm=str(fake_npm(tmp_path, tarball)))
    assert not (tmp_path / "evil").exists()


def test_missing_npm_is_a_clear_error(tmp_path):
    with pytest.raises(OhifError, match="not found"):
        ensure_ohif(tmp_path, npm="no-such-npm-here")


def test_app_config_has_one_same_origin_dicomweb_source():
    text = app_config_js()
    config = json.loads(re.search(r"window\.config = (\{.*\});", text, re.DOTALL).group(1))
    (source,) = config["dataSources"]
    assert config["defaultDataSourceName"] == source["sourceName"] == "dicomweb"
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["qidoRoot"] == settings["wadoRoot"] == settings["wadoUriRoot"] == "/dicom-web"
    assert settings["imageRendering"] == settings["thumbnailRendering"] == "wadors"


def test_app_config_lists_the_extension_and_mode_only_when_served():
    def lists(text: str) -> tuple[list[str], list[str]]:
        config = json.loads(re.search(r"window\.config = (\{.*\});", text, re.DOTALL).group(1))
        return config["extensions"], config["modes"]

    assert lists(app_config_js()) == ([], [])
    assert lists(app_config_js(extension=True)) == (["/orthanc-cbir-ohif/extension.js"], ["/orthanc-cbir-ohif/mode.js"])


def test_only_what_ohif_and_the_results_page_read_is_passed_to_orthanc():
    def passed(method: str, path: str) -> bool:
        return passed_to_orthanc(method, path.split("/")[1:])

    for path in ("/dicom-web/studies", "/dicom-web/studies/1.2/series/3.4/metadata", "/dicom-web/series",
                 "/dicom-web/instances", "/wado", "/instances/abc-123/preview", "/cbir/status"):  # fmt: skip
        assert passed("GET", path) and passed("HEAD", path), path
    assert passed("POST", "/cbir/instances/abc/similar/series")
    for method, path in [("POST", "/dicom-web/studies"), ("DELETE", "/dicom-web/studies/1.2"), ("POST", "/instances"),
                         ("GET", "/instances"), ("GET", "/instances/abc/file"), ("DELETE", "/instances/abc"),
                         ("GET", "/dicom-web/servers"), ("GET", "/dicom-web"), ("GET", "/wado/x"), ("POST", "/wado"),
                         ("POST", "/tools/shutdown"), ("GET", "/tools/find"), ("POST", "/lua"), ("GET", "/system"),
                         ("GET", "/patients"), ("GET", "/app/explorer.html"),
                         ("PUT", "/instances/abc/preview")]:  # fmt: skip
        assert not passed(method, path), (method, path)


def test_default_allowed_hosts_are_loopback_with_the_port():
    assert viewer.default_allowed_hosts("127.0.0.1", 3000) == ["127.0.0.1:3000", "localhost:3000", "[::1]:3000"]
    assert "10.1.2.3:8080" in viewer.default_allowed_hosts("10.1.2.3", 8080)
    assert len(viewer.default_allowed_hosts("0.0.0.0", 80)) == 3  # a wildcard is no name a browser sends


@pytest.mark.parametrize(
    "value, parsed",
    [("LocalHost:3000", ("localhost", "3000")), ("[::1]:3000", ("::1", "3000")),
     ("viewer.example", ("viewer.example", "")), ("a:b", None), ("[::1", None), ("", None),
     ("127.0.0.1:3000@evil.example", None), (":3000", None)],
)  # fmt: skip
def test_host_header_parsing(value, parsed):
    assert viewer._split_host(value) == parsed


@pytest.mark.skipif(not (shutil.which("npm") and shutil.which("node")), reason="npm and node build the extension")
def test_the_extension_is_built_once_from_its_sources_and_again_when_they_change(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(viewer.EXTENSION_SOURCE, source, ignore=shutil.ignore_patterns("node_modules"))
    built = ensure_extension(tmp_path / "cache", source=source)
    assert sorted(p.name for p in built.iterdir()) == [".source-sha256", "extension.js", "mode.js"]
    assert "orthanc-cbir.panelModule.similar" in (built / "mode.js").read_text()
    assert extension_present(tmp_path / "cache", source)
    stamp = (built / ".source-sha256").stat().st_mtime_ns
    assert ensure_extension(tmp_path / "cache", source=source) == built
    assert (built / ".source-sha256").stat().st_mtime_ns == stamp, "built again with nothing changed"
    with open(source / "src" / "mode.js", "a") as mode:
        mode.write("\n// changed\n")
    assert not extension_present(tmp_path / "cache", source)
    ensure_extension(tmp_path / "cache", source=source)
    assert extension_present(tmp_path / "cache", source)


def test_building_the_extension_without_its_sources_is_a_clear_error(tmp_path):
    with pytest.raises(OhifError, match="no OHIF extension sources"):
        ensure_extension(tmp_path / "cache", source=tmp_path / "nothing-here")
