"""GGUF import: logits equal transformers' reading of the same file (``gguf_file=``) to 1e-4 for llama, qwen2,
qwen3 and a Mistral-variant file over F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q5_K/Q6_K tensors; lossless files
equal the original transformers model (Q/K un-permutation); greedy chat generation token for token; the
tokenizer and chat template from the metadata; ``convert from-gguf`` and ``to-hf`` from a GGUF file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import (
    CHATML,
    TEXTS,
    VOCAB,
    hf_model_for,
    transformers_model,
    transformers_tokenizer,
    write_gguf,
)
from hf_fixtures import forward, hf_logits

from ditto_jax import checkpoints
from ditto_jax.checkpoints import (
    ModelSource,
    gguf_tokenizer,
    load_model,
    load_model_source,
)
from ditto_jax.cli import main
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams

# family -> tensor types by GGUF name fragment (first match; "*" for the other 2-D tensors; 1-D stay F32)
TYPES = {
    "llama": {"token_embd": Q.Q8_0, "ffn_down": Q.Q4_K, "attn_q": Q.Q4_0, "*": Q.F16},
    "qwen2": {"ffn_down": Q.Q5_K, "attn": Q.Q4_1, "*": Q.BF16},
    "qwen3": {"ffn_down": Q.Q6_K, "ffn": Q.Q8_0, "*": Q.F16},
    "mistral": {"ffn_down": Q.Q4_K, "attn": Q.Q5_0, "*": Q.Q8_0},
}
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 11)).astype(np.int32)
MESSAGES = [
    [{"role": "system", "content": "You are Edward III of England."}, {"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "你好！今天天气怎么样？"}],
]


def _logits(model, ids) -> np.ndarray:
    """float32 logits of a transformers model loaded from GGUF (already float32; ``.float()`` is refused)."""
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {family: write_gguf(root / f"{family}.gguf", family, types) for family, types in TYPES.items()}


@pytest.fixture(scope="module")
def references(files):
    return {family: transformers_model(path) for family, path in files.items()}


def test_fixture_files_cover_the_tensor_types(files):
    seen = {t.tensor_type.name for path in files.values() for t in gguf.GGUFReader(path).tensors}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"} <= seen
    assert set(checkpoints.supported_tensor_types()) >= seen


@pytest.mark.parametrize("family", list(TYPES))
def test_logits_match_transformers_reading_the_same_file(files, references, family):
    model, cfg = load_model(files[family])
    want = references[family]
    expected_arch = {"mistral": "mistral"}.get(family, family)
    assert cfg.architecture == expected_arch and cfg.param_dtype == "float32"
    assert cfg.tie_word_embeddings == (family == "llama")
    assert cfg.vocab_size == VOCAB and cfg.num_layers == 2 and cfg.dim_per_head == (128 if family == "qwen3" else 16)
    np.testing.assert_allclose(forward(model, IDS), _logits(want, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(TYPES))
def test_lossless_file_equals_the_original_transformers_model(tmp_path, family):
    path = write_gguf(tmp_path / f"{family}-f32.gguf", family, {}, seed=5)
    model, _ = load_model(path)
    np.testing.assert_allclose(forward(model, IDS), hf_logits(hf_model_for(family, seed=5), IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tokenizer_and_chat_template_match_transformers(files, family):
    ours, theirs = gguf_tokenizer(files[family]), transformers_tokenizer(files[family])
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special=False) == theirs.decode(theirs.encode(text, add_special_tokens=False))
    assert ours.vocab_size == len(theirs) == VOCAB
    assert ours.chat_template == CHATML
    assert (ours.eos_id, ours.bos_id) == (theirs.eos_token_id, theirs.bos_token_id)
    for messages in MESSAGES:
        want = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ours.encode_chat(messages, add_generation_prompt=True)[0] == want


def test_sentencepiece_style_tokenizer_matches_transformers(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", "llama", tokenizer="llama")
    ours, theirs = gguf_tokenizer(path), transformers_tokenizer(path)
    for text in [*TEXTS, "Hello", " Hello  world ", "a\nb", "quick brown foxes"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special=False) == theirs.decode(ids), text
    assert any(0x03 <= i < 259 for i in ours.encode(TEXTS[2]))  # Chinese went through byte fallback
    assert (ours.bos_id, ours.eos_id) == (1, 2) and ours.vocab_size == len(theirs) == VOCAB
    chat = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A fox."},
            {"role": "user", "content": "你好"}]
    want = theirs.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert ours.encode_chat(chat)[0] == want


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_chat_generation_matches_transformers(files, references, family):
    model, _, tokenizer = load_model_source(ModelSource(path=str(files[family])))
    prompts = [tokenizer.encode_chat(m, add_generation_prompt=True)[0] for m in MESSAGES]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=sorted(tokenizer.stop_ids))
    engine = SamplingEngine(model, tokenizer, batch_size=2, max_len=64, chunk=8, prefill_batch=1)
    got = {r.id: r.output_ids for r in engine.generate(Request(f"p{i}", p, params) for i, p in enumerate(prompts))}
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            want = references[family].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                               eos_token_id=sorted(tokenizer.stop_ids),
                                               pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
        assert got[f"p{i}"] == want


def test_convert_from_gguf_writes_the_from_hf_layout(files, references, tmp_path, capsys):
    src, dst = files["qwen3"], tmp_path / "ckpt"
    assert main(["convert", "from-gguf", str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert checkpoints.is_model_checkpoint(dst) and checkpoints.tokenizer_dir(dst) == dst / "tokenizer"
    direct, _ = load_model(src)
    converted, _ = load_model(dst)
    np.testing.assert_array_equal(forward(converted, IDS), forward(direct, IDS))
    _, _, tok = load_model_source(ModelSource(path=str(dst)))
    ref_tok = gguf_tokenizer(src)
    assert [tok.encode(t) for t in TEXTS] == [ref_tok.encode(t) for t in TEXTS]
    assert tok.chat_template == CHATML and tok.eos_id == ref_tok.eos_id
    # a GGUF file straight to a Hugging Face folder that transformers loads with the same logits
    hf_dir = tmp_path / "hf"
    assert main(["convert", "to-hf", str(src), str(hf_dir)]) == 0
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(again, IDS), _logits(references["qwen3"], IDS), atol=1e-4, rtol=0)
    loaded = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert loaded.encode(TEXTS[2], add_special_tokens=False) == ref_tok.encode(TEXTS[2])


def test_convert_from_gguf_dtype(files, tmp_path):
    dst = tmp_path / "bf16"
    assert main(["convert", "from-gguf", str(files["llama"]), str(dst), "--dtype", "bfloat16"]) == 0
    model, cfg = load_model(dst)
    assert cfg.param_dtype == "bfloat16" and model.embed_tokens[...].dtype.name == "bfloat16"
