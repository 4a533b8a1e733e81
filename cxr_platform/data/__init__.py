"""Data layer: sources, image reading, profiling, patient-level splits, cache, transforms."""
