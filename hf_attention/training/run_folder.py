"""Where a training run writes, decided before it writes anything, so that no run loses what `--output_dir` holds.

A run into an empty (or new) output folder writes there. A run that replaces a non-empty folder
(`--overwrite_output_dir`) trains in a staging folder beside it and swaps it in only when the run is complete, so a
bad input, a crash or a kill leaves the old contents untouched. A resumed run continues the folder's own checkpoints.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint_io_hf_attention import cannot_be_swapped, is_inside, swap_into_place

OLD_CHECKPOINTS = "checkpoints"  # where runs before hf_attention 0.9 kept them
TRAINER_STATE = "trainer_state.json"


class OutputFolderError(ValueError):
    """An output folder or resume request that would lose or mix up a user's files; nothing has been written."""


@dataclass
class RunFolder:
    """The user's `output_dir` and the folder this run writes its checkpoints and final model into."""

    output_dir: Path
    work_dir: Path
    resume_from_checkpoint: str | None

    @property
    def replaces_output_dir(self) -> bool:
        return self.work_dir != self.output_dir

    @property
    def checkpoints_dir(self) -> Path:
        """`checkpoint-N` folders go straight into the run's folder, where transformers users look for them."""
        return self.work_dir

    @property
    def continues_unfinished_replacement(self) -> bool:
        """Whether this run resumes a checkpoint of a replacing run that was interrupted (in the staging folder)."""
        resume = self.resume_from_checkpoint
        return self.replaces_output_dir and resume is not None and is_inside(resume, self.work_dir)

    def clear_unfinished_replacement(self) -> None:
        """Main process, before training: drop the staging folder of an earlier replacing run that never finished,
        unless this run continues it."""
        if self.replaces_output_dir and not self.continues_unfinished_replacement:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def finish(self) -> None:
        """Main process, once the run is complete: put a replacing run's folder in place of the old one."""
        if self.replaces_output_dir:
            swap_into_place(self.work_dir, self.output_dir)
            shutil.rmtree(self.work_dir)  # now the old contents


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def staging_folder(output_dir: Path) -> Path:
    """Where a run that replaces `output_dir` trains until it is complete."""
    return output_dir.parent / f".{output_dir.name}.training"


def _checkpoint_to_resume(resume: str, output_dir: Path, overwrite_output_dir: bool) -> str:
    if resume in ("latest", "true", "True"):
        # a replacing run (--overwrite_output_dir) that was interrupted left its checkpoints in the staging folder
        staging = [staging_folder(output_dir)] if overwrite_output_dir else []
        for folder in (*staging, output_dir, output_dir / OLD_CHECKPOINTS):
            latest = get_last_checkpoint(str(folder)) if folder.is_dir() else None
            if latest is not None:
                return latest
        raise OutputFolderError(
            f"--resume_from_checkpoint {resume}: {output_dir} holds no complete checkpoint-N folder to resume from."
        )
    if not (Path(resume) / TRAINER_STATE).is_file():
        raise OutputFolderError(
            f"--resume_from_checkpoint {resume}: not a checkpoint folder (no {TRAINER_STATE}); pass a "
            "checkpoint-N folder, or 'latest' for the output folder's newest checkpoint."
        )
    return resume


def plan_run_folder(
    output_dir: str, overwrite_output_dir: bool, resume_from_checkpoint: str | None, inputs: dict[str, str]
) -> RunFolder:
    """Check the output folder against the inputs and the resume request; write nothing.

    Args:
        inputs: flag -> local path the run reads (data files, a model or tokenizer folder).

    Raises:
        OutputFolderError: the output folder is or contains an input; it holds files and neither
            `--overwrite_output_dir` nor a resume of its own run was asked for; the checkpoint to resume is missing;
            the run would replace a folder that cannot be swapped (a mount point, the working directory).
    """
    output = Path(os.path.realpath(output_dir))
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"--output_dir {output_dir} is a file; the run needs a folder.")
    for flag, value in inputs.items():
        if value and is_inside(value, output):
            raise OutputFolderError(
                f"--output_dir {output_dir} contains {flag} {value}: the run would write over its own input; "
                "choose another output folder."
            )
    staging = staging_folder(output)
    planned = _plan(output, output_dir, staging, overwrite_output_dir, resume_from_checkpoint)
    reason = cannot_be_swapped(output) if planned.replaces_output_dir else None
    if reason:
        raise OutputFolderError(
            f"--output_dir {output_dir}: {reason}, so a run that replaces it cannot train beside it and swap it in "
            f"at the end; give a folder inside it (e.g. --output_dir {output_dir}/run), or empty it first."
        )
    return planned


def _plan(output: Path, output_dir: str, staging: Path, overwrite_output_dir: bool,
          resume_from_checkpoint: str | None) -> RunFolder:  # fmt: skip
    if resume_from_checkpoint:
        checkpoint = _checkpoint_to_resume(resume_from_checkpoint, output, overwrite_output_dir)
        if is_inside(checkpoint, output):
            return RunFolder(output, output, checkpoint)
        if is_inside(checkpoint, staging):  # an interrupted replacing run: it goes on where it stopped
            if not overwrite_output_dir:
                raise OutputFolderError(
                    f"--resume_from_checkpoint {resume_from_checkpoint} belongs to an unfinished run that replaces "
                    f"{output_dir}; pass --overwrite_output_dir to continue it."
                )
            return RunFolder(output, staging, checkpoint)
        if _holds_files(output) and not overwrite_output_dir:
            raise OutputFolderError(
                f"--output_dir {output_dir} holds files of another run than --resume_from_checkpoint "
                f"{resume_from_checkpoint}; pass --overwrite_output_dir to replace them when the run ends."
            )
        return RunFolder(output, staging if _holds_files(output) else output, checkpoint)
    if not _holds_files(output):
        return RunFolder(output, output, None)
    if not overwrite_output_dir:
        held = "a saved model" if (output / "config.json").exists() else "files"
        raise OutputFolderError(
            f"{output_dir} already holds {held}; pass --overwrite_output_dir to replace it when the run ends, "
            "or --resume_from_checkpoint latest to continue its run."
        )
    return RunFolder(output, staging, None)
