"""The server's flags (`hf-attention-serve --help`), each checked here, before a model is loaded or a port taken."""

import typing
from dataclasses import dataclass, field, fields

from ..configuration_hf_attention import require_positive_integers
from ..inference.engines import ENGINES, check_engine_options
from ..inference.errors import TranslationError


class ServeArgumentError(ValueError):
    """A flag the server cannot run with, named in one line."""


@dataclass
class ServeArguments:
    model: str = field(
        metadata={"help": "An hf_attention model folder or Hub id, or (engine ctranslate2 / onnx) an export of one."}
    )
    ensemble_with: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More models (torch engine, same vocabulary) that decode with MODEL as an ensemble, averaging "
            "their log-probabilities at every step."
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on; 0: a free one (the log line names it)."})
    engine: str = field(default="torch", metadata={"help": f"Inference engine: {', '.join(ENGINES)}."})
    quantization: str | None = field(
        default="auto",
        metadata={"help": "As scripts/translate.py: auto (the fastest measured here), int8, bf16, ... none."},
    )
    compile: bool | None = field(
        default=False,
        metadata={"help": "torch engine: decode with a compiled static-cache step (tens of seconds at start-up)."},
    )
    batch_invariant: bool = field(
        default=True,
        metadata={
            "help": "torch engine, int8: quantise each sentence's activations with their own scales, so that a "
            "request gets exactly the translation it gets alone; false: fbgemm's faster batch-wide scales."
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "torch engine: float32, bfloat16 or float16."})
    num_beams: int | None = field(default=None, metadata={"help": "Default beam size (default: the model's)."})
    max_new_tokens: int = field(
        default=256, metadata={"help": "Default and largest max_new_tokens a request may ask for."}
    )
    max_wait_ms: float = field(
        default=5.0,
        metadata={
            "help": "How long a free decoder waits for one more request before it starts a batch (each "
            "arrival restarts the wait, 4x this at most); 0: no waiting."
        },
    )
    max_batch_tokens: int = field(
        default=4096, metadata={"help": "Padded source tokens per batch; a longer sentence is refused (422)."}
    )
    max_batch_sentences: int = field(default=64, metadata={"help": "Sentences per batch (1: no batching)."})
    max_queue: int = field(
        default=1024, metadata={"help": "Sentences that may wait; past that a request is answered 503."}
    )
    max_request_sentences: int = field(default=256, metadata={"help": "Sentences one request may carry."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "The name /v1/models and answers give (default: the model's)."}
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn's: critical, error, warning, info, debug."})

    def __post_init__(self):
        positive = ("max_new_tokens", "max_batch_tokens", "max_batch_sentences", "max_queue", "max_request_sentences")
        require_positive_integers(
            {f"--{name}": getattr(self, name) for name in (*positive, "num_beams")}, ServeArgumentError
        )
        if self.max_wait_ms < 0:
            raise ServeArgumentError(f"--max_wait_ms {self.max_wait_ms}: must be 0 or more.")
        if not 0 <= self.port <= 65535:
            raise ServeArgumentError(f"--port {self.port}: must be between 0 and 65535.")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ServeArgumentError(f"--log_level {self.log_level}: must be critical, error, warning, info or debug.")
        if self.ensemble_with and self.engine != "torch":
            raise ServeArgumentError(f"--ensemble_with: an ensemble decodes with the torch engine, not {self.engine}.")
        if self.ensemble_with and self.compile:
            raise ServeArgumentError("--ensemble_with: ensemble members decode uncompiled; leave --compile out.")
        if (self.quantization or "none").lower() == "none":
            self.quantization = None
        try:
            check_engine_options(self.engine, self.quantization, self.device, self.dtype, self.compile)
        except TranslationError as error:
            raise ServeArgumentError(str(error)) from None

    @classmethod
    def from_dict(cls, values: dict) -> "ServeArguments":
        """The arguments from `name=value` strings (Ray Serve's `serve run ... model=M max_wait_ms=5`), converted to
        each field's type.

        Raises:
            ServeArgumentError: an unknown name or a value of the wrong type.
        """
        # the annotations, not `fields(cls)[i].type`, which HfArgumentParser rewrites (int | None becomes int)
        types = {spec.name: typing.get_type_hints(cls)[spec.name] for spec in fields(cls)}
        converted = {}
        for name, value in values.items():
            if name not in types:
                raise ServeArgumentError(f"{name}: not an option of the server; options: {', '.join(types)}.")
            converted[name] = convert(name, value, types[name])
        return cls(**converted)


def convert(name: str, value, annotation):
    """`value` (a string from a command line, or already typed) as the field's type."""
    if not isinstance(value, str):
        return value
    if typing.get_origin(annotation) is list:  # Ray's `ensemble_with=a,b`
        return [part for part in value.split(",") if part]
    kinds = typing.get_args(annotation) or (annotation,)
    if value.lower() == "none" and type(None) in kinds:
        return None
    kind = next(kind for kind in kinds if kind is not type(None))
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise ServeArgumentError(f"{name}={value}: must be of type {kind.__name__}.") from None
