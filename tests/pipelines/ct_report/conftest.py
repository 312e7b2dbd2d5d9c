"""Shared fixtures for the CT report tests: one small phantom study written as DICOM and read back (session-wide),
and helpers that build reports from its ground truth (the measurement module's vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipelines.ct.dicom import ingest
from pipelines.ct.phantom import PhantomConfig, make_phantom, write_phantom
from pipelines.ct.report import CTReport, build_report

SMALL = PhantomConfig(size=96, slices=32, thickness_mm=6.0)  # 3.75 mm pixels: enough for the report, fast to render
STUDY_FINDINGS = ["nodule", "pleural_effusion", "pericardial_effusion", "emphysema", "calcified_granuloma"]
PHANTOM_SEED = 8101


@dataclass
class Study:
    phantom: object
    folder: object
    ingest: object

    @property
    def volume(self):
        return self.ingest.volume

    @property
    def headers(self) -> list:
        return [i.header for i in self.ingest.scan.picked.instances]

    @property
    def findings(self) -> list[dict]:
        return self.phantom.ground_truth["findings"]

    def report(self, **kwargs) -> CTReport:
        refs = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in self.headers]
        lungs = self.phantom.ground_truth["lungs"]
        kwargs.setdefault("lung_volume_ml", lungs["right_volume_ml"] + lungs["left_volume_ml"])
        return build_report(self.findings, metadata=self.volume.metadata, header=self.headers[0],
                            spacing_zyx=self.volume.spacing_zyx, slice_refs=refs,
                            scan_length_mm=self.volume.shape[0] * self.volume.spacing_zyx[0], **kwargs)


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Study:
    phantom = make_phantom(PHANTOM_SEED, STUDY_FINDINGS, SMALL)
    folder = write_phantom(phantom, tmp_path_factory.mktemp("ct_report") / "series")
    return Study(phantom=phantom, folder=folder, ingest=ingest(folder))
