"""The one scoring core every caller goes through (HTTP service, DICOM node, ``cxr predict``),
with the inference log it writes, the retained-inputs store, and the models that follow the
registry's aliases."""
