"""File names of every on-disk layout we read or write (one place; ``train/`` and ``hf/`` import them).

Model checkpoint folder::

    model.yaml     the ModelConfig
    params/        Orbax checkpoint of the nnx Param state (a nested dict)
    tokenizer/     optional, the tokenizer's files

Training workdir::

    checkpoints/<step>/{params,train,data,meta}   Orbax items of one step (``meta/metadata`` is JSON)
    tokenizer/                                    the run's tokenizer (lets ``load_model(WORKDIR)`` find it)
    export/hf/                                    optional Hugging Face export
"""

from __future__ import annotations

from pathlib import PurePath

MODEL_CONFIG_FILE = "model.yaml"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"

CHECKPOINT_DIR = "checkpoints"
TRAIN_ITEMS = ("params", "train", "data", "meta")
TRAIN_META = "meta/metadata"
EXPORT_DIR = PurePath("export") / "hf"

HF_CONFIG_FILE = "config.json"
GGUF_SUFFIX = ".gguf"

# Tokenizer files copied verbatim between folders (HF folder <-> model checkpoint), never converted.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# The files one of which makes a folder hold a tokenizer (``load_tokenizer`` reads these).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")
