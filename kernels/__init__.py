"""Attention kernels (imported as ``ditto_jax.kernels``); they depend only on jax.

``flash_attention`` and ``decode_attention`` are the Pallas kernels (see their modules); ``reference`` holds
the plain-XLA implementation they are tested against.
"""

from ditto_jax.kernels.reference import attention_reference, decode_reference

__all__ = ["attention_reference", "decode_reference"]
