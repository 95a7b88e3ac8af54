"""Readers and writers of the real on-disk dataset formats (see :mod:`.formats`)."""
from .formats import (
    ITCPR, REAL_FOLDERS, TPR_FORMATS, dataset_root, DatasetFormatError, TPRSplit, load_split, read_chatpedes, read_itcpr, read_syncpr,
    read_tpr_annotations, split_statistics, write_chatpedes, write_itcpr, write_json_atomic, write_syncpr,
    write_tpr_annotations,
)

__all__ = [
    "ITCPR", "REAL_FOLDERS", "TPR_FORMATS", "dataset_root", "DatasetFormatError", "TPRSplit", "load_split", "read_chatpedes", "read_itcpr",
    "read_syncpr", "read_tpr_annotations", "split_statistics", "write_chatpedes", "write_itcpr",
    "write_json_atomic", "write_syncpr", "write_tpr_annotations",
]
