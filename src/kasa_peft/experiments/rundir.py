"""Run directories: what may be written into, resumed or replaced, and how ``--overwrite`` keeps the old run safe.

A run directory is recognised by its marker file ``kasa_run.json``, written before anything else goes into the
directory (runs from before the marker existed are recognised by their ``config.json``). The rules:

* a missing or empty directory becomes a new run;
* a non-empty directory that is not a run is never written into, deleted or replaced;
* a finished run (``result.json``) or one with complete checkpoints is only reused with ``resume`` and only replaced
  with ``overwrite``;
* ``overwrite`` moves the old run aside to the sibling ``.<name>.replaced`` (one rename, same file system) and
  builds the new run in place. If the new run fails for any reason (a bad ``--target-modules``, bad data, Ctrl-C),
  the partial new run is deleted and the old run is moved back; only when the new run has finished is the old one
  deleted. If the process is killed in between, the old run is still in ``.<name>.replaced`` and the next
  invocation says so instead of starting.

Only the main process (``RANK`` 0 or unset) checks and changes the directory; other ranks of a distributed run
only create it if missing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kasa_peft.checkpoint import atomic_write_text

RUN_MARKER = "kasa_run.json"
RUN_MARKER_CONTENT = {"kind": "kasa-peft run directory", "schema": 1}
RESULT_FILE = "result.json"
CHECKPOINT_SUBDIR = "checkpoints"
REPLACED_SUFFIX = ".replaced"


class RunDirError(ValueError):
    """The run directory is in a state that the requested action would damage; nothing was changed."""


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory written by ``kasa train`` (marker file, or a pre-marker ``config.json``)."""
    path = Path(path)
    marker = _read_json(path / RUN_MARKER)
    if isinstance(marker, dict) and marker.get("kind") == RUN_MARKER_CONTENT["kind"]:
        return True
    legacy = _read_json(path / "config.json")
    return isinstance(legacy, dict) and {"kasa_peft_version", "task", "method"} <= set(legacy)


def replaced_path(run_dir: str | Path) -> Path:
    """Where ``--overwrite`` keeps the old run until the new one has finished."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}{REPLACED_SUFFIX}")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`RunDirError` (naming the directory and the fix) if the run may not go into ``run_dir``."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it.")
    aside = replaced_path(run_dir)
    if aside.exists():
        raise RunDirError(
            f"{aside} holds the previous run of {run_dir} from an interrupted --overwrite; move it back to "
            f"{run_dir} (or delete it) and run again."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output-dir {run_dir} is a file, not a directory; choose another --output-dir.")
    if not _is_nonempty_dir(run_dir):
        return
    if not is_run_dir(run_dir):
        raise RunDirError(
            f"--output-dir {run_dir} is not empty and is not a kasa run directory (no {RUN_MARKER}); nothing was "
            "changed. Choose a new or empty --output-dir."
        )
    if resume or overwrite:
        return
    if (run_dir / RESULT_FILE).is_file():
        raise RunDirError(f"{run_dir} already holds a finished run; pass --overwrite to replace it or another --output-dir.")
    if last_checkpoint(run_dir) is not None:
        raise RunDirError(
            f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it or --overwrite to replace it."
        )


def last_checkpoint(run_dir: str | Path) -> Path | None:
    from kasa_peft.trainer import last_complete_checkpoint

    return last_complete_checkpoint(Path(run_dir) / CHECKPOINT_SUBDIR)


def _start(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_MARKER).is_file():
        atomic_write_text(run_dir / RUN_MARKER, json.dumps(RUN_MARKER_CONTENT, indent=2) + "\n")
    (run_dir / RESULT_FILE).unlink(missing_ok=True)  # a run dir without result.json is not a finished run


@contextmanager
def open_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Iterator[Path | None]:
    """Check ``run_dir``, mark it as a run and yield the checkpoint to resume from (``None`` for a fresh start).

    With ``overwrite`` an existing run is moved aside first and restored if the body raises (see the module
    docstring); the body is the whole training run.
    """
    run_dir = Path(run_dir)
    if not _is_main_process():
        # Other ranks of a distributed run neither check nor move anything (rank 0 does, and would otherwise race
        # with them); they need the directory to exist and the same checkpoint.
        run_dir.mkdir(parents=True, exist_ok=True)
        yield last_checkpoint(run_dir) if resume else None
        return
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    aside = replaced_path(run_dir)
    moved = False
    if overwrite and _is_nonempty_dir(run_dir):
        run_dir.rename(aside)
        moved = True
    checkpoint = last_checkpoint(run_dir) if resume else None
    try:
        _start(run_dir)
        yield checkpoint
    except BaseException:
        if moved:
            shutil.rmtree(run_dir, ignore_errors=True)  # our own partial run, never anything else
            try:
                aside.rename(run_dir)
            except OSError:
                pass  # the old run stays in `aside`; check_run_dir names it on the next invocation
        raise
    if moved:
        shutil.rmtree(aside)


OUTPUT_MARKER = "kasa_output.json"


def check_output_folder(output_dir: str | Path, kind: str, overwrite: bool = False) -> None:
    """Raise :class:`RunDirError` unless :func:`write_output_folder` may write ``output_dir`` (call it before the work)."""
    output_dir = Path(output_dir)
    marker = _read_json(output_dir / OUTPUT_MARKER)
    ours = isinstance(marker, dict) and marker.get("kind") == kind
    if _is_nonempty_dir(output_dir) or (output_dir.exists() and not output_dir.is_dir()):
        if not ours:
            raise RunDirError(f"{output_dir} exists and was not written by this command ({kind}); nothing was changed. "
                              "Choose a new output folder")
        if not overwrite:
            raise RunDirError(f"{output_dir} already holds a {kind}; pass --overwrite to replace it, or choose a new "
                              "output folder")


def write_output_folder(output_dir: str | Path, write, kind: str, overwrite: bool = False) -> Path:
    """Write a command's output folder (``kasa merge``, ``kasa export``) without ever losing a user's files.

    ``write(path)`` fills a fresh folder. It is built in a hidden sibling and renamed into place only once complete,
    with a marker ``kasa_output.json`` (``{"kind": kind}``) inside, so a failure leaves no half-written output. An
    existing non-empty ``output_dir`` is refused, unless ``overwrite`` is given *and* it carries the marker of an
    earlier output of the same ``kind``; then it is replaced only after the new output is complete.
    """
    output_dir = Path(output_dir)
    check_output_folder(output_dir, kind, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        write(partial)
        atomic_write_text(partial / OUTPUT_MARKER, json.dumps({"kind": kind, "schema": 1}) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = output_dir.with_name(f".{output_dir.name}{REPLACED_SUFFIX}-{os.getpid()}")
    if output_dir.exists():
        output_dir.rename(old)  # an empty folder, or our own earlier output (checked above)
    partial.rename(output_dir)
    if old.exists():
        shutil.rmtree(old)
    return output_dir
