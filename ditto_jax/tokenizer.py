"""One tokenizer interface over sentencepiece models and Hugging Face ``tokenizer.json`` files.

``load_tokenizer(path)`` takes a sentencepiece ``.model`` file or a folder holding ``tokenizer.json`` (Qwen,
Llama-3, ... via the ``tokenizers`` library) or ``tokenizer.model``; ``default_tokenizer()`` is the small
sentencepiece model embedded in the package (``ditto_jax/data/assets/tokenizer.model``).

Chat: the checkpoint's own Jinja chat template when it has one (``chat_template`` in the config dict, read
from ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``; a GGUF's
``tokenizer.chat_template``), rendered as transformers renders it (``chat_format.render_template``). Without a
template, the fallback: ChatML (``<|im_start|>``/``<|im_end|>``, Qwen2's layout) unless the tokenizer has the
Llama-3 header tokens; a template-less tokenizer without the ChatML tokens gets them appended after its vocabulary
(``<|im_start|>`` = old size, ``<|im_end|>`` = old size + 1), so the model vocab, ids and exported files agree.
A tokenizer with a template is never extended.

``encode_chat`` returns exactly the ids of transformers' ``apply_chat_template`` with the template that ``save``
writes (the checkpoint's own, or the fallback's equivalent), plus a loss mask over assistant tokens: a token is
trained when it overlaps an assistant span (``{% generation %}`` blocks, else the located assistant content and
its end-of-turn token; see ``chat_format``), which is transformers' ``return_assistant_tokens_mask`` rule.
``chat_text`` is the rendered string. Every chat encoding in the project (simulation prompts, SFT corpus, eval,
sample) goes through these two.
Special-token text inside ``encode``'d strings becomes the special token (as in ``tokenizers`` by default).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from ditto_jax import chat_format as cf
from ditto_jax.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from ditto_jax.spm_export import spm_to_tokenizers

DEFAULT_TOKENIZER_ASSET = "data/assets/tokenizer.model"

Messages = Sequence[Mapping[str, str]]


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or lacks a required token."""


class Tokenizer(ABC):
    """Text <-> ids, chat encoding with a loss mask, token bytes for constrained decoding, HF export.

    Attributes: ``vocab_size`` (ids are ``< vocab_size``), ``eos_id``, ``pad_id``, ``bos_id`` (None when the
    tokenizer has none), ``im_start_id``/``im_end_id`` (the turn-start/end tokens: ChatML's, Llama-3's
    ``<|start_header_id|>``/``<|eot_id|>``; with a template, the first special token of its generation header
    (None if it has none) and the special token that follows an assistant message's content (else EOS)),
    ``special_ids``, ``stop_ids`` (ids that end a generated turn), ``chat_format`` ("template" | "chatml" |
    "llama3"), ``default_system`` (fallback ChatML only: system text used when a conversation has none; None =
    no default; a template decides this itself).
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    im_start_id: int | None
    im_end_id: int
    special_ids: frozenset[int]
    chat_format: cf.ChatFormat
    default_system: str | None = None
    source: str = "<tokenizer>"
    _template: str | None = None  # the checkpoint's chat template (None: fallback format)
    _template_vars: ClassVar[dict[str, str]] = {}  # replaced per instance by _use_template
    _template_marked = False
    _template_header = ""

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
    def _encode_rendered(self, rendered: cf.RenderedChat) -> tuple[list[int], list[int]]:
        """Ids of the rendered text (as encoding it whole) and the per-id train flags of its spans."""

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
        """The Jinja template ``encode_chat`` renders: the checkpoint's own, else the fallback format's
        equivalent (what ``save`` writes)."""
        if self._template is not None:
            return self._template
        if self.chat_format == "llama3":
            return cf.LLAMA3_TEMPLATE
        return cf.chatml_template(self.default_system)

    @property
    def has_own_template(self) -> bool:
        """Whether chats are rendered with the checkpoint's template (False: the hand-written fallback)."""
        return self._template is not None

    def _use_template(self, template: str, variables: Mapping[str, str]) -> None:
        """Render chats with ``template``; find the turn tokens from probe renderings (needs ``special_ids``,
        ``eos_id``)."""
        self._template = template
        self._template_vars = dict(variables)
        self._template_marked = cf.has_generation_marks(template)
        cf.compile_template(template, self.source)  # syntax errors surface at load time, naming the file
        self._template_header = cf.generation_header(template, self._template_vars, self.source)
        specials = {self.id_to_token(i): i for i in self.special_ids}
        by_length = sorted(specials, key=len, reverse=True)
        starts = [(self._template_header.find(t), -len(t), t) for t in by_length if t in self._template_header]
        self.im_start_id = specials[min(starts)[2]] if starts else None
        self.im_end_id = self.eos_id
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ditto probe reply"}]
        try:
            text, _ = cf.render_template(template, probe, False, self._template_vars, self.source)
        except cf.ChatError:
            return
        pos = text.rfind("ditto probe reply")
        if pos >= 0:
            rest = text[pos + len("ditto probe reply"):].lstrip()
            end = next((t for t in by_length if rest.startswith(t)), None)
            if end is not None:
                self.im_end_id = specials[end]

    def render_chat(self, messages: Messages, add_generation_prompt: bool = False) -> cf.RenderedChat:
        """The rendered conversation and its assistant spans (``ChatError`` for an unknown role, bad content,
        or a template that refuses the conversation)."""
        cf.check_messages(messages)
        if self._template is not None:
            text, marked = cf.render_template(self._template, messages, add_generation_prompt, self._template_vars,
                                              self.source)
            if self._template_marked:
                return cf.RenderedChat(text, tuple(marked))
            end_tokens = [self.id_to_token(self.im_end_id), self.id_to_token(self.eos_id)]
            spans = cf.locate_assistant_spans(text, messages, self._template_header, end_tokens)
            return cf.RenderedChat(text, tuple(spans))
        if self.chat_format == "llama3":
            bos = self.id_to_token(self.bos_id) if self.bos_id is not None else None
            return cf.parts_to_rendered(cf.render_llama3(messages, add_generation_prompt, bos=bos))
        return cf.parts_to_rendered(cf.render_chatml(messages, add_generation_prompt, self.default_system))

    def chat_text(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The rendered conversation as one string (``apply_chat_template(..., tokenize=False)``)."""
        return self.render_chat(messages, add_generation_prompt).text

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """``(ids, loss_mask)``: ids equal ``apply_chat_template(messages, tokenize=True)``; mask 1 on tokens
        overlapping an assistant span (content and its end-of-turn token), 0 elsewhere."""
        return self._encode_rendered(self.render_chat(messages, add_generation_prompt))

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
        turn_tokens = [self.id_to_token(i) for i in (self.im_start_id, self.im_end_id) if i is not None]
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
    """A sentencepiece model (+ an optional ``tokenizer_config.json`` dict whose ``chat_template`` is used);
    without a template, ChatML tokens it lacks are appended after its vocabulary."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>", default_system: str | None = None,
                 config: Mapping[str, object] | None = None):
        self._model_proto = bytes(model_proto)
        self.source = source
        self._config = dict(config or {})
        template = _template_from_config(self._config, source)
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
        self._appended: list[str] = [] if template is not None else [
            t for t in (cf.IM_START, cf.IM_END) if t not in self._piece_ids]
        for j, text in enumerate(self._appended):
            self._piece_ids[text] = self._sp_size + j
        self.vocab_size = self._sp_size + len(self._appended)
        self.chat_format = "chatml" if template is None else "template"
        self.default_system = default_system
        special = {i for i, t in enumerate(self._types) if t in (_CONTROL, _USER_DEFINED)}
        special |= set(range(self._sp_size, self.vocab_size))
        self.special_ids = frozenset(special)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if template is None:
            self.im_start_id = self._piece_ids[cf.IM_START]
            self.im_end_id = self._piece_ids[cf.IM_END]
            eos = self._sp.eos_id()
            self.eos_id = eos if eos >= 0 else self.im_end_id
        else:
            eos = self._piece_ids.get(_token_from_config(self._config.get("eos_token")) or "", self._sp.eos_id())
            if eos < 0:
                raise TokenizerError(f"{source}: no EOS token (neither eos_token in the config nor in the model)")
            self.eos_id = eos
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id
        # Control pieces (e.g. <pad>, </s>) and appended tokens are not matched by sentencepiece itself.
        self._split_texts = [self._token_text(i) for i in sorted(special) if self._token_text(i)]
        self._split_re = _longest_first_pattern(self._split_texts)
        if template is not None:
            pieces = {"bos_token": self.bos_id, "eos_token": self.eos_id}
            variables = _template_variables(self._config) or {
                k: self.id_to_token(i) for k, i in pieces.items() if i is not None}
            self._use_template(template, variables)

    # pickling (grain worker processes) ships the model bytes, not the C++ processor
    def __getstate__(self) -> dict:
        return {"model_proto": self._model_proto, "source": self.source, "default_system": self.default_system,
                "config": self._config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["source"], state["default_system"], state.get("config"))

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

    def _encode_rendered(self, rendered: cf.RenderedChat) -> tuple[list[int], list[int]]:
        # sentencepiece gives no offsets: each span edge starts at the longest common prefix of the full encoding
        # with the encoding of the text before the edge
        text = rendered.text
        ids = self.encode(text)
        edges = sorted({e for span in rendered.spans for e in span if 0 < e < len(text)})
        token_at: dict[int, int] = {0: 0, len(text): len(ids)}
        for e in edges:
            pre = self.encode(text[:e])
            k = 0
            while k < min(len(pre), len(ids)) and pre[k] == ids[k]:
                k += 1
            token_at[e] = k
        mask = [0] * len(ids)
        for a, b in rendered.spans:
            for t in range(token_at[a], token_at[b] if b > a else token_at[a]):
                mask[t] = 1
        return ids, mask

    def to_hf_tokenizer(self):
        """The equivalent ``tokenizers.Tokenizer`` (specials and appended ChatML tokens included)."""

        specials = [(i, self.id_to_token(i)) for i in sorted(self.special_ids)]
        return spm_to_tokenizers(self._model_proto, specials)

    def _write_model_files(self, out: Path) -> None:
        atomic_write_bytes(out / "tokenizer.model", self._model_proto)
        atomic_write_text(out / "tokenizer.json", self.to_hf_tokenizer().to_str())


# ------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers (tokenizer.json)
# ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: byte -> the printable character byte-level BPE shows for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of :func:`byte_alphabet`."""
    return {c: b for b, c in byte_alphabet().items()}


def _token_from_config(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _template_variables(config: Mapping[str, object]) -> dict[str, str]:
    """The special tokens a template sees (transformers passes ``special_tokens_map``: the ones that are set)."""
    out = {}
    for key in _TEMPLATE_TOKEN_KEYS:
        token = _token_from_config(config.get(key))
        if token is not None:
            out[key] = token
    return out


def _template_from_config(config: Mapping[str, object], source: str) -> str | None:
    """The ``chat_template`` of a tokenizer config: a string, or the ``default`` of named templates."""
    value = config.get("chat_template")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    named = value.items() if isinstance(value, dict) else (
        ((t.get("name"), t.get("template")) for t in value if isinstance(t, dict)) if isinstance(value, list) else None)
    if named is None:
        raise TokenizerError(f"{source}: chat_template must be a string or named templates, got {type(value).__name__}")
    templates = dict(named)
    if isinstance(templates.get("default"), str):
        return templates["default"]
    raise TokenizerError(f"{source}: chat_template has named templates {sorted(map(str, templates))} but no 'default'")


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer (``tokenizer.json``) plus ``tokenizer_config.json`` special tokens."""

    _EOS_FALLBACK = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", cf.EOT, cf.IM_END)

    def __init__(self, tokenizer_json: str, config: Mapping[str, object] | None = None, source: str = "<json>",
                 default_system: str | None = None):
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
        template = _template_from_config(self._config, source)
        if template is not None:
            self.chat_format = "template"
        elif self._tok.token_to_id(cf.HEADER_START) is not None and self._tok.token_to_id(cf.EOT) is not None:
            self.chat_format = "llama3"
            self.im_start_id, self.im_end_id = self._tok.token_to_id(cf.HEADER_START), self._tok.token_to_id(cf.EOT)
        else:
            self.chat_format = "chatml"
            missing = [t for t in (cf.IM_START, cf.IM_END) if self._tok.token_to_id(t) is None]
            if missing:  # appended after the vocabulary, in this order
                self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            self.im_start_id, self.im_end_id = self._tok.token_to_id(cf.IM_START), self._tok.token_to_id(cf.IM_END)
        if template is None:
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
            eos_id = next((self._tok.token_to_id(t) for t in self._EOS_FALLBACK if self._tok.token_to_id(t) is not None),
                          None)
        if eos_id is None:
            raise TokenizerError(f"{source}: no EOS token (eos_token in the config, or one of {self._EOS_FALLBACK})")
        self.eos_id = eos_id
        pad = _token_from_config(self._config.get("pad_token"))
        pad_id = self._tok.token_to_id(pad) if pad else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        # the decoder's own JSON (the whole tokenizer's, 49k tokens, took ~0.2 s to write and parse)
        decoder = self._tok.decoder
        self._byte_level = decoder is not None and b"ByteLevel" in decoder.__getstate__()
        if template is not None:
            self._use_template(template, _template_variables(self._config))

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

    def _encode_rendered(self, rendered: cf.RenderedChat) -> tuple[list[int], list[int]]:
        # Encode the whole rendered text (exactly what apply_chat_template tokenizes); a token is trained when its
        # character offsets overlap a span (transformers' return_assistant_tokens_mask rule)
        enc = self._tok.encode(rendered.text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        spans = rendered.spans
        k = 0
        for t, (start, end) in enumerate(enc.offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k == len(spans):
                break
            if end > spans[k][0]:
                mask[t] = 1
        return list(enc.ids), mask

    def _write_model_files(self, out: Path) -> None:
        atomic_write_text(out / "tokenizer.json", self._tok.to_str())


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_tokenizer_config(folder: str | Path) -> dict:
    """``tokenizer_config.json`` of a folder (``{}`` if absent) with ``chat_template`` taken, as transformers
    does, from ``chat_template.jinja`` first, then ``chat_template.json``, then the config itself."""
    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    config = _read_json(cfg_path) if cfg_path.exists() else {}
    if (folder / "chat_template.jinja").exists():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").exists():
        template = _read_json(folder / "chat_template.json").get("chat_template")
        if template is not None:
            config["chat_template"] = template
    return config


def load_tokenizer(path: str | Path, default_system: str | None = None) -> Tokenizer:
    """A sentencepiece ``.model`` file, a ``tokenizer.json`` file, or a folder with ``tokenizer.json``
    (preferred) or ``tokenizer.model``, plus its ``tokenizer_config.json`` (special tokens) and chat template
    (``read_tokenizer_config``). ``default_system`` applies to the fallback ChatML format only."""
    path = Path(path)
    if path.is_dir():
        config = read_tokenizer_config(path)
        if (path / "tokenizer.json").exists():
            return HFTokenizer((path / "tokenizer.json").read_text(encoding="utf-8"), config, str(path), default_system)
        if (path / "tokenizer.model").exists():
            return SentencePieceTokenizer((path / "tokenizer.model").read_bytes(), str(path), default_system, config)
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
