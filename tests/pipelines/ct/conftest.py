"""Shared fixtures for the CT tests: one small phantom series written once per session, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SMALL = dict(size=128, slices=24, thickness_mm=2.5)  # ingest tests need geometry and HU, not anatomy detail


@pytest.fixture(scope="session")
def small_phantom():
    from pipelines.ct.phantom import PhantomConfig, make_phantom

    return make_phantom(11, [], PhantomConfig(**SMALL))


@pytest.fixture(scope="session")
def small_series_dir(tmp_path_factory, small_phantom) -> Path:
    from pipelines.ct.phantom import write_series

    folder = tmp_path_factory.mktemp("series")
    write_series(small_phantom.volume, folder)
    return folder


@pytest.fixture
def series_copy(tmp_path, small_series_dir) -> Path:
    """A private copy of the small series that a test may corrupt."""
    target = tmp_path / "upload"
    shutil.copytree(small_series_dir, target)
    return target


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm"))


def edit_files(files, fn) -> None:
    """Apply fn(dataset) to each file and save it back (in place)."""
    import pydicom

    for path in files:
        ds = pydicom.dcmread(path)
        fn(ds)
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def files_of():
    return dicom_files


@pytest.fixture
def edit():
    return edit_files
