"""The inference engines behind `scripts/translate.py`, the evaluation and the server: each loads a model and decodes a
batch of sentences into hypotheses (`Engine.decode`), with the same options and answers.

- `TorchEngine`: transformers' `generate()` on the PyTorch model, optionally `optimize_for_inference`d;
- `CTranslate2Engine`: a CTranslate2 `Translator` over the model's export (`export_ctranslate2`);
- `OnnxEngine`: `generate()` over the graphs of `export_onnx`, run by onnxruntime.

`load_engine(name, model, ...)` checks every option (`check_engine_options`) before it loads anything.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging

from .. import hardware
from ..constraints_hf_attention import LexicalConstraints
from ..generation_hf_attention import LENGTH_PENALTY_STYLES
from .alignment import align, links_from_attention, target_word_ids
from .ctranslate2_export import QUANTIZATIONS as CTRANSLATE2_QUANTIZATIONS
from .ctranslate2_export import export_ctranslate2, import_ctranslate2
from .ensemble import EnsembleForConditionalGeneration
from .errors import TranslationError
from .quantization import QUANTIZATIONS as TORCH_QUANTIZATIONS
from .quantization import model_is_compiled, optimize_for_inference

logger = logging.get_logger(__name__)

ENGINES = ("torch", "ctranslate2", "onnx")
DTYPES = hardware.DTYPES


@dataclass(frozen=True)
class Hypothesis:
    """One translation of a sentence and, when asked for, its score: the log-probability beam search ranks by (the
    sum of the tokens' log-probabilities divided by length ** length_penalty; greedy decoding: the plain sum)."""

    text: str
    score: float | None = None
    token_ids: tuple[int, ...] = ()  # the generated tokens (torch engines), for per-token scores
    alignment: tuple[tuple[int, int], ...] | None = None  # (source word, target word) pairs, when asked for


@dataclass(frozen=True)
class Sampling:
    """Sampling in place of search (`generate(do_sample=True, ...)`); None leaves an option at the model's default."""

    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    epsilon_cutoff: float | None = None

    def generate_options(self) -> dict:
        return {"do_sample": True, **{name: value for name, value in vars(self).items() if value is not None}}


def lexical_constraints(tokenizer, include: list[str], avoid: list[str]) -> LexicalConstraints:
    """Phrases to include and to avoid as the target tokens `tokenizer` gives them (no end token)."""

    def tokens(phrase: str) -> list[int]:
        return tokenizer(text_target=phrase, add_special_tokens=False)["input_ids"]

    return LexicalConstraints.from_token_ids([tokens(p) for p in include], [tokens(p) for p in avoid])


class Engine:
    """What every engine shares: tokens per sentence, and translating a batch within §6.1-style length limits."""

    name = "torch"
    can_align = False  # whether `decode(alignments=True)` can give word alignments
    tokenizer = None
    max_new_tokens = 256
    length_penalty_style: str | None = None  # None: the generation config's

    def token_count(self, sentence: str) -> int:
        return len(self.tokenizer(sentence, truncation=True)["input_ids"])

    def translate(
        self, sentences: list[str], n_best: int = 1, scores: bool = False, sampling: Sampling | None = None,
        prefixes: list[str] | None = None, constraints: list[LexicalConstraints | None] | None = None,
        alignments: bool = False,
    ) -> list[list[Hypothesis]]:  # fmt: skip
        """The `n_best` hypotheses of each sentence. Each batch stops at --max_new_tokens or twice its longest
        source + 10 tokens (Marian's and fairseq's limits), so an untrained model does not run to the full length
        for every sentence."""
        longest = max(self.token_count(sentence) for sentence in sentences)
        limit = min(self.max_new_tokens, 2 * longest + 10)
        constraint_tokens = [c.token_count for c in constraints or () if c]
        if constraint_tokens:  # room for every constraint token
            limit = max(limit, min(self.max_new_tokens, 2 * max(constraint_tokens) + longest))
        return self.decode(sentences, max_new_tokens=limit, n_best=n_best, scores=scores, sampling=sampling,
                           prefixes=prefixes, constraints=constraints, alignments=alignments)  # fmt: skip

    def decode(
        self, sentences: list[str], num_beams: int | None = None, max_new_tokens: int | None = None, n_best: int = 1,
        scores: bool = False, sampling: Sampling | None = None, prefixes: list[str] | None = None,
        constraints: list[LexicalConstraints | None] | None = None, alignments: bool = False,
    ) -> list[list[Hypothesis]]:  # fmt: skip
        """The `n_best` hypotheses of each sentence, best first, each decoded as it decodes alone (every row stops at
        `max_new_tokens` new tokens, not at a limit that depends on the other rows); with `sampling`, `n_best`
        samples of each; with `prefixes`, each translation continues its prefix ("" for none; the prefix's tokens
        are part of the hypothesis), and rows whose prefixes have as many tokens decode together; with `constraints`
        (one `LexicalConstraints` or None per sentence), translations that meet them (torch and onnx engines); with
        `alignments`, each hypothesis's word alignment (`Hypothesis.alignment`: torch and ctranslate2 engines)."""
        if alignments and not self.can_align:
            raise TranslationError(f"--alignments: the {self.name} engine gives no cross-attention to align with.")
        prefix_ids = self.prefix_ids(prefixes)
        if constraints is not None and not any(constraints):
            constraints = None
        if prefix_ids is None:
            return self._decode(sentences, num_beams, max_new_tokens, n_best, scores, sampling,
                                constraints=constraints, alignments=alignments)  # fmt: skip
        found: list[list[Hypothesis]] = [[] for _ in sentences]
        for length in sorted(set(map(len, prefix_ids))):
            rows = [row for row, ids in enumerate(prefix_ids) if len(ids) == length]
            group = self._decode([sentences[row] for row in rows], num_beams, max_new_tokens, n_best, scores,
                                 sampling, [prefix_ids[row] for row in rows] if length else None,
                                 [constraints[row] for row in rows] if constraints else None,
                                 alignments)  # fmt: skip
            for row, hypotheses in zip(rows, group, strict=True):
                found[row] = hypotheses
        return found

    def _decode(self, sentences: list[str], num_beams: int | None, max_new_tokens: int | None, n_best: int,
                scores: bool, sampling: Sampling | None, prefix_ids: list[list[int]] | None = None,
                constraints: list[LexicalConstraints | None] | None = None,
                alignments: bool = False):  # fmt: skip
        """One batch whose prefixes (if any) have the same number of tokens."""
        raise NotImplementedError

    def lexical_constraints(self, include: list[str], avoid: list[str]) -> LexicalConstraints:
        """Phrases as the target tokens the model generates (no end token)."""
        return lexical_constraints(self.tokenizer, include, avoid)

    def prefix_ids(self, prefixes: list[str] | None) -> list[list[int]] | None:
        """The target tokens of each prefix, without an end token; None when no sentence has one."""
        if not prefixes or not any(prefixes):
            return None
        return [self.tokenizer(text_target=prefix, add_special_tokens=False)["input_ids"] if prefix else []
                for prefix in prefixes]  # fmt: skip


class TorchEngine(Engine):
    """transformers' `generate()` on a PyTorch model; alignments from its cross-attention under teacher forcing
    (`alignment.align`, with `alignment_layer` and `alignment_head`; an ensemble aligns with its first model)."""

    can_align = True
    alignment_layer: int | None = None
    alignment_head: int | None = None

    def __init__(self, model, tokenizer, num_beams: int | None = None, max_new_tokens: int = 256):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.num_beams = num_beams or model.generation_config.num_beams or 1
        self.max_new_tokens = max_new_tokens
        self.setting = str(model.dtype).removeprefix("torch.")

    @classmethod
    def load(
        cls, model_dir: str | list[str], quantization: str | None, device: str, dtype: str, **options
    ) -> "TorchEngine":
        """The model on `device`, `optimize_for_inference`d: with `quantization="auto"` (and `compile=None`, also
        "auto") the setting measured fastest on this machine for `batch_size` sentences and the beam size. A
        `dtype` other than float32 is the user's choice of precision: "auto" then leaves it as it is. With
        `batch_invariant=True`, a sentence decodes to the same tokens in any batch (int8: row-wise kernels).
        Several folders make an ensemble (`EnsembleForConditionalGeneration`, uncompiled members): their tokenizers
        must have one vocabulary."""
        model_dirs = [model_dir] if isinstance(model_dir, str) else list(model_dir)
        compile_step = options.pop("compile", None)
        batch_size = options.pop("batch_size", 1)
        batch_invariant = options.pop("batch_invariant", False)
        tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
        for other in model_dirs[1:]:
            if AutoTokenizer.from_pretrained(other).get_vocab() != tokenizer.get_vocab():
                raise TranslationError(f"--model {other}: its tokenizer's vocabulary differs from --model "
                                       f"{model_dirs[0]}'s; ensemble members must share one.")  # fmt: skip
        if quantization == "auto" and dtype != "float32":
            quantization = None
        compile_step = "auto" if compile_step is None else compile_step
        if len(model_dirs) > 1:
            compile_step = False  # compiled static-cache steps are one model's; an ensemble steps its members
        num_beams = options.get("num_beams")
        models = []
        for folder in model_dirs:
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=DTYPES[dtype]).to(device)
            models.append(
                optimize_for_inference(model, quantization, compile_step, batch_size, num_beams, batch_invariant)
            )
        model = models[0]
        if len(models) > 1:
            try:
                model = EnsembleForConditionalGeneration(models)
            except ValueError as error:
                raise TranslationError(f"--model: {error}") from None
        engine = cls(model, tokenizer, **options)
        quantized = getattr(models[0].config, "quantization_config", None) is not None
        engine.setting = ("int8" if quantized else engine.setting) + (" + compile" if model_is_compiled(model) else "")
        if len(models) > 1:
            engine.setting = f"ensemble of {len(models)}, {engine.setting}"
        return engine

    def _decode(self, sentences: list[str], num_beams: int | None, max_new_tokens: int | None, n_best: int,
                scores: bool, sampling: Sampling | None, prefix_ids: list[list[int]] | None = None,
                constraints: list[LexicalConstraints | None] | None = None,
                alignments: bool = False):  # fmt: skip
        """`generate()` over one batch; prefixes go in as `decoder_input_ids` after the decoder start token, and
        constraints switch beam search to the constrained search."""
        batch = self.tokenizer(sentences, return_tensors="pt", padding=True, truncation=True).to(self.model.device)
        num_beams = 1 if sampling else num_beams or self.num_beams
        options = sampling.generate_options() if sampling else {}
        if self.length_penalty_style and num_beams > 1:
            options["length_penalty_style"] = self.length_penalty_style
        if prefix_ids is not None:  # the rows' prefixes have as many tokens (Engine.decode)
            start = self.model.generation_config.decoder_start_token_id
            if start is None:
                start = self.model.config.decoder_start_token_id
            prefix = torch.tensor([[start, *ids] for ids in prefix_ids], device=self.model.device)
            options["decoder_input_ids"] = prefix
        if constraints:
            options["constraints"] = constraints
        with torch.inference_mode():
            # max_length=None: a `max_length` saved in the generation config must not clash with the limit
            output = self.model.generate(
                **batch, num_beams=num_beams, num_return_sequences=n_best, max_new_tokens=max_new_tokens or
                self.max_new_tokens, max_length=None, return_dict_in_generate=True, output_scores=scores, **options,
            )  # fmt: skip
        texts = [text.strip() for text in self.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
        values = [None] * len(texts)
        if scores and num_beams > 1:
            values = output.sequences_scores.tolist()
        elif scores:  # greedy: the chosen tokens' log-probabilities, summed (padding after the end adds 0)
            steps = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
            values = steps.masked_fill(steps.isinf(), 0.0).sum(dim=1).tolist()
        token_ids = [without_padding(row[1:], self.tokenizer.pad_token_id) for row in output.sequences.tolist()]
        links = [None] * len(texts)
        if alignments:
            sources = [sentence for sentence in sentences for _ in range(n_best)]
            links = [tuple(pairs) for pairs in align(self.aligner, self.tokenizer, sources, token_ids,
                                                     self.alignment_layer, self.alignment_head)]  # fmt: skip
        hypotheses = [Hypothesis(*fields) for fields in zip(texts, values, token_ids, links, strict=True)]
        return [hypotheses[row * n_best : (row + 1) * n_best] for row in range(len(sentences))]

    @property
    def aligner(self):
        return getattr(self.model, "members", [self.model])[0]


class CTranslate2Engine(Engine):
    """A CTranslate2 `Translator` over the exported model, fed the tokenizer's tokens, with the beam size and length
    penalty of the model's generation config (α = 0.6 in the paper's), as `generate()` uses them."""

    name = "ctranslate2"
    can_align = True  # from the attention `return_attention` gives: the layer and heads chosen at export

    def __init__(self, translator, tokenizer, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0):
        self.translator, self.tokenizer = translator, tokenizer
        self.num_beams, self.max_new_tokens, self.length_penalty = num_beams, max_new_tokens, length_penalty

    @classmethod
    def load(cls, model_dir: str, quantization: str | None, device: str, dtype: str, **options) -> "CTranslate2Engine":
        """The engine over a CTranslate2 folder, or over an hf_attention model exported to a temporary folder that
        is deleted once the translator and tokenizer have read it."""
        import_ctranslate2()
        if (Path(model_dir) / "model.bin").is_file():
            return cls._from_exported(Path(model_dir), quantization, device, **options)
        with tempfile.TemporaryDirectory(prefix="hf_attention-ct2-") as temporary:
            folder = Path(temporary) / "model"
            export_ctranslate2(model_dir, folder)
            return cls._from_exported(folder, quantization, device, **options)

    @classmethod
    def _from_exported(cls, folder: Path, quantization: str | None, device: str, **options) -> "CTranslate2Engine":
        ctranslate2 = import_ctranslate2()
        if (folder / "generation_config.json").is_file():  # export_ctranslate2 copies the model's
            generation_config = GenerationConfig.from_pretrained(folder)
        else:
            generation_config = GenerationConfig(num_beams=4)
        if getattr(generation_config, "length_penalty_style", None) == "gnmt":
            logger.warning("CTranslate2 divides beam scores by length^α: the model's GNMT length penalty "
                           "(length_penalty_style='gnmt') is not available in this engine.")  # fmt: skip
        translator = ctranslate2.Translator(
            str(folder), device=device, compute_type=quantization or "default", intra_threads=torch.get_num_threads()
        )
        options.pop("batch_size", None)
        return cls(
            translator,
            AutoTokenizer.from_pretrained(folder),
            num_beams=options.get("num_beams") or generation_config.num_beams or 1,
            max_new_tokens=options.get("max_new_tokens", 256),
            length_penalty=generation_config.length_penalty if generation_config.length_penalty is not None else 1.0,
        )

    def _decode(self, sentences: list[str], num_beams: int | None, max_new_tokens: int | None, n_best: int,
                scores: bool, sampling: Sampling | None, prefix_ids: list[list[int]] | None = None,
                constraints: list[LexicalConstraints | None] | None = None,
                alignments: bool = False):  # fmt: skip
        """CTranslate2's `translate_batch`, with its scores when asked for; it samples with top-k, top-p and
        temperature (no epsilon), and counts a prefix's tokens in its length limit. It has no lexical constraints."""
        if constraints:
            raise TranslationError("--constraints: CTranslate2 has no lexically constrained search; use the torch "
                                   "engine.")  # fmt: skip
        encoding = self.tokenizer(sentences, truncation=True)
        ids = encoding["input_ids"]
        tokens = [self.tokenizer.convert_ids_to_tokens(row) for row in ids]
        options = {"beam_size": num_beams or self.num_beams}
        if sampling:
            options = {"beam_size": 1, "sampling_topk": sampling.top_k or 0, "sampling_topp": sampling.top_p or 1.0,
                       "sampling_temperature": sampling.temperature or 1.0}  # fmt: skip
        extra = 0
        if prefix_ids is not None:  # the rows' prefixes have as many tokens (Engine.decode)
            options["target_prefix"] = [self.tokenizer.convert_ids_to_tokens(ids) for ids in prefix_ids]
            extra = len(prefix_ids[0])
        # CTranslate2 (4.x) returns misplaced attention for the shorter sources of a padded batch in beam search
        # (measured: rows off by up to 0.56 against the same sentence alone): align sentence by sentence there.
        one_by_one = alignments and options["beam_size"] > 1
        results = self.translator.translate_batch(
            tokens, max_decoding_length=(max_new_tokens or self.max_new_tokens) + extra,
            max_batch_size=1 if one_by_one else len(tokens),
            length_penalty=self.length_penalty, num_hypotheses=n_best, return_scores=scores,
            return_attention=alignments, **options,
        )  # fmt: skip
        decoded = []
        for row, result in enumerate(results):
            outputs = [self.tokenizer.convert_tokens_to_ids(hypothesis) for hypothesis in result.hypotheses]
            texts = [text.strip() for text in self.tokenizer.batch_decode(outputs, skip_special_tokens=True)]
            values = result.scores if scores else [None] * len(texts)
            links = [None] * len(texts)
            if alignments:
                special = set(self.tokenizer.all_special_ids)
                links = [tuple(links_from_attention(attention, ids[row], encoding.word_ids(row), hypothesis,
                                                    target_word_ids(self.tokenizer, hypothesis), special))
                         for hypothesis, attention in zip(outputs, result.attention, strict=True)]  # fmt: skip
            decoded.append([Hypothesis(text, value, (), link) for text, value, link in zip(texts, values, links,
                                                                                         strict=True)])  # fmt: skip
        return decoded


class OnnxEngine(TorchEngine):
    """transformers' `generate()` over the graphs of `export_onnx`, run by onnxruntime (`OnnxModelForSeq2SeqLM`)."""

    name = "onnx"
    can_align = False  # the graphs return no attention weights

    @classmethod
    def load(cls, model_dir: str, quantization: str | None, device: str, dtype: str, **options) -> "OnnxEngine":
        """The engine over an `export_onnx` folder, or over an hf_attention model exported to a temporary folder
        that is deleted once onnxruntime's sessions and the tokenizer have read it."""
        from .onnx_export import export_onnx

        if (Path(model_dir) / "encoder.onnx").is_file():
            return cls._from_exported(Path(model_dir), device, **options)
        with tempfile.TemporaryDirectory(prefix="hf_attention-onnx-") as temporary:
            folder = Path(temporary) / "model"
            export_onnx(model_dir, folder)
            return cls._from_exported(folder, device, **options)

    @classmethod
    def _from_exported(cls, folder: Path, device: str, **options) -> "OnnxEngine":
        from .onnx_export import OnnxModelForSeq2SeqLM

        providers = ["CUDAExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        model = OnnxModelForSeq2SeqLM.from_pretrained(folder, providers=providers)
        return cls(model, AutoTokenizer.from_pretrained(folder), **options)


def without_padding(ids: list[int], pad_token_id: int | None) -> tuple[int, ...]:
    """`ids` without the padding that follows a sequence which ended before the longest of its batch."""
    end = len(ids)
    while end and ids[end - 1] == pad_token_id:
        end -= 1
    return tuple(ids[:end])


def check_engine_options(engine: str, quantization: str | None = None, device: str = "cpu", dtype: str = "float32",
                         compile_step: bool | None = None) -> None:  # fmt: skip
    """Refuses an engine setting this machine cannot run, before anything is loaded or written.

    Raises:
        TranslationError: an unknown engine, quantization or dtype, a device this machine does not have, or
            `--compile` for an engine other than torch.
    """
    if engine not in ENGINES:
        raise TranslationError(f"--engine {engine}: must be one of {', '.join(ENGINES)}.")
    if engine == "torch" and quantization not in (*TORCH_QUANTIZATIONS, "auto"):
        raise TranslationError(f"--quantization {quantization}: the torch engine offers auto, int8 and bf16.")
    if engine == "ctranslate2" and quantization not in (*CTRANSLATE2_QUANTIZATIONS, "auto"):
        offered = ", ".join(name for name in ("auto", *CTRANSLATE2_QUANTIZATIONS) if name)
        raise TranslationError(f"--quantization {quantization}: the ctranslate2 engine offers {offered}.")
    if engine == "onnx" and quantization not in (None, "auto"):
        raise TranslationError(f"--quantization {quantization}: the onnx engine runs the exported float32 graphs.")
    if dtype not in DTYPES:
        raise TranslationError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TranslationError(f"--device {device}: this machine has no CUDA device.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise TranslationError(f"--device {device}: must be cpu or cuda.")
    if compile_step and engine != "torch":
        raise TranslationError(f"--compile: compiles the torch engine's decoding step, not {engine}'s.")


def load_engine(engine: str, model: str | list[str], quantization: str | None = None, device: str = "cpu",
                dtype: str = "float32", **options):  # fmt: skip
    """The engine, after every option is checked (`check_engine_options`); several models (torch engine) decode as
    an ensemble.

    Raises:
        TranslationError: an option this machine cannot run.
        ExportError: the engine's optional package is missing (the extra to install is named).
    """
    check_engine_options(engine, quantization, device, dtype, options.get("compile"))
    if not isinstance(model, str) and len(model) == 1:
        model = model[0]
    if not isinstance(model, str) and engine != "torch":
        raise TranslationError(f"--model: {len(model)} models make an ensemble, which the torch engine decodes; "
                               f"{engine} runs one model.")  # fmt: skip
    length_penalty_style = options.pop("length_penalty_style", None)
    if length_penalty_style not in (None, *LENGTH_PENALTY_STYLES):
        raise TranslationError(f"--length_penalty_style {length_penalty_style}: must be one of "
                               f"{', '.join(LENGTH_PENALTY_STYLES)}.")  # fmt: skip
    if engine == "ctranslate2" and length_penalty_style == "gnmt":
        raise TranslationError("--length_penalty_style gnmt: CTranslate2 divides by length^α only; use the torch or "
                               "onnx engine for GNMT's penalty.")  # fmt: skip
    if engine != "torch":
        options.pop("compile", None)
        options.pop("batch_invariant", None)  # a torch option: CTranslate2 and onnxruntime choose their kernels
    if engine == "onnx":
        options.pop("batch_size", None)
    loader = {"torch": TorchEngine, "ctranslate2": CTranslate2Engine, "onnx": OnnxEngine}[engine]
    loaded = loader.load(model, quantization, device, dtype, **options)
    loaded.length_penalty_style = length_penalty_style
    return loaded
