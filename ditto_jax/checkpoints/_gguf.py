"""GGUF files (llama.cpp's format) as a model source: config, weights and tokenizer from one file.

Read with the ``gguf`` package (``GGUFReader`` and its NumPy dequantisation; no llama.cpp); Q4_0/Q4_1/Q8_0 tensors
are dequantised by ``kernels.cpu.dequantize_gguf`` where the CPU kernels run (the same values, ~10x faster).
Tensor names go GGUF -> Hugging Face (``gguf``'s own name table) -> ours (``ditto_jax.hf.mapping``), so the
weights stream through the same checked, layer-by-layer loader as a safetensors folder; only one tensor is
dequantised in host memory at a time. llama.cpp permutes the rows of llama-family Q/K projections for its
rotary layout; that is undone here. The tokenizer is rebuilt from ``tokenizer.ggml.*`` as a ``tokenizers`` BPE
(byte-level for ``gpt2``, SentencePiece-style with byte fallback for ``llama``), the same way transformers reads
a GGUF file.
"""

from __future__ import annotations

import concurrent.futures
import functools
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants
from jax.sharding import Mesh
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from ditto_jax.checkpoints._errors import CheckpointError
from ditto_jax.hf.config import HFCheckpointError
from ditto_jax.hf.load import build_model
from ditto_jax.hf.mapping import expected_tensors
from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.model.config import ModelConfig
from ditto_jax.model.transformer import FUSED, Transformer, set_decode_source
from ditto_jax.tokenizer import HFTokenizer, byte_alphabet

# general.architecture -> (gguf's architecture enum, our architecture)
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, "llama"),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, "qwen2"),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, "qwen3"),
}
PERMUTED_QK = ("llama", "mistral")  # llama.cpp's convert permutes Q/K rows for these
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
# token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4


def supported_tensor_types() -> list[str]:
    """Every GGML tensor type the installed ``gguf`` package can dequantise."""
    return [t.name for t in FLOAT_TYPES] + sorted(t.name for t in quants._type_traits)


def _open(path: Path) -> GGUFReader:
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    return _open_cached(str(path.absolute()), stat.st_mtime_ns, stat.st_size)


class _Reader(GGUFReader):
    """``GGUFReader`` over a plain ndarray view of its memory map: the reader slices the file once per field
    element, and ``np.memmap``'s Python-level slicing hooks made parsing SmolLM2's 49k-token vocabulary take ~4 s
    (0.6 s without them). Tensors stay views of the mapped file."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)

    # The reader's own ``_get`` builds a throwaway array per call to learn the item size, and reads every string
    # as two such calls: the same views, made directly (SmolLM2's metadata 0.67 -> 0.41 s; tests compare every field).
    # A read past the end of the file is an error here (the reader's own returns a shorter view).
    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        dt, count = np.dtype(dtype), int(count)
        arr = self._plain[offset:offset + dt.itemsize * count].view(dt)[:count]
        if len(arr) < count:
            raise IndexError(f"{count} x {dt} at offset {offset} runs past the end of the file")
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_str(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        length = self._plain[offset:offset + 8].view(_length_type(self.byte_order))
        if len(length) < 1:
            raise IndexError(f"a string's length at offset {offset} runs past the end of the file")
        n = int(length[0])
        text = self._plain[offset + 8:offset + 8 + n]
        if len(text) < n:
            raise IndexError(f"a string of {n} bytes at offset {offset} runs past the end of the file")
        return length, text

    # Arrays are most of a tokenizer's metadata (SmolLM2: 49k tokens, 49k merges, 49k token types), and the reader
    # parses them by one recursive call per element. An array of strings or scalars is read here in one loop,
    # into the same parts, data indices and types (other arrays: the reader's own way).
    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, count, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        types: list[Any] = [gguf.GGUFValueType.ARRAY] + ([itype] if count else [])
        parts: list[np.ndarray] = [raw_itype, alen]
        if itype == gguf.GGUFValueType.STRING:
            for _ in range(count):
                length, text = self._get_str(offs)
                parts += (length, text)
                offs += 8 + len(text)
            return offs - orig_offs, parts, list(range(3, 3 + 2 * count, 2)), types
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # an array of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, count)
        parts += (values[i:i + 1] for i in range(count))
        return 12 + values.nbytes, parts, list(range(2, 2 + count)), types


@functools.cache
def _length_type(order: str) -> np.dtype:
    return np.dtype(np.uint64).newbyteorder(order)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFReader:
    """One parsed reader per file version (parsing a 50k-token vocabulary takes seconds)."""
    try:
        return _Reader(path, "r")
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file: {' '.join(str(exc).split())}") from None


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


class GGUFModel:
    """The metadata of a GGUF file, its ``ModelConfig`` and the GGUF <-> HF tensor names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _open(self.path)
        self.arch_name = _field(self.reader, "general.architecture")
        if self.arch_name not in ARCHITECTURES:
            raise CheckpointError(f"{self.path}: unsupported architecture {self.arch_name!r} (metadata "
                                  f"general.architecture); supported: {', '.join(ARCHITECTURES)} (Mistral files "
                                  f"use llama)")
        self.gguf_arch, arch = ARCHITECTURES[self.arch_name]
        name = str(_field(self.reader, "general.name", "") or "")
        if arch == "llama" and "mistral" in name.lower():
            arch = "mistral"
        self.tensors = {t.name: t for t in self.reader.tensors}
        supported = supported_tensor_types()
        for t in self.reader.tensors:
            if t.tensor_type.name not in supported:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be "
                                      f"dequantised (supported: {', '.join(supported)})")
        self.cfg = self._config(arch)
        self.gguf_to_hf = self._names()

    def _key(self, suffix: str, default: Any = None, required: bool = False) -> Any:
        key = f"{self.arch_name}.{suffix}"
        value = _field(self.reader, key, default)
        if value is None and required:
            raise CheckpointError(f"{self.path}: required metadata {key!r} is missing")
        return value

    def _config(self, arch: str) -> ModelConfig:
        heads = int(self._key("attention.head_count", required=True))
        hidden = int(self._key("embedding_length", required=True))
        embd = self.tensors.get("token_embd.weight")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = self._key("vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None and embd is not None:
            vocab = int(embd.shape[-1])
        head_dim = self._key("attention.key_length") or self._key("rope.dimension_count")
        scaling = self._key("rope.scaling.type")
        if scaling not in (None, "none"):
            raise CheckpointError(f"{self.path}: rope scaling {scaling!r} (metadata {self.arch_name}.rope.scaling.type) "
                                  f"is not supported")
        values = dict(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(self._key("block_count", required=True)),
            num_heads=heads,
            num_kv_heads=int(self._key("attention.head_count_kv", heads)),
            head_dim=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
            intermediate_size=int(self._key("feed_forward_length", required=True)),
            rope_theta=float(self._key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in self.tensors,
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            max_position_embeddings=int(self._key("context_length", 4096)),
            param_dtype="float32",
            dtype="float32",
            bos_token_id=_field(self.reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(self.reader, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_field(self.reader, "tokenizer.ggml.padding_token_id"),
        )
        try:
            return ModelConfig(**values)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: metadata gives an invalid model config: "
                                  f"{' '.join(str(exc).split())}") from None

    def _names(self) -> dict[str, str]:
        """GGUF tensor name -> HF tensor name for every tensor of the file (an error names any other)."""
        table = gguf.get_tensor_name_map(self.gguf_arch, self.cfg.num_layers)
        out: dict[str, str] = {}
        for hf_name in expected_tensors(self.cfg):
            base, _, suffix = hf_name.rpartition(".")
            gguf_base = table.get_name(base)
            if gguf_base is not None:
                out[f"{gguf_base}.{suffix}"] = hf_name
        extra = [n for n in self.tensors if n not in out]
        if "rope_freqs.weight" in extra:
            raise CheckpointError(f"{self.path}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency rope scaling, "
                                  f"e.g. Llama 3.1) is not supported; convert the Hugging Face folder instead")
        if extra:
            shown = ", ".join(f"{n!r} ({self.tensors[n].tensor_type.name})" for n in extra[:5])
            raise CheckpointError(f"{self.path}: {len(extra)} tensor(s) this {self.cfg.architecture} model does not "
                                  f"use: {shown}")
        return out


class GGUFTensorReader:
    """The tensors of a GGUF file under their HF names and in HF layout (``hf.load.build_model``'s reader).

    A tensor is dequantised to float32 when first sliced and kept until another one is asked for, so the
    host holds one dequantised tensor at a time.
    """

    def __init__(self, model: GGUFModel):
        self.model = model
        self.path = model.path
        self.hf_to_gguf = {hf: g for g, hf in model.gguf_to_hf.items()}
        self.files = {hf: model.path for hf in self.hf_to_gguf}
        self._cached: tuple[str, np.ndarray] | None = None

    def __enter__(self) -> GGUFTensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cached = None

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF (numpy, row-major) shape of tensor ``name``."""
        return tuple(int(d) for d in reversed(self.model.tensors[self.hf_to_gguf[name]].shape))

    def dtype(self, name: str) -> str:
        """Always float32: what dequantisation yields."""
        return "float32"

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantised, in HF layout (llama-family Q/K rows un-permuted)."""
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        self._cached = None
        tensor = self.model.tensors[self.hf_to_gguf[name]]
        try:
            if tensor.tensor_type.name in cpu_kernels.GGUF_KINDS and cpu_kernels.available():
                data = cpu_kernels.dequantize_gguf(tensor.tensor_type.name, tensor.data)  # the same values, ~10x
            else:
                data = quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot dequantise tensor {tensor.name!r} of type "
                                  f"{tensor.tensor_type.name}: {exc}") from None
        data = np.asarray(data, dtype=np.float32).reshape(self.shape(name))
        cfg = self.model.cfg
        if cfg.architecture in PERMUTED_QK and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            data = unpermute_qk(data, heads)
        self._cached = (name, data)
        return data

    def slice(self, name: str) -> _Lazy:
        """An indexable view of tensor ``name`` (dequantised on first use)."""
        return _Lazy(self, name)


class _Lazy:
    def __init__(self, reader: GGUFTensorReader, name: str):
        self.reader, self.name = reader, name

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.reader.array(self.name)[index]


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection (``[heads * head_dim, in]``)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, mesh: Mesh | None = None, dtype: str | None = None,
              rules: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """``(model, cfg)`` from a GGUF file (float32 unless ``dtype``), every parameter placed in its sharding.

    The decode step may read the file's Q4_0/Q4_1/Q8_0 blocks instead of a float copy of those matrices
    (``model.set_decode_source``): the same float32 values, a fifth to a third of the bytes."""
    model = GGUFModel(path)
    blocks = None
    if (dtype is None or np.dtype(dtype) == np.float32) and _one_cpu_device(mesh) and cpu_kernels.decode_reason() is None:
        # laid out on a second core while this one dequantises (numpy releases the GIL): ~0.4 s of the load
        blocks = _BACKGROUND.submit(decode_blocks, model, model.cfg)
    with GGUFTensorReader(model) as reader:
        try:
            built, cfg = build_model(reader, model.cfg, mesh, dtype, rules)
        except HFCheckpointError as exc:
            raise CheckpointError(str(exc)) from None
    set_decode_source(built, blocks.result if blocks is not None else functools.partial(decode_blocks, model, cfg))
    return built, cfg


_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-blocks")


def _one_cpu_device(mesh: Mesh | None) -> bool:
    devices = mesh.devices.flat if mesh is not None else jax.local_devices()[:1]
    return len(list(devices)) == 1 and jax.default_backend() == "cpu"


def decode_blocks(model: GGUFModel, cfg: ModelConfig) -> dict[str, Any]:
    """The decode step's matrices kept in the file's blocks, for ``set_decode_source``: per layer the fused
    ``qkv``/``o``/``gate_up``/``down`` whose parts are all of one kept type (``kernels.cpu.GGUF_KINDS``) and
    width a multiple of 32, and the head (``lm_head``, or the tied embedding); others keep the float copy."""
    hf_to_gguf = {hf: g for g, hf in model.gguf_to_hf.items()}

    def weight(hf_name: str) -> cpu_kernels.QuantWeight | None:
        tensor = model.tensors.get(hf_to_gguf.get(hf_name, ""))
        kind = None if tensor is None else tensor.tensor_type.name
        if kind not in cpu_kernels.GGUF_KINDS or tensor.shape[1] % cpu_kernels.TILE:  # gguf shape: [K, N]
            return None
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(int(tensor.shape[1]), -1)
        if cfg.architecture in PERMUTED_QK and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            blocks = unpermute_qk(blocks, cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads)
        return cpu_kernels.quant_weight(cpu_kernels.pack_gguf(kind, blocks))

    kinds: set[str] = set()
    layers = []
    for i in range(cfg.num_layers):
        out = {}
        for name, parts in FUSED.items():
            found = [weight(f"model.layers.{i}.{p}.weight") for p in parts]
            if all(f is not None for f in found) and len({f.bits for f in found}) == 1:
                out[name] = found[0] if len(found) == 1 else cpu_kernels.concat_quant(found)
                kinds.update(model.tensors[hf_to_gguf[f"model.layers.{i}.{p}.weight"]].tensor_type.name
                             for p in parts)
        layers.append(out)
    head_name = "lm_head.weight" if "lm_head.weight" in hf_to_gguf else "model.embed_tokens.weight"
    head = weight(head_name)
    if head is not None:
        kinds.add(model.tensors[hf_to_gguf[head_name]].tensor_type.name)
    return {"layers": layers, "head": head, "kinds": tuple(sorted(kinds))}


# ------------------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------------------
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex its merges were learned with (others: GPT-2's byte-level regex)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary (highest score first), as transformers derives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _build_backend(path: Path, kind: str, pre: str | None, tokens: list[str], types: list[int],
                   merges: list[str] | None, scores: list[float] | None, unk: str | None) -> RustTokenizer:
    if kind == "gpt2":
        alphabet = byte_alphabet()
        spelled = set(alphabet.values())
        vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges or []]
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(pre or "")
        if split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        control_ok = lambda t: set(t) <= spelled
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else _sentencepiece_merges(tokens, scores or [0.0] * len(tokens))
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=True, byte_fallback=True,
                                       unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        control_ok = lambda t: True
    else:
        raise CheckpointError(f"{path}: tokenizer type {kind!r} (metadata tokenizer.ggml.model) is not supported; "
                              f"supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == CONTROL and control_ok(t)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def gguf_tokenizer(path: str | Path, default_system: str | None = None) -> HFTokenizer | None:
    """The tokenizer a GGUF file describes (``tokenizer.ggml.*``), its chat template and special tokens
    (``tokenizer.chat_template``, bos/eos/pad/unk ids) as an ``HFTokenizer``; None if the file has none."""
    path = Path(path)
    reader = _open(path)
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    tokens = list(tokens)
    types = list(_field(reader, "tokenizer.ggml.token_type", []) or [])
    merges = _field(reader, "tokenizer.ggml.merges")
    scores = _field(reader, "tokenizer.ggml.scores")

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    backend = _build_backend(path, kind, _field(reader, "tokenizer.ggml.pre"), tokens, types,
                             list(merges) if merges is not None else None,
                             [float(s) for s in scores] if scores is not None else None, token("unknown_token_id"))
    config: dict[str, Any] = {
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"), "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return HFTokenizer(backend.to_str(), config, source=str(path), default_system=default_system)

