"""Saving and loading hf_attention checkpoints: atomic saves and strict loads (`CheckpointIOMixin`).

`save_pretrained` writes a folder file by file (config, generation config, weights, code), so a process killed part
way leaves a folder whose config describes one model and whose weights hold another, and a later load may accept
it. Here everything is written into a staging folder beside the target, then swapped in with one atomic rename. And
`from_pretrained` refuses weights that do not match the config, where transformers initialises what is missing.

Travels with the model code (modeling_hf_attention.py imports it relatively), so remote-code saves and loads behave
the same; it imports the standard library, safetensors (installed with transformers), transformers' pipelines'
table (pipeline_hf_attention.py) and nothing else.
"""

import ctypes
import errno
import glob
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

try:
    import fcntl
except ImportError:  # Windows: no flock; a save's folder is then judged by its machine and PID alone
    fcntl = None

from .pipeline_hf_attention import PIPELINES

# Beside a target folder T: ".T.saving-MACHINE-PID-XXXXXXXX" holds a save in progress (or, after the swap, the old
# contents until they are deleted), locked through the file of the same name + ".lock" for as long as the save runs;
# ".T.replaced-MACHINE-PID-XXXXXXXX" holds the old contents where the swap takes two renames. MACHINE names the host,
# its boot and its PID namespace: a PID says whether a process lives only where all three are ours.
STAGING_MARK = ".saving-"
REPLACED_MARK = ".replaced-"
LOCK_SUFFIX = ".lock"

# Weight files of an older save: a new save supersedes them even where it writes other names (sharded <-> single).
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies inside it, links resolved: what replacing `folder` would delete. Every
    command that replaces a folder refuses one that holds one of its own inputs."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def machine_id() -> str:
    """This host, its boot and its PID namespace, in 8 hex digits."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
        except OSError:
            parts.append("")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


def _beside(target: Path, mark: str) -> Path:
    return target.parent / f".{target.name}{mark}{machine_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_is_free(lock: Path) -> bool:
    """Whether no process holds `lock` (flock works across the hosts of an NFS mount too)."""
    try:
        with open(lock, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True
    except BlockingIOError:
        return False
    except OSError:
        return False  # unreadable: not provably free


def _is_dead(entry: Path, mark: str) -> bool:
    """Whether the save that left `entry` provably ended: its lock is free, or (no lock) it ran on this machine
    (host, boot, PID namespace) under a PID that no longer lives. Anything else may be a save running elsewhere."""
    lock = entry.with_name(entry.name + LOCK_SUFFIX)
    if mark == STAGING_MARK and lock.exists() and fcntl is not None:
        return _lock_is_free(lock)
    machine, _, rest = entry.name.partition(mark)[2].partition("-")
    pid = rest.split("-")[0]
    return machine == machine_id() and pid.isdigit() and not _process_is_alive(int(pid))


def _leftovers(target: Path) -> Iterator[tuple[Path, str]]:
    prefix = f".{target.name}"
    for entry in target.parent.iterdir():
        for mark in (STAGING_MARK, REPLACED_MARK):
            if entry.name.startswith(prefix + mark) and not entry.name.endswith(LOCK_SUFFIX):
                yield entry, mark


def restore_interrupted_swap(target: str | os.PathLike) -> None:
    """Put back the old contents of a two-rename swap that a kill cut between its renames (no `target` left). Loads
    call this: they repair, but never delete another process's files."""
    target = Path(os.path.realpath(target))
    if target.exists() or not target.parent.is_dir():
        return
    for entry, mark in _leftovers(target):
        if mark == REPLACED_MARK and _is_dead(entry, mark):
            os.rename(entry, target)
            return


def remove_interrupted_saves(target: str | os.PathLike) -> None:
    """Before a save: clear what killed saves left beside `target` (unfinished staging folders, old contents of
    finished swaps), and put back the old contents of a swap cut between its two renames. Only what provably ended
    goes (`_is_dead`): a save in progress, here or on another host sharing the folder, is left alone."""
    target = Path(os.path.realpath(target))
    if not target.parent.is_dir():
        return
    restore_interrupted_swap(target)
    for entry, mark in list(_leftovers(target)):
        if _is_dead(entry, mark):
            shutil.rmtree(entry, ignore_errors=True)
            entry.with_name(entry.name + LOCK_SUFFIX).unlink(missing_ok=True)
    prefix = f".{target.name}{STAGING_MARK}"
    for lock in target.parent.glob(f"{glob.escape(prefix)}*{LOCK_SUFFIX}"):  # a lock whose folder is gone
        folder_gone = not lock.with_name(lock.name.removesuffix(LOCK_SUFFIX)).exists()
        if folder_gone and fcntl is not None and _lock_is_free(lock):
            lock.unlink(missing_ok=True)


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


def cannot_be_swapped(target: str | os.PathLike) -> str | None:
    """Why `target` cannot be replaced by renaming a sibling folder over it (None: it can): it is a mount point (a
    Docker volume: renames across it fail), the working directory of this process (which would then stand in the old
    contents), or its parent is not writable."""
    target = Path(os.path.realpath(target))
    if target.is_dir() and os.path.ismount(target):
        return "it is a mount point"
    if is_inside(os.getcwd(), target):
        return "it holds the working directory"
    if target.parent.exists() and not os.access(target.parent, os.W_OK | os.X_OK):
        return "its parent folder is not writable"
    return None


@contextmanager
def replacing_folder(target: str | os.PathLike, carry_over: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; when the block completes, swap it in for `target`.

    An exception (or a kill) inside the block leaves `target` as it was. After a kill the staging folder stays
    until the next save of `target` clears it (`remove_interrupted_saves`); a load leaves it. A folder that cannot be
    swapped (`cannot_be_swapped`) is saved into in place instead (`_saving_in_place`).

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
    if target.exists() and cannot_be_swapped(target):
        with _saving_in_place(target, carry_over) as staging:
            yield staging
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_interrupted_saves(target)
    staging = _beside(target, STAGING_MARK)
    lock = staging.with_name(staging.name + LOCK_SUFFIX)
    with open(lock, "wb") as held:
        if fcntl is not None:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when this save ends, or its process dies
        staging.mkdir()
        try:
            yield staging
            _sync_files(staging)
            if carry_over and target.is_dir():
                _carry_over(target, staging)
            swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the old contents after a swap, or an unfinished save
            lock.unlink(missing_ok=True)


# In a folder saved into in place: the staging folder inside it, and the mark that says a save is moving files in.
INCOMPLETE_MARK = ".hf_attention-save-incomplete"


@contextmanager
def _saving_in_place(target: Path, carry_over: bool) -> Iterator[Path]:
    """Stage inside `target`, then move the files in one by one (each rename atomic), between writing
    `INCOMPLETE_MARK` and removing it: a kill while files move leaves the mark, and loads refuse the folder
    (`check_complete`) until a save completes. A kill before the moves leaves `target` as it was."""
    for entry in target.iterdir():  # staging folders of earlier in-place saves that provably ended
        if (
            entry.name.startswith(STAGING_MARK)
            and not entry.name.endswith(LOCK_SUFFIX)
            and _is_dead(entry, STAGING_MARK)
        ):
            shutil.rmtree(entry, ignore_errors=True)
            entry.with_name(entry.name + LOCK_SUFFIX).unlink(missing_ok=True)
    name = f"{STAGING_MARK}{machine_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging, lock, mark = target / name, target / (name + LOCK_SUFFIX), target / INCOMPLETE_MARK
    with open(lock, "wb") as held:
        if fcntl is not None:
            fcntl.flock(held, fcntl.LOCK_EX)
        staging.mkdir()
        try:
            yield staging
            _sync_files(staging)
            mark.write_text(name)
            written = {entry.name for entry in staging.iterdir()}
            for entry in list(target.iterdir()):
                if entry.name == INCOMPLETE_MARK or entry.name.startswith(STAGING_MARK):
                    continue
                folder = entry.is_dir() and not entry.is_symlink()
                dropped = entry.name not in written and (not carry_over or _WEIGHT_FILE.fullmatch(entry.name))
                if folder and (dropped or entry.name in written):  # a folder cannot be renamed over a folder
                    shutil.rmtree(entry)
                elif dropped:
                    entry.unlink()
            for entry in staging.iterdir():
                os.replace(entry, target / entry.name)  # a file over a file: one atomic rename
            mark.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            lock.unlink(missing_ok=True)


def check_complete(folder: str | os.PathLike) -> None:
    """Refuse a folder an in-place save left half moved (`_saving_in_place`).

    Raises:
        OSError: the folder holds `INCOMPLETE_MARK`: its save is running, or was killed while moving files in.
    """
    mark = Path(folder) / INCOMPLETE_MARK
    if not mark.is_file():
        return
    staging = Path(folder) / mark.read_text().strip()
    lock = staging.with_name(staging.name + LOCK_SUFFIX)
    if lock.exists() and not _is_dead(staging, STAGING_MARK):
        raise OSError(f"{folder}: a save into it is moving files in right now; load it once that save has ended.")
    raise OSError(f"{folder}: a save into it was interrupted while moving its files in, so they may belong to two "
                  "different models; save the model into it again.")  # fmt: skip


class CheckpointIOMixin:
    """transformers' `from_pretrained` / `save_pretrained`, made strict and atomic (mixed into our PreTrainedModel)."""

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, strict: bool | None = None, **kwargs
    ):
        """transformers' `from_pretrained`, strict about the weights, with errors that name the checkpoint.

        Args:
            strict: refuse weights that do not match the model that config.json describes (tensors missing,
                unexpected or renamed, e.g. a config edited to another layer count). `strict=False` loads what
                matches and initialises the rest, as transformers does for other models. Weights tied to a loaded
                one (the pre-softmax projection of a base-model checkpoint) are never missing. Shape mismatches
                follow transformers' `ignore_mismatched_sizes`. Default: strict when a checkpoint is loaded as it
                is; transformers' own contract where the caller takes charge of the weights, so that nothing loads
                silently either way: no checkpoint (`None`, with `config`), an explicit `state_dict`, or
                `output_loading_info=True` (the report of what is missing comes back instead of an error).

        Raises:
            OSError: a weights file that is truncated or corrupted (e.g. a damaged download in the cache).
            ValueError: weights that do not match the checkpoint's config.json.
        """
        where = f"{pretrained_model_name_or_path} (revision {kwargs.get('revision') or 'main'})"
        if pretrained_model_name_or_path is not None and not os.path.isfile(str(pretrained_model_name_or_path)):
            restore_interrupted_swap(pretrained_model_name_or_path)  # never deletes: a save may be running
            if os.path.isdir(pretrained_model_name_or_path):
                check_complete(pretrained_model_name_or_path)
        output_loading_info = kwargs.pop("output_loading_info", False)
        if strict is None:
            caller_handles_weights = pretrained_model_name_or_path is None or kwargs.get("state_dict") is not None
            strict = not (caller_handles_weights or output_loading_info)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"The weights (model.safetensors) of {where} cannot be read: {error}. The file is truncated or "
                "corrupted; if it came from the Hub cache, download it again with force_download=True."
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"The weights of {where} do not match its config.json (the size report above lists the tensors): "
                "the checkpoint's config and weights come from different models."
            ) from error
        offending = {
            kind: sorted(loading_info[f"{kind}_keys"])
            for kind in ("missing", "unexpected")
            if loading_info[f"{kind}_keys"]
        }
        if strict and offending:
            found = "; ".join(f"{len(keys)} {kind}, e.g. {', '.join(keys[:3])}" for kind, keys in offending.items())
            raise ValueError(
                f"The weights of {where} do not match the model its config.json describes ({found}). Config and "
                "weights come from different models; pass strict=False to load the matching tensors and "
                "initialise the rest."
            )
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        """transformers' `save_pretrained`, atomic: a kill during the save leaves the folder's previous model intact.

        Every file goes into a staging folder beside `save_directory`, which then takes its place in one rename;
        files of the folder that the save does not write (a tokenizer, a README) are kept. A model that generates
        declares the seq2seq pipelines in its config's `custom_pipelines` when its code is saved too.
        """
        if not is_main_process or kwargs.get("distributed_checkpoint"):
            return super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if self.can_generate() and self._auto_class is not None:
            # transformers 5 removed the seq2seq pipelines; ours travel with the code (the model file imports them)
            # and are declared here, so the folder or a Hub repo pushed from it serves pipeline("translation",
            # model=..., trust_remote_code=True) where hf_attention is not installed.
            self.config.custom_pipelines = {
                task: {
                    "impl": f"pipeline_hf_attention.{cls.__name__}",
                    "pt": ["AutoModelForSeq2SeqLM"],
                    "type": "text",
                }
                for task, cls in PIPELINES.items()
            }
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", Path(save_directory).absolute().name)
        with replacing_folder(save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)
