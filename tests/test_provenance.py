"""Provenance: package versions read from dist-info names agree with importlib.metadata."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

from mstore import provenance


def test_package_versions_are_what_importlib_metadata_reports():
    expected = {}
    for name in provenance.TRACKED_PACKAGES:
        try:
            expected[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    assert provenance.package_versions() == expected
    assert provenance.mstore_version() == metadata.version("mstore")


def test_the_first_path_entry_that_has_a_package_wins(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "Some_Pkg-1.2.dist-info").mkdir(parents=True)
    (second / "some_pkg-9.9.dist-info").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(first), str(second)])
    assert provenance.installed_versions(("some-pkg",)) == {"some-pkg": "1.2"}


def test_a_package_installed_nowhere_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert provenance.installed_versions(("no-such-package-anywhere",)) == {}


def test_an_egg_info_install_has_the_version_header_of_its_pkg_info_read(tmp_path, monkeypatch):
    egg = tmp_path / "some_egg.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: some-egg\nVersion: 3.4.5\n\nVersion: 0.0 (body)\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(metadata, "version", lambda name: pytest.fail("asked importlib.metadata"))
    assert provenance.installed_versions(("some-egg",)) == {"some-egg": "3.4.5"}


def test_an_egg_info_file_is_read_as_its_own_pkg_info(tmp_path, monkeypatch):
    (tmp_path / "some_egg-3.4.5-py3.11.egg-info").write_text("Metadata-Version: 1.0\nName: some-egg\nVersion: 3.4.5\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(metadata, "version", lambda name: pytest.fail("asked importlib.metadata"))
    assert provenance.installed_versions(("some-egg",)) == {"some-egg": "3.4.5"}


def test_an_egg_info_without_a_version_header_is_asked_of_importlib_metadata(tmp_path, monkeypatch):
    egg = tmp_path / "some_egg.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: some-egg\n")
    asked = []
    monkeypatch.setattr(metadata, "version", lambda name: asked.append(name) or "7.0")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert provenance.installed_versions(("some-egg",)) == {"some-egg": "7.0"}
    assert asked == ["some-egg"]


def test_a_provenance_capture_on_a_thread_hands_its_error_to_the_caller(tmp_path, monkeypatch):
    def boom(cwd, argv, extra):
        raise OSError("no provenance today")

    monkeypatch.setattr(provenance, "capture", boom)
    pending = provenance.Capture(tmp_path, ["x"])
    with pytest.raises(OSError, match="no provenance today"):
        pending.result()


def test_a_provenance_capture_on_a_thread_records_the_command_line_given(tmp_path):
    assert provenance.Capture(tmp_path, ["mstore", "commit", "x"]).result()["command"] == ["mstore", "commit", "x"]


def test_an_egg_info_earlier_on_the_path_wins_over_a_later_dist_info(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    egg = first / "some_egg.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: some-egg\nVersion: 1.0\n")
    (second / "some_egg-9.9.dist-info").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(first), str(second)])
    assert provenance.installed_versions(("some-egg",)) == {"some-egg": "1.0"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.uname and glibc's version string")
def test_the_recorded_platform_is_what_platform_says_without_running_a_subprocess(monkeypatch):
    import platform
    import subprocess

    expected = platform.platform(terse=True)  # (it caches what it found: asked again, it would not run uname)
    monkeypatch.setattr(platform, "platform", lambda *a, **k: pytest.fail("asked platform.platform()"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert provenance.platform_name() == expected
