"""The single predictor every entry point uses: batch CLI, HTTP service, DICOM node."""
