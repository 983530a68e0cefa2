"""Preset YAML files, installed as ``ditto_jax.configs`` (never a top-level ``configs``: see ``ditto_jax._toplevel``)."""

if __name__ != "ditto_jax.configs":
    from ditto_jax._toplevel import hand_over

    hand_over(__name__, __file__)
