"""The artefact store: everything `submit` writes and `status`, resume and Serve read.

One layer below both `pipeline/` (Ray orchestration) and `deploy/` (Ray Serve), which
imports neither of them and no Ray (docs/design.md §3, §4):

- storage.py   Storage: a local folder or s3:// through fsspec, atomic writes,
               recursive put/get; storage options (credentials refused)
- layout.py    every path name of the layout, the subject-id rule
- records.py   typed records: SubjectMeta (meta.json), BaseInfo (a base's marker +
               quant.json)
- subjects.py  writing a subject's folder, and `verify_subject`, the one reader
- bases.py     content address, complete bases, writing a quantized base
- cache.py     the per-node copy of a remote base (fcntl-locked, one download)
"""

from .bases import (
    complete_bases,
    content_address,
    last_run_base,
    native_size,
    quantize_into_storage,
    read_base,
    read_base_config,
    read_done,
    write_base,
)
from .cache import default_cache_dir, local_base_path
from .layout import (
    BASES_DIR,
    DONE,
    ID_RULE,
    META,
    PHOTOS_DIR,
    SAMPLES_DIR,
    SCALES,
    SUBJECTS_DIR,
    SUMMARY_JSON,
    SUMMARY_PARQUET,
    THUMBNAIL_SIDE,
    base_rel,
    photo_name,
    sample_name,
    subject_rel,
    validate_subject_id,
)
from .records import BaseInfo, SubjectMeta
from .storage import (
    Storage,
    StorageError,
    is_remote,
    parse_storage_options,
    sha256_hex,
)
from .subjects import (
    Defect,
    Verdict,
    read_subject_file,
    subject_ids,
    verify_subject,
    write_subject,
)

__all__ = [
    "BASES_DIR",
    "DONE",
    "ID_RULE",
    "META",
    "PHOTOS_DIR",
    "SAMPLES_DIR",
    "SCALES",
    "SUBJECTS_DIR",
    "SUMMARY_JSON",
    "SUMMARY_PARQUET",
    "THUMBNAIL_SIDE",
    "BaseInfo",
    "Defect",
    "Storage",
    "StorageError",
    "SubjectMeta",
    "Verdict",
    "base_rel",
    "complete_bases",
    "content_address",
    "default_cache_dir",
    "is_remote",
    "last_run_base",
    "local_base_path",
    "native_size",
    "parse_storage_options",
    "photo_name",
    "quantize_into_storage",
    "read_base",
    "read_base_config",
    "read_done",
    "read_subject_file",
    "sample_name",
    "sha256_hex",
    "subject_ids",
    "subject_rel",
    "validate_subject_id",
    "verify_subject",
    "write_base",
    "write_subject",
]
