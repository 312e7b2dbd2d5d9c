"""One error hierarchy for the CT pipeline, rooted at `mmcore.errors.InputError`.

Every message names the file (or series) and says what was expected and what was found, so the CLI can print it
as a single line.
"""

from __future__ import annotations

from mmcore.errors import InputError


class CTError(InputError):
    """Any user-facing problem in the CT pipeline."""


class IngestError(CTError):
    """DICOM ingest failed: the upload cannot become one validated HU volume."""


class ArchiveError(IngestError):
    """A zip upload is unsafe or unreadable."""


class ZipSlipError(ArchiveError):
    """A zip member would be written outside the extraction folder (absolute path or `..`)."""


class ZipBombError(ArchiveError):
    """A zip exceeds the member-count, total-size or compression-ratio caps."""


class NoDicomError(IngestError):
    """No readable DICOM file was found in the input."""


class SeriesSelectionError(IngestError):
    """No CT image series qualifies, or the requested SeriesInstanceUID is absent."""


class GeometryError(IngestError):
    """Slices cannot form one regular volume: mixed orientations, sizes or spacings, large gaps, missing tags."""


class PixelDataError(IngestError):
    """Pixel data is truncated, in an unsupported layout, or cannot be decoded."""


class PhantomError(CTError):
    """Bad phantom parameters (unknown finding type, impossible size)."""
