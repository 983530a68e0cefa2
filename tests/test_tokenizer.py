"""Tokenizer: sentencepiece + tokenizers backends, ChatML/Llama-3 chat parity with transformers, export."""

from __future__ import annotations

import pickle

import pytest

from ditto_jax import chat_format as cf
from ditto_jax.tokenizer import HFTokenizer, default_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same layout with {% generation %} marks, so transformers computes the reference assistant mask.
QWEN2_MASK_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXTS = [
    "Hello there! How are you today?",
    "I am Edward III of England, king of England.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "你是李白，唐代著名的诗人。我不知道电脑是什么。",
    "Mixed 中文 and English 123 4567 — emoji 🙂 ok",
    "",
]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are Li Bai, a poet of the Tang dynasty."},
        {"role": "user", "content": "What do you think of the moon?"},
        {"role": "assistant", "content": "举头望明月，低头思故乡。 The moon is my old friend."},
        {"role": "user", "content": "Can you use a smartphone?"},
        {"role": "assistant", "content": "A smart... phone? I have never heard of such a thing.\n"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " hello "},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "空的系统提示"},
        {"role": "assistant", "content": ""},
    ],
]


def _train_byte_level(special: list[str]):
    """A small byte-level BPE (Qwen/Llama-3 style) built with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXTS * 20 + [m["content"] for c in CONVERSATIONS for m in c] * 20, trainer)
    return tok


def _hf_fast(tok, template: str, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special)


def _ids(batch) -> list[int]:
    return list(batch["input_ids"]) if hasattr(batch, "keys") else list(batch)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A Qwen2-style tokenizer folder written by transformers (tokenizer.json + config with template)."""
    tok = _train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf = _hf_fast(tok, QWEN2_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("qwen")
    hf.save_pretrained(out)
    return out


def test_chatml_equals_transformers_qwen2_template(qwen_dir):
    """The folder's own template (chat_template.jinja, located assistant spans) and the hand-written ChatML
    fallback (same layout, no template in the config) both equal transformers, mask included."""
    from_template = load_tokenizer(qwen_dir)
    ref = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    fallback = HFTokenizer(ref.backend_tokenizer.to_str(), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                           default_system="You are a helpful assistant.")
    masked = _hf_fast(ref.backend_tokenizer, QWEN2_MASK_TEMPLATE)
    assert (from_template.chat_format, fallback.chat_format) == ("template", "chatml")
    assert from_template.chat_template == QWEN2_TEMPLATE
    for ours in (from_template, fallback):
        assert ours.eos_id == ref.convert_tokens_to_ids("<|im_end|>")
        assert (ours.im_start_id, ours.im_end_id) == tuple(ref.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
        for conv in CONVERSATIONS:
            for gen in (False, True):
                ids, mask = ours.encode_chat(conv, add_generation_prompt=gen)
                assert ids == _ids(ref.apply_chat_template(conv, chat_template=QWEN2_TEMPLATE, add_generation_prompt=gen))
                assert ours.chat_text(conv, gen) == ref.apply_chat_template(
                    conv, chat_template=QWEN2_TEMPLATE, add_generation_prompt=gen, tokenize=False
                )
                out = masked.apply_chat_template(conv, add_generation_prompt=gen, return_assistant_tokens_mask=True,
                                                 return_dict=True)
                assert out["input_ids"] == ids
                assert mask == list(out["assistant_masks"])
            # every assistant <|im_end|> is trained, no other special token is
            ids, mask = ours.encode_chat(conv)
            n_assistant = sum(m["role"] == "assistant" for m in conv)
            assert sum(1 for i, m in zip(ids, mask) if m and i == ours.im_end_id) == n_assistant
            assert all(not m for i, m in zip(ids, mask) if i == ours.im_start_id)


def test_llama3_header_tokens_selected_and_match_transformers():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _train_byte_level(specials)
    ref = _hf_fast(tok, cf.LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ours = HFTokenizer(tok.to_str(), {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})  # no template
    assert ours.chat_format == "llama3" and not ours.has_own_template
    assert (ours.im_start_id, ours.im_end_id) == (tok.token_to_id("<|start_header_id|>"), tok.token_to_id("<|eot_id|>"))
    for conv in CONVERSATIONS:
        ids, mask = ours.encode_chat(conv, add_generation_prompt=True)
        assert ids == _ids(ref.apply_chat_template(conv, add_generation_prompt=True))
        assert ids[0] == ours.bos_id
        trained = ours.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
        assert trained == "".join(m["content"].strip() + "<|eot_id|>" for m in conv if m["role"] == "assistant")


def test_hf_tokenizer_without_chatml_gets_appended_tokens():
    tok = _train_byte_level(["<|endoftext|>"])
    base = tok.get_vocab_size()
    ours = HFTokenizer(tok.to_str(), {"eos_token": "<|endoftext|>"})
    assert (ours.im_start_id, ours.im_end_id, ours.vocab_size) == (base, base + 1, base + 2)


def test_default_tokenizer_roundtrip_and_token_bytes():
    tok = default_tokenizer()
    assert tok.vocab_size == 2048
    assert tok.chat_format == "chatml" and tok.bos_id is None
    assert {tok.pad_id, tok.eos_id, tok.im_start_id, tok.im_end_id} <= tok.special_ids
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.token_to_id("<0x0A>")) == b"\n"
    assert tok.encode("<|im_start|>") == [tok.im_start_id]
    assert len(tok.vocab_bytes()) == tok.vocab_size


def test_sentencepiece_export_loads_in_transformers(tmp_path):
    tok = default_tokenizer()
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                                   "special_tokens_map.json"}
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ref.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [tok.im_start_id, tok.im_end_id]
    assert ref.eos_token_id == tok.eos_id and ref.pad_token_id == tok.pad_id
    for text in TEXTS:
        assert ref.encode(text, add_special_tokens=False) == tok.encode(text)
        assert ref.decode(tok.encode(text)) == text
    for conv in CONVERSATIONS:
        ids, _ = tok.encode_chat(conv, add_generation_prompt=True)
        assert _ids(ref.apply_chat_template(conv, add_generation_prompt=True)) == ids
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode_chat(CONVERSATIONS[0]) == tok.encode_chat(CONVERSATIONS[0])


def _train_sp(tmp_path, model_type: str) -> bytes:
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(TEXTS * 5 + [m["content"] for c in CONVERSATIONS for m in c] * 5), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / model_type), model_type=model_type, vocab_size=500,
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    return (tmp_path / f"{model_type}.model").read_bytes()


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_without_chatml_appends_ids_consistently(tmp_path, model_type):
    """A stock sentencepiece model (dummy prefix, nmt_nfkc): ChatML ids appended; export agrees on ids."""
    model = _train_sp(tmp_path, model_type)
    (tmp_path / "m.model").write_bytes(model)
    tok = load_tokenizer(tmp_path / "m.model")
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    assert (tok.im_start_id, tok.im_end_id, tok.vocab_size) == (n, n + 1, n + 2)
    assert tok.eos_id == 2 and tok.bos_id == 1
    ids, mask = tok.encode_chat(CONVERSATIONS[0])
    assert ids.count(n) == len(CONVERSATIONS[0]) and len(mask) == len(ids)
    out = tmp_path / "export"
    tok.save(out)
    ref = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:2] + TEXTS[3:5]:
        assert ref.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert _ids(ref.apply_chat_template(CONVERSATIONS[0])) == ids


def test_pickle_and_bad_messages():
    tok = default_tokenizer()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_chat(CONVERSATIONS[0]) == tok.encode_chat(CONVERSATIONS[0])
    with pytest.raises(cf.ChatError, match="message 1: unknown role 'narrator'"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}])
    with pytest.raises(cf.ChatError, match="content must be a string"):
        tok.encode_chat([{"role": "user", "content": None}])
