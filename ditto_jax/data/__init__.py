"""Data: the character knowledge base, the role-play corpus (JSONL + TFDS), the Grain input pipeline.

Heavy modules (``corpus``'s TFDS builder, ``pipeline``'s Grain) are imported on use; the character API is
re-exported here.
"""

from ditto_jax.data.characters import (
    Character,
    Era,
    by_id,
    character_stats,
    default_characters,
    held_out,
    load_characters,
    read_characters,
    train_split,
    validate_characters,
)
from ditto_jax.data.records import ReadReport, RecordError, RecordFileError

__all__ = [
    "Character", "Era", "by_id", "character_stats", "default_characters", "held_out", "load_characters",
    "read_characters", "train_split", "validate_characters", "ReadReport", "RecordError", "RecordFileError",
]
