"""Lossless compression of the node's image results on the way to PACS, each kind in the
transfer syntax that suits its pixels. The worker that builds a result compresses it (on its own
core); the sender sends it as it is, or decompressed to a destination that does not take it.

- The secondary capture is an 8-bit RGB picture: JPEG-LS Lossless.
- The segmentation is 1-bit and the parametric map 32-bit float, which JPEG-LS cannot encode
  (it takes 2 to 16 bits per sample): Deflated Explicit VR Little Endian, zlib over the whole
  object, which any DICOM toolkit reads.

Which kinds travel compressed is a setting (``CXR_DICOM_COMPRESS_RESULTS``). Measured on a
2000x1700 radiograph's results (benchmarks/result_sizes.py, 2 cores): SEG 0.43 MB -> 18 KB in
10 ms, parametric map 13.6 MB -> 1.04 MB in ~200 ms, the RGB secondary capture ~9x for ~90 ms on a
real radiograph; the default sends the first two compressed.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from cxr_platform.sections import IMAGE_RESULT_KINDS

# The kinds are named once, in the settings; strict: a kind added there must get its class and
# transfer syntax here.
SOP_CLASS_BY_KIND = dict(
    zip(
        IMAGE_RESULT_KINDS,
        (SegmentationStorage, ParametricMapStorage, SecondaryCaptureImageStorage),
        strict=True,
    )
)
TRANSFER_SYNTAX_BY_KIND: dict[str, UID] = dict(
    zip(
        IMAGE_RESULT_KINDS,
        (DeflatedExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLSLossless),
        strict=True,
    )
)
_TRANSFER_SYNTAX_BY_CLASS = {
    str(SOP_CLASS_BY_KIND[kind]): syntax for kind, syntax in TRANSFER_SYNTAX_BY_KIND.items()
}


def compressed_syntax(sop_class: str) -> UID | None:
    """The lossless transfer syntax results of ``sop_class`` travel in, None for none."""
    return _TRANSFER_SYNTAX_BY_CLASS.get(str(sop_class))


def is_uncompressed(syntax: UID) -> bool:
    return not (syntax.is_compressed or syntax.is_deflated)


def compress_dataset(dataset: Dataset) -> Dataset:
    """``dataset`` in its kind's lossless transfer syntax (in place); an object of another kind,
    or one already compressed, is returned as it is."""
    syntax = compressed_syntax(dataset.SOPClassUID)
    if syntax is None or not is_uncompressed(dataset.file_meta.TransferSyntaxUID):
        return dataset
    if syntax.is_deflated:
        # The pixels stay as they are; the whole object is deflated when it is written.
        dataset.file_meta.TransferSyntaxUID = syntax
    else:
        # Lossless: the same object, so its deterministic UID stays (pydicom makes a new one by
        # default, which would duplicate the result in PACS).
        dataset.compress(syntax, generate_instance_uid=False)
    return dataset


def decompress_dataset(dataset: Dataset) -> Dataset:
    """``dataset`` in Explicit VR Little Endian (in place), for a destination that takes no
    compressed syntax; the object and its UID stay the same."""
    syntax = dataset.file_meta.TransferSyntaxUID
    if is_uncompressed(syntax):
        return dataset
    if syntax.is_deflated:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # inflated when it was read
    else:
        dataset.decompress(generate_instance_uid=False)
    return dataset
