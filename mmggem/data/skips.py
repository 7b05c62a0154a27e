"""Why a sample or an input is left out: one vocabulary for every reader and writer of mmggem.

The training loader counts skips by these names (logged as ``data/skipped_samples``), the
evaluation reader reports them in the result JSON's ``skipped``, and the shard and eval-set
writers list them in their reports. Which reader meets which reason:

=====================  ==========================================================  ===================
reason                 meaning                                                     met by
=====================  ==========================================================  ===================
unreadable_shard       a shard that cannot be opened (no file, a failed ``pipe:``)  training
truncated_tar          a tar that ends early or is corrupt; the sample being read   training
                       when the error came is dropped
duplicate_member       a sample with two members of one extension (webdataset       training (evaluation
                       raises on it)                                                raises too)
no_image               no ``webp``, ``png``, ``jpg`` or ``jpeg`` member             training, evaluation
no_caption             no ``txt`` member, or a caption row with no text            training, evaluation,
                                                                                    writers
no_label               no ``cls`` member (classification sets)                      evaluation
caption_not_utf8       a caption whose bytes are not UTF-8                          training
empty_caption          a caption that is empty once stripped                        training, writers
corrupt_image          image bytes that do not decode                               all
image_too_large        an image above Pillow's decompression-bomb limit             training, writers
missing_file           an image file named by a caption row that does not exist     writers
unreadable_file        an image file that cannot be read                            writers
empty_file_name        a caption row without a file name                            writers
no_caption_row         an image in the folder that no caption row names             writers
other_split            an image that only rows of other splits name (``--split``)   writers
not_in_class_folder    a file beside, not inside, the class folders                 writers
=====================  ==========================================================  ===================
"""
from __future__ import annotations

__all__ = ["SKIP_REASONS", "skip_reason"]

SKIP_REASONS: tuple[str, ...] = (
    "unreadable_shard", "truncated_tar", "duplicate_member", "no_image", "no_caption", "no_label",
    "caption_not_utf8", "empty_caption", "corrupt_image", "image_too_large", "missing_file", "unreadable_file",
    "empty_file_name", "no_caption_row", "not_in_class_folder", "other_split",
)


def skip_reason(reason: str) -> str:
    """``reason`` itself, once checked to be one of :data:`SKIP_REASONS` (a typo is a bug, not data)."""
    if reason not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {reason!r}; valid: {', '.join(SKIP_REASONS)}")
    return reason
