"""The package's layout keeps its promises: the old flat import paths still resolve to the moved code, the files that
travel with a checkpoint import only each other and what a Hub user has, and no module outgrows one job."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

import hf_attention

PACKAGE = Path(hf_attention.__file__).parent
TRAVELLING = sorted(PACKAGE.glob("*_hf_attention.py"))
# What a user who loads a checkpoint with trust_remote_code has: the standard library and these (STYLE.md).
TRAVELLING_MAY_IMPORT = {"torch", "transformers", "safetensors", "huggingface_hub"}  # transformers needs the last

# (old module, a name it defined, the module that defines it now)
OLD_NAMES = [
    ("run_translation", "main", "training.job"),
    ("run_translation", "parse_arguments", "training.arguments"),
    ("run_translation", "ModelArguments", "training.arguments"),
    ("run_translation", "prepare_data", "training.prepare"),
    ("training", "PaperTrainingArguments", "training.arguments"),
    ("training", "CheckpointSafeSeq2SeqTrainer", "training.trainer"),
    ("training", "STAGING_DIR", "training.trainer"),
    ("run_folder", "plan_run_folder", "training.run_folder"),
    ("checkpoint_averaging", "average_checkpoints", "training.checkpoint_averaging"),
    ("plots", "plot_training_curves", "training.plots"),
    ("tokenization", "train_tokenizer", "data.tokenization"),
    ("inference", "Int8Linear", "inference.quantization"),
    ("inference", "optimize_for_inference", "inference.quantization"),
    ("int8_vnni", "int8_vnni_available", "inference.int8_vnni"),
    ("ctranslate2_export", "export_ctranslate2", "inference.ctranslate2_export"),
    ("ctranslate2_export", "ExportError", "inference.errors"),
    ("onnx_export", "OnnxModelForSeq2SeqLM", "inference.onnx_export"),
    ("export", "build_parser", "inference.export"),
    ("translation", "load_engine", "inference.translate"),
    ("evaluation", "evaluate_saved_model", "inference.evaluate"),
    ("evaluation", "score_translations", "metrics.evaluation"),
    ("publishing", "publish", "hub.publishing"),
    ("model_card", "write_model_card", "hub.model_card"),
    ("marian_conversion", "convert_checkpoint", "hub.marian_conversion"),
    ("pipeline_registration", "register_pipelines", "registration"),
    ("peft_defaults", "register_peft_defaults", "registration"),
]


@pytest.mark.parametrize("old, name, new", OLD_NAMES)
def test_the_old_import_paths_resolve_to_the_moved_code(old, name, new):
    moved = importlib.import_module(f"hf_attention.{old}")
    assert getattr(moved, name) is getattr(importlib.import_module(f"hf_attention.{new}"), name)
    namespace = {}
    exec(f"from hf_attention.{old} import {name}", namespace)
    assert namespace[name] is getattr(moved, name)


def test_a_module_that_moved_whole_is_the_new_module_itself():
    import hf_attention.translation as old

    import hf_attention.inference.translate as new

    assert old is new and old.__spec__.name == "hf_attention.inference.translate"
    assert sys.modules["hf_attention.translation"] is new


def test_every_moved_module_is_listed_and_imports():
    for old in hf_attention.MOVED_MODULES:
        assert not (PACKAGE / f"{old}.py").exists()  # a stale copy would not be found anyway: the finder comes first
        importlib.import_module(f"hf_attention.{old}")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hf_attention.no_such_module")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in `path`, and the modules of its relative ones (as '.name')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or "") if node.level else node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", TRAVELLING, ids=lambda path: path.name)
def test_the_files_that_travel_with_a_checkpoint_import_only_each_other_torch_transformers_safetensors(path):
    travelling = {f".{other.stem}" for other in TRAVELLING}
    for name in imported_modules(path):
        if name.startswith("."):
            assert name in travelling, f"{path.name} imports {name}, which does not travel with a checkpoint"
        else:
            assert name in TRAVELLING_MAY_IMPORT or name in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_no_module_outgrows_one_job():
    sizes = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    too_long = {
        path.name: lines for path, lines in sizes.items() if lines > 600 and path.name != "modeling_hf_attention.py"
    }
    assert too_long == {}
    assert sizes[PACKAGE / "modeling_hf_attention.py"] < 900


def test_the_package_top_shows_the_architecture():
    entries = sorted(path.name for path in PACKAGE.iterdir() if path.name != "__pycache__")
    wings = {"data", "training", "inference", "metrics", "hub"}
    assert wings <= set(entries) and len(entries) <= 19, entries
