"""The two classes, named once (importable without the decoders)."""

LABELS = ("NORMAL", "PNEUMONIA")
POSITIVE_LABEL = "PNEUMONIA"
