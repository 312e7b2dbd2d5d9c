"""Error base shared by every layer.

`InputError` marks a problem with what the user gave us (a file, a flag, a config field); the CLI prints such
errors as one line and exits non-zero. Each pipeline derives its own hierarchy from it
(e.g. `pipelines.ct.dicom.IngestError`), so callers can catch one domain or all user-facing errors at once.
"""


class InputError(Exception):
    """Bad input: the message names the file or field and says what was expected."""
