"""Orbax checkpoints of a training run: save every N steps (asynchronously), keep the last K, resume from the
newest checkpoint that restores cleanly.

A step directory ``WORKDIR/checkpoints/<step>/`` holds the items
  ``params``   the fp32 parameters (nested dict, Hugging Face names) -- alone enough to load the model,
  ``train``    optimizer state, step and RNG key,
  ``data``     the input iterator state of *every* process (``process_<i>-of-<n>.json``),
  ``meta``     JSON written once (by process 0): the SFT config, the model config, the step.
Orbax writes into a temporary directory and renames it when the save is complete, so a run killed mid-save
leaves no step directory behind; a step directory that is nevertheless unreadable (torn copy, corrupted
files) is reported and the previous one used.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ditto_jax.checkpoints import CHECKPOINT_DIR, TRAIN_ITEMS, TRAIN_META

ITEMS = TRAIN_ITEMS


class StatefulIterator(Protocol):
    """An input iterator whose position can be saved and restored (Grain ``DatasetIterator`` semantics)."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class DataStateHandler(ocp.CheckpointHandler):
    """Saves the JSON state of this process's data iterator as ``process_<i>-of-<n>.json``."""

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        """Write this process's iterator state (every process writes its own file)."""
        path = Path(directory) / _process_file()
        path.write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
        """This process's iterator state; an error if the run had a different number of processes."""
        path = Path(directory) / _process_file()
        if not path.exists():
            found = sorted(p.name for p in Path(directory).glob("process_*.json"))
            raise FileNotFoundError(f"{path} missing (found {found}): was the run restarted with another process count?")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:  # noqa: D102 - required by the interface
        return None

    def finalize(self, directory: epath.Path) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    """Orbax argument: the JSON-able iterator state of this process."""

    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    """Orbax argument for restoring ``DataStateSave``."""


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@dataclasses.dataclass
class Restored:
    """What ``Checkpoints.restore_latest`` returns."""

    step: int
    params: Any
    train: Any
    data: Any
    meta: dict[str, Any]


class Checkpoints:
    """Save / restore a run's checkpoints under ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.every = every
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """Steps with a complete (finalised) checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, train: Any, data_state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``step`` (returns once arrays are copied off the devices; the write continues)."""
        if self.async_save and jax.default_backend() == "cpu":
            # On CPU Orbax's "device to host" copy can alias the live buffers, which the next (donating) train
            # step overwrites while the write is still running: snapshot them first.
            params, train = jax.tree.map(lambda x: x.copy(), (params, train))
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
            data=DataStateSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_params: Any, abstract_train: Any) -> Restored | None:
        """The newest checkpoint that restores cleanly, or ``None`` if there is none.

        A newest checkpoint that fails to restore is reported (with the reason), moved aside to
        ``checkpoints/corrupt-<step>`` (kept for inspection, out of the way of new saves) and the one before is
        tried.
        """
        bad: list[int] = []
        try:
            return self._restore_newest_good(abstract_params, abstract_train, bad)
        finally:
            if bad:
                self._move_aside(bad)

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst = self.directory / f"corrupt-{step}"
                if dst.exists():
                    shutil.rmtree(dst)
                src.rename(dst)
                print(f"moved the unreadable checkpoint {src} to {dst}", flush=True)
        multihost_utils.sync_global_devices("ditto-jax: corrupt checkpoints moved aside")
        self.manager.reload()

    def _restore_newest_good(self, abstract_params: Any, abstract_train: Any, bad: list[int]) -> Restored | None:
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params), train=ocp.args.StandardRestore(abstract_train),
                    data=DataStateRestore(), meta=ocp.args.JsonRestore()))
                _check_finite(out["params"], step)
                return Restored(step=step, params=out["params"], train=out["train"], data=out["data"],
                                meta=dict(out["meta"]))
            except Exception as exc:  # noqa: BLE001 - any failure means this checkpoint is unusable
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); falling back to the previous one",
                      flush=True)
                bad.append(step)
        return None

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _check_finite(params: Any, step: int) -> None:
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
           if not bool(jax.numpy.all(jax.numpy.isfinite(x)))]
    if bad:
        raise ValueError(f"step {step}: non-finite values in {bad[:5]}")


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) of a concrete pytree: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The ``meta`` JSON of one step directory."""
    path = Path(step_dir) / TRAIN_META
    if not path.exists():
        raise FileNotFoundError(f"{step_dir}: no checkpoint metadata ({TRAIN_META})")
    return json.loads(path.read_text())


def latest_step_dir(workdir: str | Path) -> Path:
    """The newest finalised step directory of a training workdir (``WORKDIR/checkpoints/<step>``)."""
    root = Path(workdir) / CHECKPOINT_DIR
    steps = sorted((int(p.name) for p in root.glob("*") if p.name.isdigit() and p.is_dir()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoints under {root}")
    return root / str(steps[0])


def host_array(x: Any) -> np.ndarray:
    """A fully replicated / addressable array as numpy (for metrics and tests)."""
    return np.asarray(jax.device_get(x))

