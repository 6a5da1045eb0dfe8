"""The run folder's promises: a manifest with a status, a lock, atomic writes, JSON without NaN.

A run folder holds, beside what `loraens.run` writes (config.yaml, members/, predictions/,
metrics.jsonl, results.json)::

    manifest.json            status (running | interrupted | failed | complete) and its reason, the
                             loraens version, the base model's identity, each member file's sha256
                             and epoch, and where the last checkpoint stands
    checkpoint.safetensors   the last checkpoint of an unfinished run (`loraens.checkpoint`)
    .lock                    held (fcntl) by the one process that writes the folder; holds its pid

Every file is written to a temporary file beside it and moved into place with `os.replace`, so a
killed process leaves either the old file or the new one, never half of one (a stray temporary
file at most, which the next run removes). A run is `complete` only once its last file is written:
`evaluate` and `report` refuse anything else.

This module needs no torch: `loraens report` checks run folders with it on the evaluation floor.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from . import __version__

MANIFEST = "manifest.json"
LOCK = ".lock"
CHECKPOINT = "checkpoint.safetensors"
MANIFEST_FORMAT = 1
TEMP_MARK = ".tmp-"
MEMBER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # a PEFT adapter folder (loraens.ensemble)

RUNNING, INTERRUPTED, FAILED, COMPLETE = "running", "interrupted", "failed", "complete"
STATUSES = (RUNNING, INTERRUPTED, FAILED, COMPLETE)


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (locked, not complete, would be overwritten); the
    message names the folder and what to do."""


class IntegrityError(RunFolderError):
    """A file of a run folder does not match what the run recorded (or cannot be read); the message
    names the file and both sides."""


# ---------------------------------------------------------------- atomic writes


def _commit(tmp: Path, path: Path) -> None:
    """Move a fully written temporary file into place (the one step a reader can observe)."""
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path`.

    On an error the temporary file is removed and `path` is left as it was. A process killed
    inside the block leaves `path` as it was plus a `.<name>.tmp-<pid>` file (`remove_temp_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None, so it is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Standard JSON (never NaN or Infinity: those become null)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, dumps(obj, indent) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; a file that is not JSON is an `IntegrityError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise IntegrityError(f"{path} is not valid JSON ({err}).") from None


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `run_dir` (any depth); returns them."""
    found = [p for p in Path(run_dir).rglob(f".*{TEMP_MARK}*")]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the lock


class RunLock:
    """An exclusive `fcntl.flock` on `<run_dir>/.lock`, held while a process writes the folder.

    The kernel releases it when the process ends, however it ends (a SIGKILL too), so a stale
    lock never blocks a resume. The file holds the holder's pid, for the message of a second
    process that finds the folder taken.
    """

    def __init__(self, run_dir: str | Path, verb: str = "train") -> None:
        self.run_dir = Path(run_dir)
        self.verb = verb
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        check_output_dir(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"{self.run_dir} cannot be used as a run folder: {err.strerror} ({err.filename}).") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = lock_holder(self.run_dir)
            raise RunFolderError(f"{self.run_dir} is being written by another loraens process ({holder}); two "
                                 "processes must not write one run folder. Wait for it to finish, or use another "
                                 "--output_dir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.verb}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> str:
    """'pid N (loraens VERB)' of the process holding the folder's lock, as far as it wrote it."""
    for _ in range(20):  # the holder writes its pid right after taking the lock
        with suppress(OSError):
            text = (Path(run_dir) / LOCK).read_text().split()
            if text:
                return f"pid {text[0]}" + (f", loraens {text[1]}" if len(text) > 1 else "")
        time.sleep(0.02)
    return "pid unknown"


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds the folder's lock (tried without taking it for long)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def check_output_dir(run_dir: str | Path, flag: str = "--output_dir") -> None:
    """A run folder path must be a folder or not exist yet, and so must its parents' path."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{flag} {str(path)!r} is a file, not a folder; give a folder for the run "
                             "(it is created if missing).")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file.")
            break


# ---------------------------------------------------------------- the manifest


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The folder's manifest.json, or None when there is none (a new folder, or an older loraens')."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("status") not in STATUSES:
        raise IntegrityError(f"{path} is not a loraens manifest (no valid status); it was changed by hand or by "
                             "another tool.")
    return manifest


def new_manifest(base: dict[str, Any], num_members: int, config_sha256: str) -> dict[str, Any]:
    now = _now()
    return {"format": MANIFEST_FORMAT, "loraens_version": __version__, "status": RUNNING, "reason": None,
            "started": now, "updated": now, "pid": os.getpid(), "config_sha256": config_sha256,
            "base_model": base, "num_members": num_members, "members": {}, "members_epoch": None,
            "checkpoint": None, "resumed": 0, "warnings": []}


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    write_json(Path(run_dir) / MANIFEST, manifest)


def set_status(run_dir: str | Path, manifest: dict[str, Any], status: str, reason: str | None = None) -> None:
    manifest["status"], manifest["reason"] = status, reason
    if status == COMPLETE:
        manifest["finished"] = _now()
    write_manifest(run_dir, manifest)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def config_sha256(config_dict: dict[str, Any], ignore: tuple[str, ...] = ("output_dir",)) -> str:
    """A hash of a run's settings without the `ignore`d ones ("section.key"; output_dir by default:
    a moved run folder is the same run)."""
    def keep(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        return {k: keep(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in d.items()
                if f"{prefix}{k}" not in ignore}

    return hashlib.sha256(json.dumps(keep(config_dict), sort_keys=True).encode()).hexdigest()


def member_record(folder: Path, run_dir: Path, epoch: int | None, step: int) -> dict[str, Any]:
    """The manifest entry of one exported member folder: its files' sha256, its epoch and step."""
    return {"folder": str(folder.relative_to(run_dir)), "epoch": epoch, "step": step,
            "sha256": {name: sha256_file(folder / name) for name in MEMBER_FILES}}


# ---------------------------------------------------------------- what a reader may trust


def describe_state(run_dir: str | Path, manifest: dict[str, Any], holding_lock: bool = False) -> str:
    """One sentence on an unfinished run: who writes it, or how it ended and how to go on.
    `holding_lock`: the caller holds the folder's lock itself (so no other process writes it)."""
    run_dir = Path(run_dir)
    status, reason = manifest["status"], manifest.get("reason")
    ckpt = manifest.get("checkpoint")
    where = f"its last checkpoint is at {describe_checkpoint(ckpt)}" if ckpt else "it has no checkpoint yet"
    if status == RUNNING and not holding_lock and is_locked(run_dir):
        return f"{run_dir} is still being trained ({lock_holder(run_dir)}); wait for it to finish."
    if status in (RUNNING, INTERRUPTED):
        why = f" ({reason})" if reason else " (its process was killed or crashed)"
        return (f"{run_dir} holds an interrupted run{why}: {where}. Resume it with "
                f"`loraens train --resume {run_dir}`.")
    if status == FAILED:
        return f"{run_dir} holds a failed run: {reason}"
    return f"{run_dir} is complete."


def describe_checkpoint(record: dict[str, Any]) -> str:
    """'step 7 (epoch 2, 3 batches in)' or 'step 6 (the end of epoch 1)' for a checkpoint's record."""
    if record.get("position"):
        return f"step {record['step']} (epoch {record['epoch']}, {record['position']} batches in)"
    return f"step {record['step']} (the end of epoch {record['epoch'] - 1})"


def check_complete(run_dir: str | Path, verb: str, holding_lock: bool = False) -> dict[str, Any] | None:
    """The manifest of a complete run whose members are all from one epoch; else a `RunFolderError`.

    None (and a warning on stderr) for a run folder an older loraens wrote, without a manifest:
    nothing about it can be checked. A folder with neither manifest nor config.yaml (predictions
    written by other code) gives None silently.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        if (run_dir / "config.yaml").is_file():
            print(f"loraens {verb}: WARNING: {run_dir} has no {MANIFEST} (written by an older loraens, or the "
                  "manifest was removed): whether it is complete and whether its members are intact cannot be "
                  "checked.", file=sys.stderr)
        return None
    if manifest["status"] != COMPLETE:
        raise RunFolderError(f"{verb} needs a complete run, but this one's status is {manifest['status']}: "
                             f"{describe_state(run_dir, manifest, holding_lock)}")
    epochs = {m.get("epoch") for m in manifest.get("members", {}).values()}
    if len(epochs) > 1:
        per = ", ".join(f"{k}: epoch {m.get('epoch')}" for k, m in sorted(manifest["members"].items()))
        raise RunFolderError(f"{run_dir}'s members are from different epochs ({per}); an ensemble must be "
                             "one training's members at one epoch.")
    return manifest
