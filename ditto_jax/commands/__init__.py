"""Sub-commands of ``ditto-jax``; one module each, registered in ``ditto_jax.cli.COMMANDS``."""
