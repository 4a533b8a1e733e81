"""Drift monitoring, the retained labeled inputs, fine-tuning and shadow evaluation."""

# Here, not in shifts.py, so the CLI can offer them without importing the image code.
SHIFT_NAMES = ("none", "contrast", "noise", "blur", "resolution", "exposure", "invert")
