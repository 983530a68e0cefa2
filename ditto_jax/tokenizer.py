"""One tokenizer interface over sentencepiece models and Hugging Face ``tokenizer.json`` files.

``load_tokenizer(path)`` takes a sentencepiece ``.model`` file or a folder holding ``tokenizer.json`` (Qwen,
Llama-3, ... via the ``tokenizers`` library) or ``tokenizer.model``; ``default_tokenizer()`` is the small
sentencepiece model embedded in the package (``ditto_jax/data/assets/tokenizer.model``).

Chat: ChatML (``<|im_start|>``/``<|im_end|>``, Qwen2's layout) unless the tokenizer has the Llama-3 header
tokens. A tokenizer without the ChatML tokens gets them appended after its vocabulary (``<|im_start|>`` =
old size, ``<|im_end|>`` = old size + 1), so the model vocab, ids and exported files agree.
``encode_chat`` returns exactly the ids of transformers' ``apply_chat_template`` with the template that
``save`` writes, plus a loss mask that is 1 on assistant content and the assistant's end-of-turn token.
Special-token text inside ``encode``'d strings becomes the special token (as in ``tokenizers`` by default).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping, Sequence

from ditto_jax import chat_format as cf
from ditto_jax.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

DEFAULT_TOKENIZER_ASSET = "data/assets/tokenizer.model"

Messages = Sequence[Mapping[str, str]]


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or lacks a required token."""


class Tokenizer(ABC):
    """Text <-> ids, chat encoding with a loss mask, token bytes for constrained decoding, HF export.

    Attributes: ``vocab_size`` (ids are ``< vocab_size``), ``eos_id``, ``pad_id``, ``bos_id`` (None when the
    tokenizer has none), ``im_start_id``/``im_end_id`` (the turn-start/end tokens: ChatML's, or Llama-3's
    ``<|start_header_id|>``/``<|eot_id|>``), ``special_ids``, ``stop_ids`` (ids that end a generated turn),
    ``chat_format`` ("chatml" | "llama3"), ``default_system`` (ChatML system text used when a conversation
    has none; None = no default).
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    im_start_id: int
    im_end_id: int
    special_ids: frozenset[int]
    chat_format: cf.ChatFormat
    default_system: str | None = None

    # ---- backend ------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped when ``skip_special``."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (a vocabulary piece), or None."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary piece of an id."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token contributes to decoded text (special tokens: their literal text; unknown: b"")."""

    @abstractmethod
    def _encode_parts(self, parts: Sequence[cf.ChatPart]) -> tuple[list[int], list[int]]:
        """Ids and per-id train flags of rendered chat parts (same ids as encoding the joined text)."""

    @abstractmethod
    def _write_model_files(self, out: Path) -> None:
        """Write ``tokenizer.json`` (and ``tokenizer.model`` for sentencepiece) into ``out``."""

    # ---- shared ---------------------------------------------------------------------------------------------
    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end an assistant turn: EOS and the end-of-turn token."""
        return frozenset({self.eos_id, self.im_end_id})

    @property
    def chat_template(self) -> str:
        """The Jinja template equivalent to ``encode_chat`` (what ``save`` writes)."""
        if self.chat_format == "llama3":
            return cf.LLAMA3_TEMPLATE
        return cf.chatml_template(self.default_system)

    def render_chat(self, messages: Messages, add_generation_prompt: bool = False) -> list[cf.ChatPart]:
        """The conversation as chat parts (raises ``ChatError`` for an unknown role or bad content)."""
        if self.chat_format == "llama3":
            bos = self.id_to_token(self.bos_id) if self.bos_id is not None else None
            return cf.render_llama3(messages, add_generation_prompt, bos=bos)
        return cf.render_chatml(messages, add_generation_prompt, self.default_system)

    def chat_text(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The rendered conversation as one string (what the template renders)."""
        return "".join(p.text for p in self.render_chat(messages, add_generation_prompt))

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """``(ids, loss_mask)``: ids equal ``apply_chat_template(messages, tokenize=True)``; mask 1 on
        assistant tokens including their end-of-turn token, 0 elsewhere."""
        return self._encode_parts(self.render_chat(messages, add_generation_prompt))

    def vocab_bytes(self) -> list[bytes]:
        """``token_bytes`` of every id (index = id), cached; for building constrained-decoding automata."""
        cached = getattr(self, "_vocab_bytes_cache", None)
        if cached is None:
            cached = [self.token_bytes(i) for i in range(self.vocab_size)]
            self._vocab_bytes_cache = cached
        return cached

    def _token_name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.id_to_token(token_id)

    def save(self, out_dir: str | Path) -> Path:
        """Write the files an HF export needs: ``tokenizer.json`` (+ ``tokenizer.model`` for sentencepiece),
        ``tokenizer_config.json`` (with ``chat_template``) and ``special_tokens_map.json``; returns the folder.

        ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it with the same ids and template.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._write_model_files(out)
        specials = {
            "bos_token": self._token_name(self.bos_id),
            "eos_token": self._token_name(self.eos_id),
            "pad_token": self._token_name(self.pad_id),
        }
        turn_tokens = [self.id_to_token(self.im_start_id), self.id_to_token(self.im_end_id)]
        added = {
            str(i): {"content": self.id_to_token(i), "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in sorted(self.special_ids)
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "unk_token": None,
            "additional_special_tokens": turn_tokens,
            "added_tokens_decoder": added,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": self.chat_template,
        }
        atomic_write_json(out / "tokenizer_config.json", config)
        atomic_write_json(
            out / "special_tokens_map.json",
            {k: v for k, v in specials.items() if v is not None} | {"additional_special_tokens": turn_tokens},
        )
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, format={self.chat_format}, "
                f"eos={self.eos_id}, pad={self.pad_id}, bos={self.bos_id}, "
                f"im_start={self.im_start_id}, im_end={self.im_end_id})")


# ------------------------------------------------------------------------------------------------------------
# sentencepiece
# ------------------------------------------------------------------------------------------------------------
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _longest_first_pattern(texts: Sequence[str]) -> re.Pattern[str] | None:
    if not texts:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)) + ")")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; ChatML tokens it lacks are appended after its vocabulary."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>", default_system: str | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self._model_proto = bytes(model_proto)
        self.source = source
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/DecodeError variants
            raise TokenizerError(f"{source}: not a sentencepiece model: {exc}") from exc
        self._types = [p.type for p in proto.pieces]
        self._pieces = [p.piece for p in proto.pieces]
        self._piece_ids = {p: i for i, p in enumerate(self._pieces)}
        self._sp_size = len(self._pieces)
        self._appended: list[str] = [t for t in (cf.IM_START, cf.IM_END) if t not in self._piece_ids]
        for j, text in enumerate(self._appended):
            self._piece_ids[text] = self._sp_size + j
        self.vocab_size = self._sp_size + len(self._appended)
        self.chat_format = "chatml"
        self.default_system = default_system
        self.im_start_id = self._piece_ids[cf.IM_START]
        self.im_end_id = self._piece_ids[cf.IM_END]
        special = {i for i, t in enumerate(self._types) if t in (_CONTROL, _USER_DEFINED)}
        special |= set(range(self._sp_size, self.vocab_size))
        self.special_ids = frozenset(special)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        eos = self._sp.eos_id()
        self.eos_id = eos if eos >= 0 else self.im_end_id
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id
        # Control pieces (e.g. <pad>, </s>) and appended tokens are not matched by sentencepiece itself.
        self._split_texts = [self._token_text(i) for i in sorted(special) if self._token_text(i)]
        self._split_re = _longest_first_pattern(self._split_texts)

    # pickling (grain worker processes) ships the model bytes, not the C++ processor
    def __getstate__(self) -> dict:
        return {"model_proto": self._model_proto, "source": self.source, "default_system": self.default_system}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["source"], state["default_system"])

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model."""
        return self._model_proto

    def _token_text(self, token_id: int) -> str:
        return self.id_to_token(token_id)

    def id_to_token(self, token_id: int) -> str:
        """The piece of ``token_id`` (appended ChatML tokens included)."""
        if 0 <= token_id < self._sp_size:
            return self._pieces[token_id]
        if self._sp_size <= token_id < self.vocab_size:
            return self._appended[token_id - self._sp_size]
        raise TokenizerError(f"token id {token_id} out of range [0, {self.vocab_size})")

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece, or None."""
        return self._piece_ids.get(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token text becomes the special token."""
        if self._split_re is None or not any(t in text for t in self._split_texts):
            return self._sp.encode(text)
        ids: list[int] = []
        for k, chunk in enumerate(self._split_re.split(text)):
            if k % 2:
                ids.append(self._piece_ids[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (byte-fallback pieces merged back into UTF-8)."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.id_to_token(i))
            elif 0 <= i < self._sp_size:
                run.append(i)
            else:
                raise TokenizerError(f"token id {i} out of range [0, {self.vocab_size})")
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        """``▁`` -> b" ", ``<0xNN>`` -> that byte, special -> its text, unknown/unused -> b""."""
        piece = self.id_to_token(token_id)
        if token_id >= self._sp_size or token_id in self.special_ids:
            return piece.encode("utf-8")
        kind = self._types[token_id]
        if kind == _BYTE:
            return bytes([int(piece[3:5], 16)])
        if kind in (_UNKNOWN, _UNUSED):
            return b""
        return piece.replace("▁", " ").encode("utf-8")

    def _encode_parts(self, parts: Sequence[cf.ChatPart]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        run: list[cf.ChatPart] = []

        def flush() -> None:
            if not run:
                return
            full = self.encode("".join(p.text for p in run))
            starts = [0]  # first token of each part: longest common prefix with the encoded text before it
            prefix = ""
            for p in run[:-1]:
                prefix += p.text
                pre = self.encode(prefix)
                k = 0
                while k < min(len(pre), len(full)) and pre[k] == full[k]:
                    k += 1
                starts.append(max(k, starts[-1]))
            starts.append(len(full))
            for j, p in enumerate(run):
                n = starts[j + 1] - starts[j]
                mask.extend([int(p.train)] * n)
            ids.extend(full)
            run.clear()

        for part in parts:
            if part.special:
                flush()
                tid = self.token_to_id(part.text)
                if tid is None:
                    raise TokenizerError(f"{self.source}: chat token {part.text!r} is not in the vocabulary")
                ids.append(tid)
                mask.append(int(part.train))
            else:
                run.append(part)
        flush()
        return ids, mask

    def to_hf_tokenizer(self):
        """The equivalent ``tokenizers.Tokenizer`` (specials and appended ChatML tokens included)."""
        from ditto_jax.spm_export import spm_to_tokenizers

        specials = [(i, self.id_to_token(i)) for i in sorted(self.special_ids)]
        return spm_to_tokenizers(self._model_proto, specials)

    def _write_model_files(self, out: Path) -> None:
        atomic_write_bytes(out / "tokenizer.model", self._model_proto)
        atomic_write_text(out / "tokenizer.json", self.to_hf_tokenizer().to_str())


# ------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers (tokenizer.json)
# ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE shows each byte as a printable character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_from_config(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer (``tokenizer.json``) plus ``tokenizer_config.json`` special tokens."""

    _EOS_FALLBACK = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", cf.EOT, cf.IM_END)

    def __init__(self, tokenizer_json: str, config: Mapping[str, object] | None = None, source: str = "<json>",
                 default_system: str | None = None):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        self.source = source
        self._json = tokenizer_json
        self._config = dict(config or {})
        try:
            self._tok = RustTokenizer.from_str(tokenizer_json)
        except Exception as exc:
            raise TokenizerError(f"{source}: not a tokenizers tokenizer.json: {exc}") from exc
        self._tok.no_padding()
        self._tok.no_truncation()
        self.default_system = default_system
        if self._tok.token_to_id(cf.HEADER_START) is not None and self._tok.token_to_id(cf.EOT) is not None:
            self.chat_format = "llama3"
            self.im_start_id, self.im_end_id = self._tok.token_to_id(cf.HEADER_START), self._tok.token_to_id(cf.EOT)
        else:
            self.chat_format = "chatml"
            missing = [t for t in (cf.IM_START, cf.IM_END) if self._tok.token_to_id(t) is None]
            if missing:  # appended after the vocabulary, in this order
                self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            self.im_start_id, self.im_end_id = self._tok.token_to_id(cf.IM_START), self._tok.token_to_id(cf.IM_END)
        # make sure the turn tokens are split out as special even if the json listed them as plain vocab
        for t in (self.id_to_token(self.im_start_id), self.id_to_token(self.im_end_id)):
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

        bos = _token_from_config(self._config.get("bos_token"))
        if bos is None and self.chat_format == "llama3":
            bos = cf.LLAMA3_BOS
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        eos = _token_from_config(self._config.get("eos_token"))
        eos_id = self._tok.token_to_id(eos) if eos else None
        if eos_id is None:
            eos_id = next((self._tok.token_to_id(t) for t in self._EOS_FALLBACK if self._tok.token_to_id(t) is not None))
        self.eos_id = eos_id
        pad = _token_from_config(self._config.get("pad_token"))
        pad_id = self._tok.token_to_id(pad) if pad else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        dec = json.loads(self._tok.to_str()).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(dec)

    def __getstate__(self) -> dict:
        return {"json": self._json, "config": self._config, "source": self.source, "default_system": self.default_system}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"], state["config"], state["source"], state["default_system"])

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of ``token_id``."""
        tok = self._tok.id_to_token(int(token_id))
        if tok is None:
            raise TokenizerError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return tok

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string, or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no post-processor specials)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """Byte-level BPE: the byte alphabet mapped back; metaspace: ``▁`` -> b" ", ``<0xNN>`` -> the byte."""
        piece = self.id_to_token(token_id)
        if token_id in self.special_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")  # a non-special added token stored as plain text
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def _encode_parts(self, parts: Sequence[cf.ChatPart]) -> tuple[list[int], list[int]]:
        # Encode the whole rendered text (exactly what apply_chat_template tokenizes), then place each change
        # of the train flag: normally at the first token starting after it; when a token's span straddles it
        # (byte-fallback runs share one span), at the longest common prefix with the text before it.
        text = "".join(p.text for p in parts)
        enc = self._tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        flags: list[bool] = []
        bounds: list[int] = []  # char position where flags[j + 1] starts
        pos = 0
        for p in parts:
            if p.text and (not flags or flags[-1] != p.train):
                if flags:
                    bounds.append(pos)
                flags.append(p.train)
            pos += len(p.text)
        starts = [0]
        for b in bounds:
            k = next((i for i, (s, _) in enumerate(offsets) if s >= b), len(ids))
            if any(s < b < e for s, e in offsets[starts[-1]:k]):
                prefix = self._tok.encode(text[:b], add_special_tokens=False).ids
                k = 0
                while k < min(len(prefix), len(ids)) and prefix[k] == ids[k]:
                    k += 1
            starts.append(max(k, starts[-1]))
        starts.append(len(ids))
        mask: list[int] = []
        for j, flag in enumerate(flags):
            mask += [int(flag)] * (starts[j + 1] - starts[j])
        return ids, mask

    def _write_model_files(self, out: Path) -> None:
        atomic_write_text(out / "tokenizer.json", self._tok.to_str())


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path, default_system: str | None = None) -> Tokenizer:
    """A sentencepiece ``.model`` file, a ``tokenizer.json`` file, or a folder with ``tokenizer.json``
    (preferred, with ``tokenizer_config.json`` for special tokens) or ``tokenizer.model``."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            cfg_path = path / "tokenizer_config.json"
            config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
            return HFTokenizer((path / "tokenizer.json").read_text(encoding="utf-8"), config, str(path), default_system)
        if (path / "tokenizer.model").exists():
            path = path / "tokenizer.model"
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
    if not path.exists():
        raise TokenizerError(f"{path}: tokenizer file not found")
    if path.suffix == ".json":
        return HFTokenizer(path.read_text(encoding="utf-8"), {}, str(path), default_system)
    return SentencePieceTokenizer(path.read_bytes(), str(path), default_system)


def default_tokenizer_path() -> Path:
    """Path of the embedded sentencepiece model."""
    return Path(str(importlib.resources.files("ditto_jax"))) / DEFAULT_TOKENIZER_ASSET


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The embedded sentencepiece tokenizer (English + Chinese, byte fallback, ChatML tokens)."""
    path = default_tokenizer_path()
    if not path.exists():
        raise TokenizerError(f"{path}: embedded tokenizer missing (run scripts/make_tokenizer.py)")
    return load_tokenizer(path)
