"""Attention kernels (imported as ``ditto_jax.kernels``); they depend only on jax.

- ``flash_attention(q, k, v, causal=True, segment_ids=None, sm_scale=None)``: Pallas flash attention with a
  fused backward pass (Mosaic TPU, Mosaic GPU on Hopper, Triton on other GPUs, interpreter on CPU).
- ``decode_attention(q, k_cache, v_cache, lengths, sm_scale=None)``: split-K decode over a ragged cache.
- ``sharded``: run either under ``shard_map`` over batch and heads of an active mesh.
- ``reference``: the plain-XLA implementation they are tested against (and the model's ``xla`` path).

Lowering and tile choice: ``backend=``/``block_sizes=`` arguments or the ``DITTO_ATTN_BACKEND``,
``DITTO_ATTN_BLOCKS`` and ``DITTO_DECODE_BLOCKS`` environment variables (see ``_config``).
"""

if __name__ != "ditto_jax.kernels":  # the repository root is on sys.path: `kernels` is the PyPI package's name
    from ditto_jax._toplevel import hand_over

    hand_over(__name__, __file__)
else:
    from ditto_jax.kernels._config import BlockSizes, DecodeBlockSizes
    from ditto_jax.kernels.decode_attention import decode_attention
    from ditto_jax.kernels.flash_attention import flash_attention
    from ditto_jax.kernels.reference import attention_reference, decode_reference

    __all__ = [
        "BlockSizes",
        "DecodeBlockSizes",
        "attention_reference",
        "decode_attention",
        "decode_reference",
        "flash_attention",
    ]
