"""Training checkpoints as single safetensors files: nothing is ever unpickled.

A Lightning checkpoint is a nested dict of tensors, numbers, strings, lists and dicts. `encode`
splits it into the tensors (stored as safetensors) and a JSON skeleton that points at them by name
(stored in the safetensors header's metadata, with a CRC32 of every tensor's bytes). `decode`
rebuilds the dict. `SafeCheckpointIO` plugs this into Lightning, writing to a temporary file that is
fsynced and renamed, so a checkpoint on disk is either complete or absent; a file torn by other
means (disk full, copy cut short, bit rot) fails its size or CRC check and is skipped with a warning
in favour of the previous one.

    checkpoints/<fingerprint>/step-00000200.ckpt   <- newest two kept (train.keep_checkpoints),
    checkpoints/<fingerprint>/step-00000300.ckpt      one folder per configuration (resume.py)

The train and finetune stages both checkpoint this way (each under its own folder, pipelines/common/layout.py).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "quill-checkpoint-1"
NAME = re.compile(r"^step-(\d{8})\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read (torn, corrupt, or not ours)."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.ckpt"


# --- nested dict <-> (JSON skeleton, tensors) ---------------------------------------------------


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `obj` into a JSON-able skeleton and named tensors. Tensors that share memory are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}

    def walk(x: Any, where: str) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            key = (x.device, x.data_ptr(), x.dtype, tuple(x.shape), x.stride()) if x.numel() else None
            if key in seen:
                return {"__tensor__": seen[key]}
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu").contiguous().clone() if x.is_cuda else x.detach().contiguous().clone()
            if key is not None:
                seen[key] = name
            return {"__tensor__": name}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": walk(torch.from_numpy(np.ascontiguousarray(x)), where)["__tensor__"]}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                if "__tensor__" in x or "__ndarray__" in x or "__tuple__" in x or "__items__" in x:
                    raise TypeError(f"checkpoint key at {where} collides with the encoding's markers")
                return {k: walk(v, f"{where}.{k}") for k, v in x.items()}
            # non-string keys (optimizer state is keyed by int): keep them typed
            return {"__items__": [[walk(k, where), walk(v, f"{where}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        raise TypeError(
            f"cannot store {type(x).__name__} at {where} in a checkpoint (only tensors, numbers, "
            "strings, lists and dicts)"
        )

    return walk(obj, "checkpoint"), tensors


def decode(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`."""
    if isinstance(skeleton, list):
        return [decode(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return tensors[skeleton["__ndarray__"]].numpy()
    if "__tuple__" in skeleton:
        return tuple(decode(v, tensors) for v in skeleton["__tuple__"])
    if "__items__" in skeleton:
        return {decode(k, tensors): decode(v, tensors) for k, v in skeleton["__items__"]}
    return {k: decode(v, tensors) for k, v in skeleton.items()}


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(name.encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
    return crc


# --- files --------------------------------------------------------------------------------------


def save(checkpoint: dict, path: str | Path) -> None:
    """Write `checkpoint` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = encode(checkpoint)
    metadata = {"format": FORMAT, "skeleton": json.dumps(skeleton), "crc32": str(_crc(tensors))}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's JSON skeleton without reading its tensors (cheap; no integrity check)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for torn headers
        raise CheckpointError(f"{path}: unreadable header ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    return json.loads(meta["skeleton"])


def load(path: str | Path) -> dict:
    """Read a checkpoint back, checking its size and CRC; raises CheckpointError if torn or corrupt."""
    path = Path(path)
    skeleton = read_metadata(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            expected = int(f.metadata()["crc32"])
    except Exception as exc:
        raise CheckpointError(f"{path}: truncated or unreadable ({exc})") from None
    if _crc(tensors) != expected:
        raise CheckpointError(f"{path}: CRC mismatch (the file is corrupt)")
    return decode(skeleton, tensors)


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through `save`/`load`: safetensors + JSON, atomic, never pickle.

    `preloaded` maps a path to its already-verified content, so resuming reads the file once.
    """

    def __init__(self, preloaded: dict[str, dict] | None = None):
        self.preloaded = dict(preloaded or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if str(path) in self.preloaded:
            return self.preloaded.pop(str(path))
        return load(path)  # tensors come back on the CPU; Lightning moves them to the device

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


# --- the checkpoints folder ---------------------------------------------------------------------


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return sorted(found, reverse=True)


def latest_valid(directory: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads back intact, with its decoded content; torn ones are warned about."""
    for _, path in list_checkpoints(directory):
        try:
            return path, load(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {exc}; falling back to the previous one", stacklevel=2)
    return None


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and any temporary files left by a killed writer."""
    directory = Path(directory)
    removed = [p for _, p in list_checkpoints(directory)[keep:]]
    removed += list(directory.glob(".step-*.tmp")) if directory.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


class StepCheckpoint(pl.Callback):
    """Save every `every` optimizer steps, at the end, and at the next step boundary after SIGTERM.

    Saving happens only at step boundaries (never mid gradient accumulation), so a checkpoint always
    holds a whole number of steps. At a step that validates, it happens after the validation: Lightning
    skips the validation of the step a run resumes at, so a checkpoint written before it would leave that
    step's val loss out of the resumed run's curves. After a save, all but the newest `keep` are deleted.
    """

    def __init__(self, directory: str | Path, every: int, keep: int):
        self.directory, self.every, self.keep = Path(directory), every, keep
        self.last_saved = -1
        self.sigterm_pending = False  # SIGTERM arrived mid-accumulation: finish the step first
        self.saved_on_sigterm = False
        self._after_validation: bool | None = None  # a save waiting for this step's validation (True: then stop)
        self._step_before = 0
        self._at_boundary = True

    def save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step == self.last_saved:
            return
        trainer.lightning_module.check_finite()  # never write a checkpoint after a NaN step
        trainer.save_checkpoint(checkpoint_path(self.directory, step), weights_only=False)
        self.last_saved = step
        if trainer.is_global_zero:
            prune(self.directory, self.keep)

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_saved = trainer.global_step  # the resumed step is already on disk (or step 0: nothing to keep)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step != self._step_before
        self._at_boundary = stepped
        signals = trainer._signal_connector  # Lightning raises SIGTERMException after this hook when set
        if signals.received_sigterm and not stepped:
            signals.received_sigterm, self.sigterm_pending = False, True
            return
        if not stepped:
            return
        stop = signals.received_sigterm or self.sigterm_pending
        if trainer.world_size > 1:  # every rank must agree, or the save's collectives would hang
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if (stop or trainer.global_step % self.every == 0) and validates_now(trainer):
            self._after_validation = stop
            if stop:  # set, the flag would stop the validation after its first batch; pending, it is not lost
                signals.received_sigterm, self.sigterm_pending = False, True
        elif stop:
            self.save(trainer)
            self.saved_on_sigterm = True
            signals.received_sigterm = True
        elif trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # after TrainLog's (the stage puts it first), so the checkpoint holds this validation's row
        if self._after_validation is None:
            return
        stop, self._after_validation = self._after_validation, None
        self.save(trainer)
        if stop:
            self.saved_on_sigterm = True
            trainer._signal_connector.received_sigterm = True  # Lightning stops once this step is done

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # the signal can land between our hook and Lightning's check; save if we are at a step boundary
        if (
            isinstance(exception, SIGTERMException)
            and not self.saved_on_sigterm
            and self._at_boundary
            and trainer.world_size == 1
        ):
            self.save(trainer)
            self.saved_on_sigterm = True


def validates_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates once the training batch that just ended is done (its own test, asked between the
    batch's on_train_batch_end and that validation)."""
    loop = trainer.fit_loop
    return loop.epoch_loop._should_check_val_fx(loop._data_fetcher)
