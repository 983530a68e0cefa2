"""The checkpoint's own Jinja chat template: ids equal transformers' ``apply_chat_template`` for Llama-3,
Qwen2.5, Qwen3 and Mistral ``[INST]`` templates (their published text), masks equal transformers'
``return_assistant_tokens_mask`` (``{% generation %}``-marked variants as the reference for the located spans),
template errors, sandbox helpers, and exports that keep the template."""

from __future__ import annotations

import json

import pytest

from ditto_jax import chat_format as cf
from ditto_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

# ---- published templates (tokenizer_config.json "chat_template" of the named checkpoints) -------------------
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen/Qwen2.5-7B-Instruct
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Qwen/Qwen3-0.6B
QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
# mistralai/Mistral-7B-Instruct-v0.2 (the [INST] template with an optional system message)
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""


def _marked(template: str, old: str, new: str) -> str:
    """The template with its assistant output wrapped in {% generation %} (the mask reference)."""
    assert template.count(old) == 1, old
    return template.replace(old, new)


LLAMA3_MARKED = _marked(
    LLAMA3, "{{ content }}",
    "{% if message['role'] == 'assistant' %}{{ content.split('<|end_header_id|>')[0] + '<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ content }}{% endif %}",
)
QWEN25_MARKED = _marked(
    QWEN25, "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n",
    "        {%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}\n",
)
MISTRAL_MARKED = _marked(
    MISTRAL, "{{- ' ' + message['content'] + eos_token}}",
    "{{- ' ' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}",
)

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
        {"role": "assistant", "content": "user"},
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": ""},
    ],
    [
        {"role": "system", "content": "You are Hamlet, prince of Denmark."},
        {"role": "user", "content": "Who are you?"},
    ],
]
TEXTS = ["Hello there! How are you today?", "I am Edward III of England, king of England.", "  spaces,\ttabs\nnl\n\n",
         "你是李白，唐代著名的诗人。", "Mixed 中文 and English 123 — emoji 🙂 ok"]


def _corpus() -> list[str]:
    return TEXTS * 20 + [m["content"] for c in CONVERSATIONS for m in c] * 20


def _byte_level(special: list[str], plain_added: list[str] = ()):
    """A small byte-level BPE (Llama-3 / Qwen style)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    return tok


def _metaspace(special: list[str]):
    """A small metaspace BPE with byte fallback (Mistral / Llama-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=special + bytes_, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok


FAMILIES = {
    "llama3": (LLAMA3, LLAMA3_MARKED, lambda: _byte_level(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ("<|start_header_id|>", "<|eot_id|>")),
    "qwen2.5": (QWEN25, QWEN25_MARKED, lambda: _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ("<|im_start|>", "<|im_end|>")),
    "qwen3": (QWEN3, None, lambda: _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"]),
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ("<|im_start|>", "<|im_end|>")),
    "mistral": (MISTRAL, MISTRAL_MARKED, lambda: _metaspace(["<unk>", "<s>", "</s>"]),
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, (None, "</s>")),
}


def _reference(tok, template: str, special: dict):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_template_ids_text_and_mask_equal_transformers(family):
    template, marked, build, special, (turn_start, turn_end) = FAMILIES[family]
    tok = build()
    ref = _reference(tok, template, special)
    ours = HFTokenizer(tok.to_str(), {**special, "chat_template": template}, source=f"<{family}>")
    assert ours.chat_format == "template" and ours.chat_template == template
    assert ours.vocab_size == tok.get_vocab_size(with_added_tokens=True)  # a template tokenizer is never extended
    assert ours.im_end_id == tok.token_to_id(turn_end)
    assert ours.im_start_id == (tok.token_to_id(turn_start) if turn_start else None)
    assert ours.stop_ids == {ours.eos_id, ours.im_end_id}
    mask_ref = _reference(tok, marked, special) if marked else None
    for conv in CONVERSATIONS:
        for gen in (False, True):
            text = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours.chat_text(conv, gen) == text
            ids, mask = ours.encode_chat(conv, add_generation_prompt=gen)
            assert ids == list(ref.apply_chat_template(conv, add_generation_prompt=gen, return_dict=True)["input_ids"])
            # every assistant content and its end-of-turn token is trained, nothing else
            trained = ours.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
            want = [m["content"] for m in conv if m["role"] == "assistant"]
            if family == "llama3":
                want = [w.strip() for w in want]
            assert trained.replace(" ", "") == "".join(w + ours.id_to_token(ours.im_end_id) for w in want).replace(" ", "")
            if mask_ref is not None:
                out = mask_ref.apply_chat_template(conv, add_generation_prompt=gen, return_assistant_tokens_mask=True,
                                                   return_dict=True)
                assert list(out["input_ids"]) == ids
                assert mask == list(out["assistant_masks"]), (family, conv)
                # the marked template as the tokenizer's own: its {% generation %} spans give the same mask
                own_marks = HFTokenizer(tok.to_str(), {**special, "chat_template": marked})
                assert own_marks.encode_chat(conv, add_generation_prompt=gen) == (ids, mask)


def test_qwen3_think_block_and_history():
    """Qwen3 renders the last assistant turn with an empty <think> block and earlier ones without; the located
    span is the content (+ <|im_end|>) in both cases, never the think block or the header."""
    template, _, build, special, _ = FAMILIES["qwen3"]
    tok = build()
    ours = HFTokenizer(tok.to_str(), {**special, "chat_template": template})
    conv = CONVERSATIONS[0]
    text = ours.chat_text(conv)
    assert text.count("<think>") == 1 and text.index("<think>") > text.index("smartphone")
    rendered = ours.render_chat(conv)
    assert [text[a:b] for a, b in rendered.spans] == [
        "举头望明月，低头思故乡。 The moon is my old friend.<|im_end|>",
        "A smart... phone? I have never heard of such a thing.\n<|im_end|>",
    ]


def test_mistral_refusal_is_a_chat_error_and_sandbox_helpers():
    template, _, build, special, _ = FAMILIES["mistral"]
    ours = HFTokenizer(build().to_str(), {**special, "chat_template": template}, source="m/tokenizer")
    with pytest.raises(cf.ChatError, match="m/tokenizer: chat template: After the optional system message"):
        ours.encode_chat([{"role": "assistant", "content": "x"}])
    with pytest.raises(cf.ChatError, match="message 1: unknown role 'narrator'"):
        ours.encode_chat([{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}])
    helpers = ("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% set ns = namespace(n=0) %}"
               "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ dict(a=1) | tojson }}")
    text, spans = cf.render_template(helpers, [{"role": "user", "content": "é<b>"}])
    assert text == '[{"role": "user", "content": "é<b>"}]|4|1|{"a": 1}' and spans == []
    with pytest.raises(cf.ChatError, match="underscore"):
        cf.render_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(cf.ChatError, match="access to attribute|unsafe"):
        cf.render_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(cf.ChatError, match="bad.jinja: chat template line 2"):
        cf.compile_template("ok\n{% for x in %}", "bad.jinja")


def test_template_without_findable_content_names_the_message():
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = _byte_level(["<|endoftext|>"])
    ours = HFTokenizer(tok.to_str(), {"eos_token": "<|endoftext|>", "chat_template": template})
    assert ours.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[1] == [0] * len(
        ours.encode("user: HI\nassistant: "))
    with pytest.raises(cf.ChatError, match="message 1: .*generation"):
        ours.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_export_keeps_the_template_and_folder_loading(family, tmp_path):
    """save() writes the checkpoint's template; transformers and load_tokenizer read it back with the same ids.
    Named templates ({"default": ...}) and chat_template.jinja are read as transformers reads them."""
    template, _, build, special, _ = FAMILIES[family]
    tok = build()
    ours = HFTokenizer(tok.to_str(), {**special, "chat_template": [{"name": "default", "template": template},
                                                                   {"name": "rag", "template": "{{ 'x' }}"}]})
    assert ours.chat_template == template
    ours.save(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["chat_template"] == template
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    again = load_tokenizer(tmp_path / "export")
    for conv in CONVERSATIONS:
        ids, mask = ours.encode_chat(conv, add_generation_prompt=True)
        assert list(ref.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]) == ids
        assert again.encode_chat(conv, add_generation_prompt=True) == (ids, mask)
    # transformers' own save_pretrained puts the template in chat_template.jinja; it wins over the config's
    ref.chat_template = template
    ref.save_pretrained(tmp_path / "hf")
    cfg = tmp_path / "hf" / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "chat_template": "{{ 'stale' }}"}))
    assert (tmp_path / "hf" / "chat_template.jinja").exists()
    assert load_tokenizer(tmp_path / "hf").chat_template == template


def test_sentencepiece_with_template(tmp_path):
    """A sentencepiece model with a template in its config uses it (no ChatML tokens appended)."""
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), model_type="bpe",
                                   vocab_size=500, byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2, hard_vocab_limit=False, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False)
    proto = (tmp_path / "sp.model").read_bytes()
    n = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    ours = SentencePieceTokenizer(proto, "sp", config={"bos_token": "<s>", "eos_token": "</s>",
                                                       "chat_template": MISTRAL})
    assert ours.vocab_size == n and ours.chat_format == "template" and ours.im_end_id == ours.eos_id == 2
    conv = CONVERSATIONS[0]
    ids, mask = ours.encode_chat(conv)
    assert ids == ours.encode(ours.chat_text(conv)) and ids[0] == ours.bos_id
    trained = ours.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert trained.replace(" ", "") == "".join(m["content"] + "</s>" for m in conv if m["role"] == "assistant").replace(
        " ", "")
    import pickle

    assert pickle.loads(pickle.dumps(ours)).encode_chat(conv) == (ids, mask)
