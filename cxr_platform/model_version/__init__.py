"""What a model version is, readable without torch, scipy or scikit-learn: the files an export
writes and the metadata inside them, the operating point, the input gate, the intended use, the
registry tags and aliases, and the exported model loaded for scoring.

Training produces these records and every scoring process reads them, so they sit below both:
``models`` writes an :class:`~cxr_platform.model_version.operating_point.OperatingPoint`,
``deployment`` puts it into the files, ``inference`` scores with it.
"""
