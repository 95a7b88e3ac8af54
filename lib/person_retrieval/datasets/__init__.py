"""Readers and writers of the real on-disk dataset formats (see :mod:`.formats`)."""
from .formats import (
    ITCPR, REAL_FOLDERS, TPR_FORMATS, DatasetFormatError, TPRSplit, load_split, read_chatpedes, read_itcpr, read_syncpr,
    read_tpr_annotations, split_statistics, write_chatpedes, write_itcpr, write_json_atomic, write_syncpr,
    write_tpr_annotations, tokenize, validate, validate_annotations,
)
from .captions import read_pseudo_captions, with_pseudo_captions, write_pseudo_captions

__all__ = [
    "ITCPR", "REAL_FOLDERS", "TPR_FORMATS", "DatasetFormatError", "TPRSplit", "load_split", "read_chatpedes", "read_itcpr",
    "read_syncpr", "read_tpr_annotations", "split_statistics", "write_chatpedes", "write_itcpr",
    "write_json_atomic", "write_syncpr", "write_tpr_annotations", "tokenize", "validate",
    "read_pseudo_captions", "with_pseudo_captions", "write_pseudo_captions", "validate_annotations",
]
