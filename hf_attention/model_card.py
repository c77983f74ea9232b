"""The model card of a trained model: `model_card_template.md` rendered with `huggingface_hub.ModelCard`."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_hf_attention import HfAttentionConfig

TEMPLATE = Path(__file__).parent / "model_card_template.md"

# Training arguments a reader needs to reproduce the run, in the order the card lists them.
REPORTED_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "label_smoothing_factor",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "seed",
    "bf16",
    "fp16",
)


def render_model_card(summary, model_args, data_args, training_args, config: HfAttentionConfig) -> ModelCard:
    """The card for a finished run (`hf_attention.train.RunSummary` and its arguments)."""
    languages = [data_args.source_lang, data_args.target_lang]
    dataset_name = data_args.dataset_name or (Path(data_args.train_file).name if data_args.train_file else "toy")
    test_description = data_args.test_file or "the toy corpus's held-out test split"
    eval_results = [
        EvalResult(
            task_type="translation",
            task_name=f"Translation {languages[0]}-{languages[1]}",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type=metric,
            metric_name=metric_name,
            metric_value=round(value, 2),
        )
        for metric, metric_name, value in (("bleu", "BLEU", summary.bleu_after), ("chrf", "chrF", summary.chrf_after))
    ]
    model_name = Path(summary.output_dir).name
    card_data = ModelCardData(
        language=languages,
        license=data_args.license,
        library_name="transformers",
        pipeline_tag="translation",
        tags=["translation", "hf_attention", "seq2seq"],
        datasets=[dataset_name],
        metrics=["bleu", "chrf"],
        base_model=model_args.model_name_or_path or None,
        model_name=model_name,
        eval_results=eval_results,
    )
    hyperparameters = []
    for name in REPORTED_HYPERPARAMETERS:
        value = getattr(training_args, name)
        if name == "num_train_epochs" and training_args.max_steps > 0:
            continue  # max_steps decides
        hyperparameters.append((name, getattr(value, "value", value)))  # enums as their plain values
    architecture = (
        f"{config.encoder_layers}+{config.decoder_layers} layers, d_model {config.d_model}, "
        f"{config.encoder_attention_heads} heads, d_ff {config.encoder_ffn_dim}, dropout {config.dropout}, "
        f"{config.position_embedding_type} positions, {'pre' if config.normalize_before else 'post'}-LN, "
        f"vocabulary {config.vocab_size}"
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        source_lang=languages[0],
        target_lang=languages[1],
        base_model=model_args.model_name_or_path,
        test_description=test_description,
        test_sentences=summary.test_sentences,
        num_beams=training_args.generation_num_beams or 1,
        bleu=f"{summary.bleu_after:.2f}",
        chrf=f"{summary.chrf_after:.2f}",
        bleu_before=None if summary.bleu_before is None else f"{summary.bleu_before:.2f}",
        bleu_signature=summary.bleu_signature,
        chrf_signature=summary.chrf_signature,
        dataset_description=data_args.dataset_name or data_args.train_file or "The toy numbers-as-words corpus",
        train_pairs=summary.train_pairs,
        length_report=summary.length_report,
        data_terms=data_args.data_terms or "no terms given; check the data's licence before publishing this model.",
        steps=summary.steps,
        minutes=f"{summary.seconds / 60:.1f}",
        hyperparameters=hyperparameters,
        parameters=f"{summary.parameters / 1e6:.2f}M",
        architecture=architecture,
        repo_id=model_name,
        example_source=summary.example_source,
    )


def write_model_card(output_dir: Path, summary, model_args, data_args, training_args, config) -> Path:
    """Render the card and save it as `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    render_model_card(summary, model_args, data_args, training_args, config).save(path)
    return path
