"""TFDS datasets of JSON records (corpus sessions, characters) written as ``array_record`` without TensorFlow.

Each example is ``{"id": Text, "json": Text}`` (the record as JSON); ``open_split`` returns a random-access
``tfds`` data source that ``grain.MapDataset.source`` reads directly. Text features come back as bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import tensorflow_datasets as tfds

from ditto_jax.data.records import find_dataset_dir  # noqa: F401  (re-exported)

FILE_FORMAT = "array_record"


class JsonRecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: splits are given as lists of JSON-able records with an ``"id"``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSON records with their id."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # No checksums/metadata files live next to this module; TFDS's lookup of them would import the
        # optional `importlib_resources` backport.
        return None

    def __init__(self, *, records_by_split: Mapping[str, Iterable[Mapping[str, Any]]] | None = None, **kwargs: Any):
        self._records_by_split = dict(records_by_split or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "json": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {split: self._generate_examples(recs) for split, recs in self._records_by_split.items()}

    def _generate_examples(self, records: Iterable[Mapping[str, Any]]):
        for rec in records:
            yield rec["id"], {"id": rec["id"], "json": json.dumps(rec, ensure_ascii=False)}


class RolePlayCorpus(JsonRecordsBuilder):
    """Ditto role-play sessions (one session per example)."""


class CharacterKb(JsonRecordsBuilder):
    """A character knowledge base (one character per example)."""


def build(builder_cls: type[JsonRecordsBuilder], records_by_split: Mapping[str, list[Mapping[str, Any]]],
          data_dir: str | Path) -> Path:
    """Write the dataset under ``data_dir``; returns its version folder (``data_dir/<name>/<version>``).

    Empty splits are left out (TFDS cannot write an empty split).
    """
    tfds.disable_progress_bar()
    splits = {k: v for k, v in records_by_split.items() if v}
    builder = builder_cls(records_by_split=splits, data_dir=str(data_dir), file_format=FILE_FORMAT)
    builder.download_and_prepare()
    return Path(builder.data_dir)


def split_names(dataset_dir: str | Path) -> list[str]:
    """Splits present in a built dataset."""
    return list(tfds.builder_from_directory(str(dataset_dir)).info.splits.keys())


def open_split(dataset_dir: str | Path, split: str):
    """A random-access data source of ``{"id": bytes, "json": bytes}`` examples."""
    builder = tfds.builder_from_directory(str(dataset_dir))
    if split not in builder.info.splits:
        raise KeyError(f"{dataset_dir}: no split {split!r} (have {', '.join(builder.info.splits.keys())})")
    return builder.as_data_source(split=split)


def read_split(dataset_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """Every record of a split, decoded from JSON."""
    source = open_split(dataset_dir, split)
    return [json.loads(source[i]["json"]) for i in range(len(source))]
