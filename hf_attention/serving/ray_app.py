"""The translation server as a Ray Serve deployment, for more replicas than one machine holds.

    serve run hf_attention.serving.ray_app:app model=MODEL num_replicas=2 max_wait_ms=5

`app(args)` is Ray Serve's application builder: every `name=value` of the server's flags (`ServeArguments`; `host`
and `port` are Ray's proxy's, `serve run --host/--port` or `serve.start(http_options=...)`) plus the deployment's:

- `num_replicas`: a number, or `auto` for autoscaling between `min_replicas` and `max_replicas` (defaults 1 and 4)
  aiming at `target_ongoing_requests` per replica (default: `max_batch_sentences`);
- `num_cpus`: CPUs each replica reserves (default 1; torch uses that many threads);
- `max_ongoing_requests`: requests a replica takes at once (default: 2 × `max_batch_sentences`; Ray's own default of
  5 would cap every batch at 5 sentences).

Each replica serves the same routes as `hf-attention-serve` (`create_app`), with Ray's `@serve.batch` in place of
our `DynamicBatcher`: the sentences of the requests a replica holds are decoded together, grouped by decoding options
and cut into length-sorted batches within `max_batch_tokens`. `/metrics` counts the replica that answers.
"""

import asyncio

from ray import serve
from ray.serve import Application

from ..data.batching import cut_into_batches
from .app import TranslationService, create_app
from .arguments import ServeArgumentError, ServeArguments
from .schema import DecodingOptions, Source

DEPLOYMENT_FLAGS = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus",
                    "max_ongoing_requests")  # fmt: skip


@serve.deployment(name="hf_attention_translator")
@serve.ingress()
class TranslatorDeployment:
    """One replica: the engine, loaded before the replica takes requests, behind `create_app`'s routes."""

    def __init__(self, arguments: dict):
        self.arguments = ServeArguments.from_dict(arguments)
        self.service = TranslationService(self.arguments)
        self.service.torch_thread.submit(self.service.load).result()  # where every batch decodes after it
        self.service.status = "ok"
        self.decode_sentences.set_max_batch_size(self.arguments.max_batch_sentences)
        self.decode_sentences.set_batch_wait_timeout_s(self.arguments.max_wait_ms / 1000)

    def __serve_build_asgi_app__(self):
        return create_app(self.arguments, service=self.service, submit=self.submit)

    async def submit(self, sentences: list[Source], lengths: list[int], options: DecodingOptions) -> list:
        return await asyncio.gather(*(self.decode_sentences((sentence, length, options))
                                      for sentence, length in zip(sentences, lengths, strict=True)))  # fmt: skip

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def decode_sentences(self, queued: list[tuple[Source, int, DecodingOptions]]) -> list:
        """Ray's batch of sentences: decoded by options, in length-sorted batches, off the replica's event loop."""
        found = [None] * len(queued)
        for options in dict.fromkeys(options for _, _, options in queued):
            positions = [i for i, (_, _, other) in enumerate(queued) if other == options]
            lengths = [queued[i][1] for i in positions]
            for batch in cut_into_batches(lengths, self.arguments.max_batch_tokens, longest_first=True):
                sentences = [queued[positions[i]][0] for i in batch]
                hypotheses = await self.service.on_torch_thread(self.service.decode, sentences, options)
                for i, result in zip(batch, hypotheses, strict=True):
                    found[positions[i]] = result
        return found


def deployment_options(flags: dict, max_batch_sentences: int) -> dict:
    """`serve.deployment` options from the deployment's flags (strings from `serve run`).

    Raises:
        ServeArgumentError: a value that is not a positive number (or `auto` for `num_replicas`).
    """

    def positive(name: str, default: str, kind=int):
        value = flags.get(name, default)
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = 0
        if number <= 0:
            raise ServeArgumentError(f"{name}={value}: must be a positive number.")
        return number

    options = {
        "ray_actor_options": {"num_cpus": positive("num_cpus", "1", float)},
        "max_ongoing_requests": positive("max_ongoing_requests", str(2 * max_batch_sentences)),
    }
    if str(flags.get("num_replicas", "1")).lower() == "auto":
        options["autoscaling_config"] = {
            "min_replicas": positive("min_replicas", "1"),
            "max_replicas": positive("max_replicas", "4"),
            "target_ongoing_requests": positive("target_ongoing_requests", str(max_batch_sentences)),
        }
    else:
        options["num_replicas"] = positive("num_replicas", "1")
    return options


def app(args: dict) -> Application:
    """The application `serve run hf_attention.serving.ray_app:app model=M ...` runs (see the module docstring).

    Raises:
        ServeArgumentError: an unknown flag or a bad value, named, before any replica starts.
    """
    flags = {name: value for name, value in args.items() if name in DEPLOYMENT_FLAGS}
    server_flags = {name: value for name, value in args.items() if name not in DEPLOYMENT_FLAGS}
    arguments = ServeArguments.from_dict(server_flags)  # checked here, on the driver
    options = deployment_options(flags, arguments.max_batch_sentences)
    return TranslatorDeployment.options(**options).bind(server_flags)
