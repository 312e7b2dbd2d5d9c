"""CT pipeline: DICOM ingest, synthetic chest-CT phantoms and quantitative findings (numpy / scipy / pydicom only)."""
