"""``ditto-jax serve``: an OpenAI-compatible HTTP server on the sampling engine, and ``ditto-jax chat``'s session.

* ``loop``: ``EngineLoop`` — one thread steps the engine; handlers submit, stream and cancel.
* ``app``: ``create_app`` — the FastAPI routes (``/v1/chat/completions`` with streaming, ``/v1/completions``,
  ``/v1/models``, ``/health``), 400 errors naming the field.
* ``chat``: ``ChatSession`` — a role-play conversation with a knowledge-base character in the terminal.
"""
