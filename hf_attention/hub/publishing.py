"""Publish a trained model folder to the Hub in one commit: weights, config, code, pipelines, tokenizer, card.

The folder is re-saved through `save_pretrained` (so the model code, `auto_map` and `custom_pipelines` are always
current) into a staging folder with the tokenizer, the model card and the run's curves and results; a dry run lists
that staging folder instead of uploading it. Checkpoints and `training_args.bin` (a pickle) stay behind.
"""

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser

from .. import __version__
from .model_card import ModelCardFacts, write_model_card

EXTRA_FILES = ("README.md", "training_curves.png", "results.json")


@dataclass
class PublishArguments:
    folder: str = field(default="", metadata={"help": "A trained model folder (output_dir of scripts/train.py)."})
    repo_id: str = field(default="", metadata={"help": "Hub repo, e.g. alice/transformer-en-de."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    revision: str = field(default="main", metadata={"help": "Branch to commit to."})
    commit_message: str = field(default="", metadata={"help": "Commit message (default: names hf_attention)."})
    dry_run: bool = field(default=False, metadata={"help": "List what would be uploaded; upload nothing."})


def stage(folder: str | Path, staging: Path, repo_id: str) -> list[tuple[str, int]]:
    """Write what a publication uploads into `staging`; returns (path, bytes) for each file, sorted.

    The model card is rendered again from the facts the training job kept in results.json, so that its "how to
    use" names `repo_id`; a folder without them (not trained here) keeps its README.md as it is.

    Raises:
        FileNotFoundError: the folder lacks a model, a tokenizer or a model card.
    """
    folder = Path(folder)
    for required, what in (("config.json", "a saved model"), ("README.md", "a model card")):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder} has no {required}: it does not hold {what}.")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json).")
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(folder).save_pretrained(staging)
    for name in EXTRA_FILES:
        if (folder / name).is_file():
            (staging / name).write_bytes((folder / name).read_bytes())
    facts = (
        json.loads((folder / "results.json").read_text()).get("model_card")
        if (folder / "results.json").is_file()
        else None
    )
    if facts:
        write_model_card(staging, ModelCardFacts(**{**facts, "repo_id": repo_id}))
    return sorted(
        (str(path.relative_to(staging)), path.stat().st_size) for path in staging.rglob("*") if path.is_file()
    )


def publish(args: PublishArguments, token: str | None = None) -> list[tuple[str, int]]:
    """Stage the folder and, unless `dry_run`, create the repo (if needed) and upload it as one commit.

    Args:
        token: a Hub token (default: the logged-in user's); a repo id without a namespace goes to its owner's.
    """
    with tempfile.TemporaryDirectory(prefix="hf_attention-publish-") as staging:
        api, repo_id = HfApi(token=token), args.repo_id
        if not args.dry_run:  # first, so that the card names the full repo id
            repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
        files = stage(args.folder, Path(staging), repo_id)
        if not args.dry_run:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=args.revision,
                commit_message=args.commit_message or f"Upload hf_attention model (hf_attention {__version__})",
            )
    return files


def main(argv: list[str] | None = None) -> None:
    """`push_to_hub.py REPO_ID FOLDER [--private] [--revision B] [--dry_run]`, in the order of `hf upload`."""
    parser = HfArgumentParser(PublishArguments, description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths", nargs="*", metavar="REPO_ID FOLDER", help="The repo and the folder (or --repo_id/--folder)."
    )
    args, extra = parser.parse_args_into_dataclasses(args=argv)
    if extra.paths:
        if len(extra.paths) != 2:
            parser.error("give REPO_ID and FOLDER")
        args.repo_id, args.folder = extra.paths
        if Path(args.repo_id).is_dir() and not Path(args.folder).is_dir():
            parser.error(f"{args.repo_id} is a folder: the order is REPO_ID FOLDER, as in `hf upload`")
    if not args.folder or not args.repo_id:
        parser.error("give REPO_ID and FOLDER")
    try:
        files = publish(args)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to {args.repo_id} ({args.revision}):")
    for path, size in files:
        print(f"  {path:<40} {size:>12,d} bytes")
