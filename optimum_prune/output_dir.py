"""Output directories that never lose a user's files.

Every checkpoint optimum-prune writes goes through [`atomic_directory`]:

- the target is checked before any work: never "", the working directory or one of its ancestors, an input model's
  directory or one of its ancestors; a non-empty directory only when it is a previous optimum-prune output (a
  `pruning_plan.json` and nothing but checkpoint files) or the caller says `overwrite=True`, and then only the files a
  checkpoint consists of are replaced; writable, with room for the expected bytes;
- the checkpoint is written to a hidden sibling and swapped in with one atomic exchange of the two directory entries
  (Linux `renameat2(RENAME_EXCHANGE)`); where the file system cannot exchange, the old directory is renamed aside
  first and a killed run's directory is restored by the next run;
- one writer per target at a time (an advisory lock beside the target); a second run fails with a clear message
  instead of reporting success for a result that another run replaced;
- folders left by killed runs (`.NAME.tmp-*`, `.NAME.old-*`) are cleaned up (or restored) by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, everything else holds
    fcntl = None

logger = logging.getLogger(__name__)

# The files a checkpoint written by optimum-prune (or Transformers' `save_pretrained`) consists of. Only these are
# ever replaced or removed in a directory that holds other files too.
CHECKPOINT_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "pruner_config.json",
    "pruning_plan.json",
    "pruning_results.json",
    "README.md",
    "layer_widths.png",
    "modeling_*.py",
    "configuration_*.py",
    "per_layer_config.py",
)
MARKER_FILE = "pruning_plan.json"  # every optimum-prune output has one
RENAME_EXCHANGE = 2  # linux/fs.h


class OutputDirectoryError(ValueError):
    """An output location optimum-prune refuses to write to (the CLI prints it as one line, exit code 2)."""


def is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS)


def is_previous_output(directory: Path) -> bool:
    """Whether `directory` holds an optimum-prune checkpoint and nothing else (so replacing it loses nothing)."""
    entries = list(directory.iterdir())
    return (directory / MARKER_FILE).is_file() and all(e.is_file() and is_checkpoint_file(e.name) for e in entries)


def _is_same_or_ancestor(path: Path, of: Path) -> bool:
    return path == of or path in of.parents


def _existing_inputs(inputs) -> list[Path]:
    """The local files and directories among `inputs` (Hub ids, data given as text and None are skipped)."""
    found = []
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and os.fspath(item) and os.path.exists(item):
            found.append(Path(item).resolve())
    return found


def check_output_directory(
    save_directory: str | os.PathLike | None, inputs=(), overwrite: bool = False, expected_bytes: int | None = None
) -> Path:
    """Refuse an output location that could destroy data or cannot be written, before any work starts.

    Args:
        save_directory: where the checkpoint will go.
        inputs: paths the run reads (the model directory, data files); the output may be neither one of them nor a
            directory holding one.
        overwrite: allow a non-empty directory that is not a previous optimum-prune output (only the checkpoint's
            files in it are then replaced).
        expected_bytes: roughly how much will be written; refused when the file system has less free space.

    Returns:
        The resolved target path.
    """
    if save_directory is None or not os.fspath(save_directory).strip():
        raise OutputDirectoryError("The output directory is empty (an unset variable?); give a directory to write to.")
    target = Path(os.path.expanduser(os.fspath(save_directory))).resolve()
    cwd = Path.cwd().resolve()
    if _is_same_or_ancestor(target, cwd) or target == Path.home().resolve():
        raise OutputDirectoryError(
            f"Refusing to write the checkpoint to {target}: it is the working directory, one of its ancestors or the "
            "home directory. Give a new or dedicated directory, e.g. `out/`."
        )
    for source in _existing_inputs(inputs):
        if _is_same_or_ancestor(target, source):
            raise OutputDirectoryError(
                f"Refusing to write the checkpoint to {target}: it would replace the input {source}. Give another "
                "directory."
            )
    if target.exists() and not target.is_dir():
        raise OutputDirectoryError(f"The output {target} exists and is not a directory; give a directory path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite and not is_previous_output(target):
        raise OutputDirectoryError(
            f"The output directory {target} is not empty and is not an optimum-prune checkpoint; choose a new or "
            "empty directory, or pass --overwrite (`overwrite=True`) to replace only the checkpoint's files in it."
        )
    _check_writable(target, expected_bytes)
    return target


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_writable(target: Path, expected_bytes: int | None) -> None:
    """Probe the directory the checkpoint's parent lives in (a temporary file, removed at once) and its free space."""
    where = _nearest_existing(target.parent)
    if not where.is_dir():
        raise OutputDirectoryError(f"Cannot create the output {target}: {where} is not a directory.")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        raise OutputDirectoryError(f"Cannot write to {where} ({err.strerror}); choose a writable output.") from None
    if expected_bytes:
        free = shutil.disk_usage(where).free
        if free < expected_bytes:
            raise OutputDirectoryError(
                f"Not enough free space for the checkpoint in {where}: about {expected_bytes / 2**30:.2f} GiB needed, "
                f"{free / 2**30:.2f} GiB free."
            )


# ------------------------------------------------------------------------------------------------ one writer a target
_HELD_LOCKS: set[Path] = set()  # targets this process holds the lock of: re-entrant within a process


@contextlib.contextmanager
def output_lock(save_directory: str | os.PathLike):
    """Hold the advisory lock of `save_directory` (a `.NAME.lock` file beside it) or fail at once if another process
    holds it. Re-entrant within one process (an inner call holds nothing more); the lock file is removed when the
    outermost holder releases it."""
    target = Path(os.path.expanduser(os.fspath(save_directory))).resolve()
    if target in _HELD_LOCKS or fcntl is None:
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    fd = _acquire(lock_path, target)
    _HELD_LOCKS.add(target)
    try:
        yield target
    finally:
        _HELD_LOCKS.discard(target)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _acquire(lock_path: Path, target: Path) -> int:
    """Lock `lock_path`; retried when another process removed the file between our open and our lock."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirectoryError(
                f"Another optimum-prune run (pid {owner}) is writing {target}; wait for it to finish or choose "
                "another output directory."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


# --------------------------------------------------------------------------------------- leftovers of killed runs
def recover_leftovers(target: Path) -> None:
    """Restore or remove what killed runs left beside `target` (call with the lock held: nothing else is writing)."""
    name = glob.escape(target.name)
    for old in sorted(target.parent.glob(f".{name}.old-*")):
        if not target.exists():
            os.replace(old, target)
            logger.warning("Restored %s from %s, left by a run that was stopped while replacing it.", target, old)
        else:
            _remove_leftover(old)
    for tmp in sorted(target.parent.glob(f".{name}.tmp-*")):
        _remove_leftover(tmp)


def _remove_leftover(path: Path) -> None:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    shutil.rmtree(path, ignore_errors=True)
    logger.warning("Removed %s (%.1f MiB) left by an earlier run that was stopped.", path, size / 2**20)


# ------------------------------------------------------------------------------------------------- swapping in place
def _renameat2():
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    function = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange_directories(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries `a` and `b` (both must exist); False where the OS cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a))


def _replace_directory(tmp: Path, target: Path) -> None:
    """Put `tmp` at `target`; the old `target` (a previous checkpoint or empty) is removed only once `tmp` is in."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if exchange_directories(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old checkpoint
        return
    backup = target.parent / f".{target.name}.old-{os.getpid()}"  # restored by the next run if we are killed here
    os.replace(target, backup)
    os.replace(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)


def _merge_into(tmp: Path, target: Path) -> None:
    """`overwrite=True` on a directory with other files: move the new checkpoint's files in one by one (each an
    atomic rename) and remove the old checkpoint files the new one does not have (e.g. shards of another count)."""
    written = {entry.name for entry in tmp.iterdir()}
    for name in sorted(written):
        os.replace(tmp / name, target / name)
    for entry in target.iterdir():
        if entry.is_file() and entry.name not in written and is_checkpoint_file(entry.name):
            entry.unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def _make_temporary(target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # the permissions of a directory made with mkdir, not mkdtemp's 0700
    return tmp


def checkpoint_bytes(model) -> int:
    """Bytes the parameters of `model` (an `nn.Module`) take in a safetensors checkpoint (tied tensors once): the
    free space a save needs (`expected_bytes`), known before writing anything."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def atomic_directory(
    save_directory: str | os.PathLike,
    inputs=(),
    overwrite: bool = False,
    expected_bytes: int | None = None,
):
    """Yield a temporary sibling directory that becomes `save_directory` only if the block succeeds.

    The target is checked first ([`check_output_directory`]). On any failure the temporary directory is removed and
    `save_directory` is left exactly as it was (absent, or with its previous contents).
    """
    target = check_output_directory(save_directory, inputs, overwrite, expected_bytes)
    with output_lock(target):
        recover_leftovers(target)
        tmp = _make_temporary(target)
        try:
            yield tmp
            if target.is_dir() and any(target.iterdir()) and not is_previous_output(target):
                if not overwrite:  # files appeared since the check
                    raise OutputDirectoryError(f"The output directory {target} is no longer empty; nothing written.")
                _merge_into(tmp, target)
            else:
                _replace_directory(tmp, target)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise OutputDirectoryError(
                    f"Could not write the checkpoint to {target} ({err.strerror}); nothing was changed there."
                ) from err
            raise
