"""Sub-commands of ``ditto-jax``; one module each, registered in ``ditto_jax.cli.COMMANDS``."""

from __future__ import annotations

import argparse
import re


def output_dir(text: str) -> str:
    """``type=`` of every output-folder flag: a local (or mounted) path. Object-store URLs (``gs://``, ``s3://``)
    are refused: ``pathlib`` would turn ``gs://b/run`` into the local folder ``gs:/b/run`` without a word, and
    the writers rely on POSIX rename for atomicity, which object stores do not offer."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise argparse.ArgumentTypeError(
            f"{text}: object-store URLs are not supported as output folders; use a local or mounted path "
            "(e.g. a gcsfuse mount of the bucket)")
    return text


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--coordinator/--num-processes/--process-id`` flags shared by ``train``, ``simulate`` and ``sample``
    (read by ``ditto_jax.distributed.initialize``; here, not there, so that ``--help`` imports no JAX)."""
    group = parser.add_argument_group("multi-process")
    group.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process runs)")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes in the run")
    group.add_argument("--process-id", type=int, default=None, help="this process's index")
