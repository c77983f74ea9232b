"""Translating a file: `scripts/translate.py --model M --input FILE --output FILE` (console `hf-attention-translate`).

Sentences are sorted by length and cut into batches (`--batch_size` sentences, or `--max_tokens` padded tokens), so a
batch wastes little on padding; the translations are written in input order. Engines:

- `torch`: the model and transformers' `generate()`, optionally `optimize_for_inference`d (`--quantization int8`
  or `bf16`), on `--device` in `--dtype`;
- `ctranslate2`: the model exported with `export_ctranslate2` (done on the fly for an hf_attention folder), with
  CTranslate2's weight type `--quantization` (`int8`, `float32`, ...);
- `onnx`: the graphs of `export_onnx` (exported on the fly likewise) run by onnxruntime, under transformers'
  `generate()` (`OnnxModelForSeq2SeqLM`).

`scripts/evaluate_model.py` translates through the same path.
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig, HfArgumentParser

from .. import hardware
from ..data.batching import cut_into_batches
from .ctranslate2_export import QUANTIZATIONS as CTRANSLATE2_QUANTIZATIONS
from .ctranslate2_export import export_ctranslate2, import_ctranslate2
from .errors import ExportError
from .quantization import QUANTIZATIONS as TORCH_QUANTIZATIONS
from .quantization import model_is_compiled, optimize_for_inference

ENGINES = ("torch", "ctranslate2", "onnx")
# With --compile left to "auto", files shorter than this decode uncompiled: compiling a step takes 20-40 s, longer than
# decoding a short file takes (Multi30k's 1,000 test sentences, beam 4: 12-14 s in every engine).
COMPILE_FROM_SENTENCES = 1000
DTYPES = hardware.DTYPES


class TranslationError(ValueError):
    """Bad input to the translate command, named in one line."""


@dataclass(frozen=True)
class Hypothesis:
    """One translation of a sentence and, when asked for, its score: the log-probability beam search ranks by (the
    sum of the tokens' log-probabilities divided by length ** length_penalty; greedy decoding: the plain sum)."""

    text: str
    score: float | None = None


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices of the sentences, longest first, in batches of at most `batch_size` sentences, or (with `max_tokens`)
    of at most `max_tokens` padded tokens (sentences × the longest): `data.batching.cut_into_batches`."""
    if max_tokens:
        return cut_into_batches(lengths, max_tokens, longest_first=True)
    return cut_into_batches(lengths, None, max_rows=batch_size, longest_first=True)


def read_lines(path: str) -> list[str]:
    """The lines of `path` (`-`: standard input), without their line ends.

    Raises:
        TranslationError: the file is missing, or a line is not UTF-8 (its number named).
    """
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise TranslationError(f"--input {path}: {error.strerror or error}.") from None
    lines = data.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TranslationError(
                f"--input {path}: line {number} is not UTF-8 (byte {line[error.start]:#04x} at column "
                f"{error.start + 1})."
            ) from None
    return [line.decode("utf-8") for line in lines]


class TorchEngine:
    """transformers' `generate()` on a PyTorch model."""

    def __init__(self, model, tokenizer, num_beams: int | None = None, max_new_tokens: int = 256):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.num_beams = num_beams or model.generation_config.num_beams or 1
        self.max_new_tokens = max_new_tokens
        self.setting = str(model.dtype).removeprefix("torch.")

    @classmethod
    def load(cls, model_dir: str, quantization: str | None, device: str, dtype: str, **options) -> "TorchEngine":
        """The model on `device`, `optimize_for_inference`d: with `quantization="auto"` (and `compile=None`, also
        "auto") the setting measured fastest on this machine for `batch_size` sentences and the beam size. A
        `dtype` other than float32 is the user's choice of precision: "auto" then leaves it as it is."""
        compile_step = options.pop("compile", None)
        batch_size = options.pop("batch_size", 1)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device)
        if quantization == "auto" and dtype != "float32":
            quantization = None
        compile_step = "auto" if compile_step is None else compile_step
        num_beams = options.get("num_beams")
        model = optimize_for_inference(model, quantization, compile_step, batch_size, num_beams)
        engine = cls(model, AutoTokenizer.from_pretrained(model_dir), **options)
        quantized = getattr(model.config, "quantization_config", None) is not None
        engine.setting = ("int8" if quantized else engine.setting) + (" + compile" if model_is_compiled(model) else "")
        return engine

    def token_count(self, sentence: str) -> int:
        return len(self.tokenizer(sentence, truncation=True)["input_ids"])

    def translate(self, sentences: list[str]) -> list[str]:
        # Each batch stops at --max_new_tokens or twice its longest source + 10 tokens (Marian's and fairseq's
        # limits), so an untrained model does not run to the full length for every sentence.
        longest = max(self.token_count(sentence) for sentence in sentences)
        limit = min(self.max_new_tokens, 2 * longest + 10)
        return [best.text for best, *_ in self.decode(sentences, max_new_tokens=limit)]

    def decode(self, sentences: list[str], num_beams: int | None = None, max_new_tokens: int | None = None,
               n_best: int = 1, scores: bool = False) -> list[list[Hypothesis]]:  # fmt: skip
        """The `n_best` best hypotheses of each sentence, best first, each decoded as `generate()` decodes it alone
        (every row of a batch stops at `max_new_tokens`, not at a limit that depends on the other rows)."""
        batch = self.tokenizer(sentences, return_tensors="pt", padding=True, truncation=True).to(self.model.device)
        num_beams = num_beams or self.num_beams
        with torch.inference_mode():
            # max_length=None: a `max_length` saved in the generation config must not clash with the limit
            output = self.model.generate(
                **batch, num_beams=num_beams, num_return_sequences=n_best, max_new_tokens=max_new_tokens or
                self.max_new_tokens, max_length=None, return_dict_in_generate=True, output_scores=scores,
            )  # fmt: skip
        texts = [text.strip() for text in self.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
        values = [None] * len(texts)
        if scores and num_beams > 1:
            values = output.sequences_scores.tolist()
        elif scores:  # greedy: the chosen tokens' log-probabilities, summed (padding after the end adds 0)
            steps = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
            values = steps.masked_fill(steps.isinf(), 0.0).sum(dim=1).tolist()
        hypotheses = [Hypothesis(text, value) for text, value in zip(texts, values, strict=True)]
        return [hypotheses[row * n_best : (row + 1) * n_best] for row in range(len(sentences))]


class CTranslate2Engine:
    """A CTranslate2 `Translator` over the exported model, fed the tokenizer's tokens, with the beam size and length
    penalty of the model's generation config (α = 0.6 in the paper's), as `generate()` uses them."""

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
        translator = ctranslate2.Translator(
            str(folder), device=device, compute_type=quantization or "default", intra_threads=torch.get_num_threads()
        )
        options.pop("batch_size", None)
        return cls(
            translator,
            AutoTokenizer.from_pretrained(folder),
            num_beams=options.get("num_beams") or generation_config.num_beams,
            max_new_tokens=options.get("max_new_tokens", 256),
            length_penalty=generation_config.length_penalty if generation_config.length_penalty is not None else 1.0,
        )

    def token_count(self, sentence: str) -> int:
        return len(self.tokenizer(sentence, truncation=True)["input_ids"])

    def translate(self, sentences: list[str]) -> list[str]:
        longest = max(self.token_count(sentence) for sentence in sentences)
        limit = min(self.max_new_tokens, 2 * longest + 10)
        return [best.text for best, *_ in self.decode(sentences, max_new_tokens=limit)]

    def decode(self, sentences: list[str], num_beams: int | None = None, max_new_tokens: int | None = None,
               n_best: int = 1, scores: bool = False) -> list[list[Hypothesis]]:  # fmt: skip
        """The `n_best` best hypotheses of each sentence, best first, with CTranslate2's scores when asked for."""
        ids = self.tokenizer(sentences, truncation=True)["input_ids"]
        tokens = [self.tokenizer.convert_ids_to_tokens(row) for row in ids]
        results = self.translator.translate_batch(
            tokens, beam_size=num_beams or self.num_beams, max_decoding_length=max_new_tokens or self.max_new_tokens,
            max_batch_size=len(tokens), length_penalty=self.length_penalty, num_hypotheses=n_best,
            return_scores=scores,
        )  # fmt: skip
        decoded = []
        for result in results:
            outputs = [self.tokenizer.convert_tokens_to_ids(hypothesis) for hypothesis in result.hypotheses]
            texts = [text.strip() for text in self.tokenizer.batch_decode(outputs, skip_special_tokens=True)]
            values = result.scores if scores else [None] * len(texts)
            decoded.append([Hypothesis(text, value) for text, value in zip(texts, values, strict=True)])
        return decoded


class OnnxEngine(TorchEngine):
    """transformers' `generate()` over the graphs of `export_onnx`, run by onnxruntime (`OnnxModelForSeq2SeqLM`)."""

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


def translate_sentences(
    engine, sentences: list[str], batch_size: int = 32, max_tokens: int | None = None, progress: bool = False
) -> list[str]:
    """Translations of `sentences`, in their order, from length-sorted batches."""
    translations = [""] * len(sentences)
    lengths = [engine.token_count(sentence) for sentence in sentences] if max_tokens else [len(s) for s in sentences]
    with tqdm(total=len(sentences), disable=not progress, unit="sentence", file=sys.stderr) as bar:
        for batch in length_sorted_batches(lengths, batch_size, max_tokens):
            for index, text in zip(batch, engine.translate([sentences[i] for i in batch]), strict=True):
                translations[index] = text
            bar.update(len(batch))
    return translations


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


def load_engine(engine: str, model: str, quantization: str | None = None, device: str = "cpu",
                dtype: str = "float32", **options):  # fmt: skip
    """The engine, after every option is checked (`check_engine_options`).

    Raises:
        TranslationError: an option this machine cannot run.
        ExportError: the engine's optional package is missing (the extra to install is named).
    """
    check_engine_options(engine, quantization, device, dtype, options.get("compile"))
    if engine != "torch":
        options.pop("compile", None)
    if engine == "onnx":
        options.pop("batch_size", None)
    loader = {"torch": TorchEngine, "ctranslate2": CTranslate2Engine, "onnx": OnnxEngine}[engine]
    return loader.load(model, quantization, device, dtype, **options)


@dataclass
class TranslateArguments:
    model: str = field(metadata={"help": "An hf_attention model folder or Hub id (or, for ctranslate2, an export)."})
    input: str = field(default="-", metadata={"help": "Source sentences, one per line (UTF-8); - for stdin."})
    output: str = field(default="-", metadata={"help": "Where the translations go, one per line; - for stdout."})
    engine: str = field(default="torch", metadata={"help": f"Inference engine: {', '.join(ENGINES)}."})
    quantization: str | None = field(
        default="auto",
        metadata={
            "help": "auto: the fastest measured for this machine and workload (torch: hf_attention.hardware's choice; "
            "ctranslate2: its own 'auto'); torch: int8 or bf16 (optimize_for_inference); ctranslate2: int8, "
            "float32, ...; none: the weights as saved."
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": f"torch engine: {', '.join(DTYPES)}."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per batch."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Padded source tokens per batch, in place of --batch_size."}
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beam size (default: the model's; 4 with ctranslate2)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest translation, in tokens."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
    compile: bool | None = field(
        default=None,
        metadata={
            "help": "torch engine: decode with a static cache and a compiled step (optimize_for_inference); "
            "default: as --quantization auto chooses for this machine."
        },
    )


def write_atomically(path: str, text: str) -> None:
    """`text` into `path`, which appears whole or not at all (and may be the input file)."""
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    staging = target.with_name(f".{target.name}.writing")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, target)


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(TranslateArguments).parse_args_into_dataclasses(args=argv)
    try:
        for name in ("batch_size", "max_tokens", "num_beams", "max_new_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise TranslationError(f"--{name} {value}: must be a positive integer.")
        if args.output != "-" and not Path(args.output).parent.is_dir():
            raise TranslationError(f"--output {args.output}: its folder does not exist.")
        sentences = read_lines(args.input)
        quantization = None if (args.quantization or "none").lower() == "none" else args.quantization
        # compiling takes tens of seconds: "auto" compiles only for files long enough to gain that back
        compile_step = args.compile
        if compile_step is None and len(sentences) < COMPILE_FROM_SENTENCES:
            compile_step = False
        print(hardware.describe(), file=sys.stderr)
        engine = load_engine(args.engine, args.model, quantization, args.device, args.dtype,
                             num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             compile=compile_step, batch_size=args.batch_size)  # fmt: skip
        started = time.perf_counter()
        translations = translate_sentences(engine, sentences, args.batch_size, args.max_tokens, args.progress)
        seconds = time.perf_counter() - started
    except (ExportError, OSError, TranslationError) as error:
        sys.exit(f"error: {error}")
    write_atomically(args.output, "".join(f"{line}\n" for line in translations))
    words = sum(len(line.split()) for line in translations)
    print(f"translated {len(sentences)} sentences ({words} words) in {seconds:.1f} s: "
          f"{len(sentences) / max(seconds, 1e-9):.1f} sentences/s, {words / max(seconds, 1e-9):.0f} words/s "
          f"({args.engine}, {getattr(engine, 'setting', quantization or args.dtype)}, {args.device})",
          file=sys.stderr)  # fmt: skip
