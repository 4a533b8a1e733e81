"""Explanations: Grad-CAM heatmaps, overlays and their sanity checks."""
