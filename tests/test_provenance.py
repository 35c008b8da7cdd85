"""Provenance: package versions read from dist-info names agree with importlib.metadata."""

from __future__ import annotations

import sys
from importlib import metadata

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


def test_an_egg_info_install_is_asked_of_importlib_metadata(tmp_path, monkeypatch):
    egg = tmp_path / "some_egg.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: some-egg\nVersion: 3.4.5\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert provenance.installed_versions(("some-egg",)) == {"some-egg": "3.4.5"}


def test_an_egg_info_earlier_on_the_path_wins_over_a_later_dist_info(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    egg = first / "some_egg.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: some-egg\nVersion: 1.0\n")
    (second / "some_egg-9.9.dist-info").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(first), str(second)])
    assert provenance.installed_versions(("some-egg",)) == {"some-egg": "1.0"}
