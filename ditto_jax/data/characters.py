"""The character knowledge base: typed records, loaders (our JSONL, the Ditto release layout), splits.

Our JSONL: one object a line with exactly the fields of ``Character``. The Ditto release keeps a role under
``role_meta_info`` (or at top level) with the same field names, but ``wiki`` may be ``{"content": ...}``,
``claims`` a list of ``{"property"/"label": ..., "value": ...}`` or lists of values, ``aliases`` a string, and
category/lang spelled out; ``from_ditto`` normalises those. ``load_characters(None)`` is the embedded default
(``ditto_jax/data/assets/characters_*.jsonl``).
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import pydantic

from ditto_jax.data.records import (
    OnError,
    ReadReport,
    RecordError,
    RecordFileError,
    decode_json,
    expand_paths,
    find_dataset_dir,
    read_items,
    read_records,
)
from ditto_jax.data.tfds_builder import CharacterKb, build, open_split

NonEmpty = Annotated[str, pydantic.StringConstraints(strict=True, min_length=1)]
Category = Literal["real", "fictional"]
Lang = Literal["en", "zh"]
Split = Literal["train", "heldout"]
Layout = Literal["auto", "ditto_jax", "ditto"]


class _Record(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


class Era(_Record):
    """When a character lived or is set: years (negative = BCE) and/or a named period."""

    start: int | None = None
    end: int | None = None
    period: str | None = None

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> "Era":
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"era.end {self.end} is before era.start {self.start}")
        return self


class Character(_Record):
    """One role: the paper's fields plus era/domain (used to pick contrastive partners) and the split."""

    id: NonEmpty
    label: NonEmpty
    description: NonEmpty
    aliases: list[NonEmpty]
    claims: dict[NonEmpty, NonEmpty]
    category: Category
    lang: Lang
    summary: NonEmpty
    wiki: NonEmpty
    era: Era | None
    domain: NonEmpty | None
    split: Split

    def brief_intro(self) -> str:
        """The SFT system prompt: only a brief intro (the paper drops the full profile)."""
        if self.lang == "zh":
            return f"你是{self.label}，{self.description}。".replace("。。", "。")
        return f"You are {self.label}, {self.description.rstrip('.')}."


# ------------------------------------------------------------------------------------------------------------
# Ditto release layout
# ------------------------------------------------------------------------------------------------------------
def _text(value: Any) -> Any:
    """A Wikidata-ish value as text: dicts by label/value/content, lists joined with "; "."""
    if isinstance(value, dict):
        for k in ("content", "label", "value", "text", "name"):
            if k in value:
                return _text(value[k])
        return value
    if isinstance(value, list):
        parts = [_text(v) for v in value]
        return "; ".join(str(p) for p in parts if p not in (None, ""))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _claims(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _text(v) for k, v in value.items()}
    if isinstance(value, list):
        out: dict[str, Any] = {}
        for item in value:
            if isinstance(item, dict):
                name = next((item[k] for k in ("property", "label", "name", "key") if k in item), None)
                val = next((item[k] for k in ("value", "values", "content") if k in item), None)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                name, val = item
            else:
                return value  # leave it for validation to reject with the field name
            if name is None:
                return value
            text = _text(val)
            out[str(name)] = f"{out[str(name)]}; {text}" if str(name) in out else text
        return out
    return value


_CATEGORY = {"real": "real", "human": "real", "person": "real", "historical": "real", "真实": "real", "人物": "real",
             "fictional": "fictional", "fictional human": "fictional", "fictional character": "fictional",
             "虚构": "fictional", "虚构人物": "fictional"}
_LANG = {"en": "en", "english": "en", "zh": "zh", "chinese": "zh", "zh-cn": "zh", "zh_cn": "zh", "zh-hans": "zh",
         "中文": "zh"}


def _slug(label: str) -> str:
    return re.sub(r"[^\w]+", "_", label.strip().lower()).strip("_")


def from_ditto(obj: Any, default_split: Split = "train") -> dict[str, Any]:
    """Normalise a Ditto-release role (``{"role_meta_info": {...}}`` or the role itself) to our schema."""
    if not isinstance(obj, dict):
        return obj
    meta = obj.get("role_meta_info", obj)
    if not isinstance(meta, dict):
        return {"role_meta_info": meta}
    label = _text(meta.get("label") or meta.get("name"))
    out: dict[str, Any] = {
        "id": str(meta.get("id") or meta.get("qid") or obj.get("id") or (_slug(label) if isinstance(label, str) else "")),
        "label": label,
        "description": _text(meta.get("description")),
        "aliases": meta.get("aliases") if meta.get("aliases") is not None else [],
        "claims": _claims(meta.get("claims", meta.get("properties"))),
        "category": meta.get("category"),
        "lang": meta.get("lang", meta.get("language")),
        "wiki": _text(meta.get("wiki")),
        "era": meta.get("era"),
        "domain": meta.get("domain"),
        "split": meta.get("split", obj.get("split", default_split)),
    }
    if isinstance(out["aliases"], str):
        out["aliases"] = [a.strip() for a in re.split(r"[,;，；]", out["aliases"]) if a.strip()]
    elif isinstance(out["aliases"], list):
        out["aliases"] = [_text(a) for a in out["aliases"]]
    for name, table in (("category", _CATEGORY), ("lang", _LANG)):
        if isinstance(out[name], str):
            out[name] = table.get(out[name].strip().lower(), out[name])
    summary = _text(meta.get("summary"))
    if not summary and isinstance(out["wiki"], str):  # the release has no summary for some roles
        summary = out["wiki"].strip().split("\n\n")[0][:1000]
    out["summary"] = summary
    if out["split"] in ("test", "eval", "held_out", "heldout"):
        out["split"] = "heldout"
    return out


def parse_character(obj: Any, path: str = "<memory>", line: int = 0, layout: Layout = "auto") -> Character:
    """Validate one JSON object as a ``Character`` (raises ``pydantic.ValidationError``/``RecordFileError``)."""
    if not isinstance(obj, dict):
        raise RecordFileError([RecordError(path, line, f"expected a JSON object, got {type(obj).__name__}",
                                           "wrong_type")])
    looks_ditto = "role_meta_info" in obj or isinstance(obj.get("wiki"), dict) or isinstance(obj.get("claims"), list)
    if layout == "ditto" or (layout == "auto" and looks_ditto):
        obj = from_ditto(obj)
    return Character.model_validate(obj)


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------
def default_character_files() -> list[Path]:
    """The embedded knowledge-base files (``characters_*.jsonl`` in the package assets)."""
    assets = Path(str(importlib.resources.files("ditto_jax"))) / "data" / "assets"
    return sorted(assets.glob("characters*.jsonl"))


def read_characters(
    path: str | Path | Iterable[str | Path] | None = None, on_error: OnError = "fail", layout: Layout = "auto",
    split: str = "train",
) -> tuple[list[Character], ReadReport]:
    """Characters and a ``ReadReport`` (skips by reason, duplicate ids dropped after the first, all errors).

    ``path``: JSONL file(s)/folder/glob, or a TFDS dataset folder written by ``build_characters_tfds`` (then
    ``split`` names the TFDS split); None = the embedded default.
    """
    parse = lambda o, p, n: parse_character(o, p, n, layout)  # noqa: E731
    if isinstance(path, (str, Path)) and Path(path).is_dir() and (ds := find_dataset_dir(path)):
        source, origin = open_split(ds, split), f"{ds}[{split}]"
        items = ((origin, i, decode_json(source[i]["json"], origin, i)) for i in range(len(source)))
        return read_items(items, parse, on_error, key=lambda c: c.id)
    files = default_character_files() if path is None else expand_paths(path)
    if not files:
        raise FileNotFoundError(f"no character files found at {path or 'the embedded default'}")
    return read_records(files, parse, on_error, key=lambda c: c.id)


def build_characters_tfds(characters: Iterable[Character], data_dir: str | Path, split: str = "train") -> Path:
    """Write characters as a TFDS ``array_record`` dataset (one split); returns its version folder."""

    return build(CharacterKb, {split: [c.model_dump(mode="json") for c in characters]}, data_dir)


def load_characters(
    path: str | Path | Iterable[str | Path] | None = None, on_error: OnError = "fail", layout: Layout = "auto"
) -> list[Character]:
    """Load a knowledge base (file, folder, glob or list; None = the embedded default); duplicates dropped."""
    if path is None and on_error == "fail" and layout == "auto":
        return list(default_characters())
    return read_characters(path, on_error, layout)[0]


@functools.lru_cache(maxsize=1)
def default_characters() -> tuple[Character, ...]:
    """The embedded knowledge base (cached; records are immutable)."""
    return tuple(read_characters(None)[0])


def validate_characters(path: str | Path | Iterable[str | Path], layout: Layout = "auto") -> tuple[list[RecordError], ReadReport]:
    """Every problem in the files (bad lines, bad fields, duplicate ids), without raising."""
    _, report = read_records(expand_paths(path), lambda o, p, n: parse_character(o, p, n, layout), "skip",
                             key=lambda c: c.id)
    return report.errors, report


def held_out(characters: Iterable[Character]) -> list[Character]:
    """The evaluation roles (``split == "heldout"``)."""
    return [c for c in characters if c.split == "heldout"]


def train_split(characters: Iterable[Character]) -> list[Character]:
    """The roles used for simulation/SFT (``split == "train"``)."""
    return [c for c in characters if c.split == "train"]


def by_id(characters: Iterable[Character]) -> dict[str, Character]:
    """Index by id."""
    return {c.id: c for c in characters}


def character_stats(characters: Iterable[Character]) -> dict[str, Any]:
    """Counts by language, category, split (and language x split), plus era/domain coverage."""

    chars = list(characters)
    count = lambda f: dict(sorted(collections.Counter(f(c) for c in chars).items()))  # noqa: E731
    return {
        "characters": len(chars),
        "by_lang": count(lambda c: c.lang),
        "by_category": count(lambda c: c.category),
        "by_split": count(lambda c: c.split),
        "by_lang_split": count(lambda c: f"{c.lang}/{c.split}"),
        "with_era": sum(c.era is not None for c in chars),
        "domains": len({c.domain for c in chars if c.domain}),
        "mean_claims": round(sum(len(c.claims) for c in chars) / max(len(chars), 1), 2),
        "mean_wiki_chars": round(sum(len(c.wiki) for c in chars) / max(len(chars), 1), 1),
    }
