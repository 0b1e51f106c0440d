"""Site data: DICOM in, aligned masks, preprocessing, cache, datasets, synthetic sites."""
