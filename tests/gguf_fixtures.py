"""Small GGUF files written with ``gguf.GGUFWriter`` for the GGUF tests: random-init transformers models (one per
family) turned into llama.cpp's layout (tensor names, Q/K row permutation for llama-family), tensors quantised
with the ``gguf`` package's quantisers (K-quants, which it cannot quantise, as random blocks with sane scales),
and the metadata of a tiny byte-level BPE tokenizer trained here, with a ChatML chat template."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from hf_fixtures import make_hf_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
INST = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}")
CORPUS = [
    "Hello world! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. 12345 67890",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Role-play: you are Edward III of England, king of England.",
    "  spaces\tand\nnew lines, punctuation: ;:!?()[]{} 'quotes' \"double\"",
]
TEXTS = ["Hello world! How are you?", "  leading spaces\n\nnew lines\t12345", "你好，世界！今天", "naïve café 🙂",
         "<|im_start|>user\nhi<|im_end|>\n"]
VOCAB = 320  # byte alphabet + merges + specials; the model's vocab_size

# family -> (transformers fixture family, GGUF architecture, general.name, config overrides)
FAMILIES = {
    "llama": ("llama", "llama", "tiny-llama", dict(rope_scaling=None, tie_word_embeddings=True)),
    "qwen2": ("qwen2", "qwen2", "tiny-qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", "qwen3", "tiny-qwen3", dict(tie_word_embeddings=False, head_dim=128)),
    "mistral": ("mistral", "llama", "Mistral-Tiny-Instruct-v0.1", dict(tie_word_embeddings=False, sliding_window=None)),
}
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=1, eos_token_id=2, max_position_embeddings=128)


@functools.cache
def bpe_tokenizer() -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)`` of a tiny byte-level BPE trained on ``CORPUS`` (specials first)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) <= VOCAB
    tokens += [f"<|unused{i}|>" for i in range(VOCAB - len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [3 if t in SPECIALS else (4 if t.startswith("<|unused") else 1) for t in tokens]
    return tokens, types, merges


@functools.cache
def spm_tokenizer() -> tuple[list[str], list[int], list[float]]:
    """``(tokens, token_types, scores)`` of a tiny SentencePiece-style vocabulary (``tokenizer.ggml.model`` llama):
    ``<unk> <s> </s>``, the 256 byte-fallback pieces ``<0xNN>``, then ``▁``-marked pieces learned on the English
    part of ``CORPUS`` scored by merge order (no merges stored: readers derive them from the scores)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learned_size = VOCAB - 3 - 256 - 4
    trainer = trainers.BpeTrainer(vocab_size=learned_size, limit_alphabet=40, show_progress=False)
    tok.train_from_iterator([t for t in CORPUS if t.isascii()] * 20, trainer)
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned) + [4] * (VOCAB - 259 - len(learned))
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))] + [0.0] * (VOCAB - 259 - len(learned))
    return tokens, types, scores


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` permutation of Q/K rows (the inverse of what the reader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _kquant_blocks(rows: int, cols: int, qtype: Q, rng: np.random.RandomState) -> np.ndarray:
    """Random K-quant blocks (bytes) with small finite f16 scales (gguf cannot quantise K types itself)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = cols // block
    data = rng.randint(0, 256, (rows, nb, size)).astype(np.uint8)
    scale = lambda n: np.frombuffer(rng.uniform(0.002, 0.02, (rows, nb, n)).astype(np.float16).tobytes(),
                                    np.uint8).reshape(rows, nb, 2 * n)
    if qtype in (Q.Q4_K, Q.Q5_K):
        data[..., 0:4] = scale(2)  # d, dmin
    elif qtype == Q.Q6_K:
        data[..., size - 2:] = scale(1)  # d at the end
    else:
        raise ValueError(qtype)
    return data.reshape(rows, nb * size)


def _policy(name: str, shape: tuple[int, ...], types: dict[str, Q]) -> Q:
    """The tensor type of one tensor: 1-D tensors stay F32; 2-D ones by the first matching key of ``types``."""
    if len(shape) == 1:
        return Q.F32
    for key, qtype in types.items():
        if key in name:
            return qtype
    return types.get("*", Q.F32)


def hf_model_for(family: str, seed: int = 0):
    """The random-init transformers model ``write_gguf(path, family, seed=seed)`` writes (2 layers, float32)."""
    fixture_family, _, _, overrides = FAMILIES[family]
    return make_hf_model(fixture_family, seed=seed, **{**BASE, "num_hidden_layers": 2, **overrides})


def write_gguf(path: Path, family: str, types: dict[str, Q] | None = None, seed: int = 0,
               extra_tensors: dict[str, np.ndarray] | None = None, arch_override: str | None = None,
               with_tokenizer: bool = True, tokenizer: str = "gpt2") -> Path:
    """A GGUF file of a random-init ``family`` model; ``types`` maps GGUF name fragments to tensor types."""
    types = types or {}
    _, arch, name, _ = FAMILIES[family]
    hf_model = hf_model_for(family, seed)
    cfg = hf_model.config
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    rng = np.random.RandomState(seed + 100)
    writer = gguf.GGUFWriter(str(path), arch_override or arch)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if with_tokenizer and tokenizer == "llama":
        tokens, token_types, scores = spm_tokenizer()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_chat_template(INST)
    elif with_tokenizer:
        tokens, token_types, merges = bpe_tokenizer()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if family.startswith("qwen") else "default")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|im_start|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    permuted = arch == "llama"
    for hf_name, param in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(base)}.{suffix}"
        w = param.detach().to(torch.float32).numpy()
        if permuted and suffix == "weight" and (".q_proj" in base or ".k_proj" in base):
            w = permute_qk(w, cfg.num_attention_heads if ".q_proj" in base else cfg.num_key_value_heads)
        qtype = _policy(gguf_name, w.shape, types)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, w.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            writer.add_tensor(gguf_name, _kquant_blocks(w.shape[0], w.shape[1], qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    for extra_name, arr in (extra_tensors or {}).items():
        writer.add_tensor(extra_name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_model(path: Path):
    """transformers' own reading of the same file (``from_pretrained(dir, gguf_file=name)``), float32."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def transformers_tokenizer(path: Path):
    """transformers' tokenizer built from the same file's metadata."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
