"""The DIMSE statuses the node answers and reads, named once: C-STORE answers them, STOW-RS
reports them per instance (PS3.18 points its failure reasons at them), and the sender reads
them from PACS."""

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the spool is full or could not be written
STATUS_CANNOT_UNDERSTAND = 0xC000  # the dataset could not be parsed
STATUS_STUDY_MISMATCH = 0xC122  # not in the study a STOW-RS URL names
STATUS_NOT_AUTHORIZED = 0x0124  # PS3.7 C.4: refused, the caller may not do this
# Success, and the warnings PACS use for "stored, but coerced/with discrepancies".
STORED_STATUSES = frozenset({STATUS_SUCCESS, 0xB000, 0xB006, 0xB007})
