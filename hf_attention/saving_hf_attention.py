"""Atomic folder saves: a model folder holds either its previous contents or the complete new save, never a mix.

`save_pretrained` writes a folder file by file (config, generation config, weights, code), so a process killed part
way leaves a folder whose config describes one model and whose weights hold another, and a later load may accept
it. Here everything is written into a staging folder beside the target, then swapped in with one atomic rename.

Travels with the model code (modeling_hf_attention.py imports it relatively), so saves made through
`trust_remote_code` are atomic too; it imports only the standard library.
"""

import ctypes
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Beside a target folder T: ".T.saving-PID-XXXXXXXX" holds a save in progress (or, after the swap, the old contents
# until they are deleted); ".T.replaced-PID-XXXXXXXX" holds the old contents where the swap takes two renames.
STAGING_MARK = ".saving-"
REPLACED_MARK = ".replaced-"

# Weight files of an older save: a new save supersedes them even where it writes other names (sharded <-> single).
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def _beside(target: Path, mark: str) -> Path:
    return target.parent / f".{target.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_interrupted_saves(target: str | os.PathLike) -> None:
    """Clear what killed saves left beside `target`: unfinished staging folders and old contents of finished swaps.

    A save cut between the two renames of the fallback swap leaves no `target` at all: its old contents are put back.
    Folders of saves still running (their process is alive) are left alone.
    """
    target = Path(os.path.realpath(target))
    if not target.parent.is_dir():
        return
    prefix = f".{target.name}"
    for entry in target.parent.iterdir():
        for mark in (STAGING_MARK, REPLACED_MARK):
            owner = entry.name.removeprefix(prefix + mark).split("-")[0]
            if not entry.name.startswith(prefix + mark) or not owner.isdigit() or _process_is_alive(int(owner)):
                continue
            if mark == REPLACED_MARK and not target.exists():
                os.rename(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # same file system (a sibling folder): no bytes copied
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(target: Path, staging: Path) -> None:
    """Give `staging` the entries of `target` that the new save does not replace (tokenizer, card, checkpoints)."""
    for entry in target.iterdir():
        destination = staging / entry.name
        if destination.exists() or destination.is_symlink() or _WEIGHT_FILE.fullmatch(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(destination))


def _sync_files(folder: Path) -> None:
    """Flush the new files to disk, so a power cut after the swap cannot leave empty files in their place."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system has no such call."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_current_directory, rename_exchange = -100, 2
    if renameat2(at_current_directory, bytes(first), at_current_directory, bytes(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, f"cannot swap {first} into place: {os.strerror(error)}", str(second))


def swap_into_place(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make the complete folder `staging` appear at `target`; `target`'s old contents end up at `staging`'s name.

    One atomic exchange where the system offers it; elsewhere two renames, which `remove_interrupted_saves` repairs
    if a kill falls between them.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):
        replaced = _beside(target, REPLACED_MARK)
        os.rename(target, replaced)
        os.rename(staging, target)
        os.rename(replaced, staging)


@contextmanager
def replacing_folder(target: str | os.PathLike, carry_over: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; when the block completes, swap it in for `target`.

    An exception (or a kill) inside the block leaves `target` as it was. After a kill the staging folder stays
    until the next save or load of `target` clears it (`remove_interrupted_saves`).

    Args:
        target: the folder to create or replace (a symbolic link to a folder replaces the folder it points to).
        carry_over: keep `target`'s entries the new contents do not replace (a tokenizer, a README, checkpoints), as
            `save_pretrained` into an existing folder does; older weight files are dropped either way.

    Raises:
        NotADirectoryError: `target` is a file.
    """
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; a model is saved into a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_interrupted_saves(target)
    staging = _beside(target, STAGING_MARK)
    staging.mkdir()
    try:
        yield staging
        _sync_files(staging)
        if carry_over and target.is_dir():
            _carry_over(target, staging)
        swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old contents after a swap, or an unfinished save
