"""One checkpoint store: what is at a path (Hugging Face folder, GGUF file, model checkpoint, training workdir
or step), ``ModelSource`` and ``load_model_source``, tokenizer files, and the on-disk layouts.

    model, cfg = checkpoints.load_model(path)                      # any kind, sharded over a mesh if given
    model, cfg, tokenizer = checkpoints.load_model_source(ModelSource(path=...))
    checkpoints.save_model_checkpoint(model, cfg, out, tokenizer=tok)
"""

from ditto_jax.checkpoints._convert import (
    convert_to_checkpoint,
    convert_to_hf,
    tokenizer_to_copy,
)
from ditto_jax.checkpoints._errors import CheckpointError
from ditto_jax.checkpoints._fetch import (
    MODELS,
    NamedModel,
    cache_dir,
    cached_path,
    fetch_model,
    locate,
)
from ditto_jax.checkpoints._gguf import (
    GGUFModel,
    gguf_tokenizer,
    load_gguf,
    supported_tensor_types,
)
from ditto_jax.checkpoints._layout import (
    CHECKPOINT_DIR,
    EXPORT_DIR,
    GGUF_SUFFIX,
    HF_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    PARAMS_DIR,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    TRAIN_ITEMS,
    TRAIN_META,
)
from ditto_jax.checkpoints._model_checkpoint import (
    load_model_checkpoint,
    restore_model,
    save_model_checkpoint,
)
from ditto_jax.checkpoints._resolve import (
    GGUF_FILE,
    HF_FOLDER,
    MODEL_CHECKPOINT,
    TRAINING_STEP,
    Resolved,
    is_model_checkpoint,
    load_model,
    resolve,
    training_step_dir,
)
from ditto_jax.checkpoints._source import (
    ModelSource,
    check_model_source,
    load_model_source,
    source_tokenizer,
)
from ditto_jax.checkpoints._tokenizer_files import (
    TokenizerFiles,
    folder_tokenizer,
    has_tokenizer,
    tokenizer_dir,
    write_tokenizer_dir,
)

__all__ = [
    "CHECKPOINT_DIR",
    "EXPORT_DIR",
    "GGUF_FILE",
    "GGUF_SUFFIX",
    "HF_CONFIG_FILE",
    "HF_FOLDER",
    "MODELS",
    "MODEL_CHECKPOINT",
    "MODEL_CONFIG_FILE",
    "PARAMS_DIR",
    "TOKENIZER_DIR",
    "TOKENIZER_FILES",
    "TRAINING_STEP",
    "TRAIN_ITEMS",
    "TRAIN_META",
    "CheckpointError",
    "GGUFModel",
    "ModelSource",
    "NamedModel",
    "Resolved",
    "TokenizerFiles",
    "cache_dir",
    "cached_path",
    "check_model_source",
    "convert_to_checkpoint",
    "convert_to_hf",
    "fetch_model",
    "folder_tokenizer",
    "gguf_tokenizer",
    "has_tokenizer",
    "is_model_checkpoint",
    "load_gguf",
    "load_model",
    "load_model_checkpoint",
    "load_model_source",
    "locate",
    "resolve",
    "restore_model",
    "save_model_checkpoint",
    "source_tokenizer",
    "supported_tensor_types",
    "tokenizer_dir",
    "tokenizer_to_copy",
    "training_step_dir",
    "write_tokenizer_dir",
]
