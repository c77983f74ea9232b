"""The HTTP API (FastAPI): `POST /v1/translate`, `GET /health`, `GET /v1/models`, `GET /metrics`.

`create_app(arguments)` returns the ASGI app; `hf-attention-serve` (`server.py`) runs it under uvicorn and the Ray
Serve deployment (`ray_app.py`) mounts the same routes. The model loads on the service's torch thread once the app
starts, so `/health` answers 503 ("loading") until the model has loaded and translated a warm-up sentence, then 200.
"""

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..inference.alignment import format_alignment
from ..inference.engines import lexical_constraints, load_engine
from .arguments import ServeArguments
from .batching import DynamicBatcher, QueueFull, ShuttingDown
from .metrics import ServingMetrics
from .schema import (
    DecodingOptions,
    Hypothesis,
    Source,
    TranslateRequest,
    TranslateResponse,
    Translation,
    field_error,
)

logger = logging.getLogger("hf_attention.serving")

WARM_UP_SENTENCE = "Two dogs play in the snow."
RETRY_AFTER_SECONDS = "1"


class RequestError(ValueError):
    """A request the server refuses (422), with FastAPI-shaped `detail` entries naming each field."""

    def __init__(self, *errors: dict):
        super().__init__("; ".join(error["msg"] for error in errors))
        self.errors = list(errors)


class TranslationService:
    """The engine behind the routes: loads it, checks each request against the server's limits and answers it."""

    def __init__(self, arguments: ServeArguments, metrics: ServingMetrics | None = None):
        self.arguments = arguments
        self.metrics = metrics or ServingMetrics()
        self.engine = None
        self.tokenizer = None  # the requests' own copy of the engine's: see `load`
        self.status = "loading"  # then "ok", "failed" or "draining"
        self.failure: str | None = None
        self.model_name = arguments.served_model_name or model_name(arguments.model)
        # Every torch call of the server (loading, warm-up, each batch) runs on this one thread. OpenMP keeps a pool
        # of worker threads for each thread that starts parallel work; once two pools exist and their threads
        # outnumber the cores, libgomp stops spinning between parallel regions and sleeps instead: a sentence that
        # decoded in 0.26 s took 0.50 s, a batch of 32 1.30 s instead of 0.89 s (2-core Xeon).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_attention-torch")

    def on_torch_thread(self, function: Callable, *args) -> Awaitable:
        """`function(*args)` on the torch thread, awaited from the event loop (which keeps answering meanwhile)."""
        return asyncio.get_running_loop().run_in_executor(self.torch_thread, function, *args)

    def load(self) -> None:
        """Loads the engine and translates a warm-up sentence (compiling, where asked, happens here)."""
        arguments = self.arguments
        models = [arguments.model, *arguments.ensemble_with] if arguments.ensemble_with else arguments.model
        engine = load_engine(
            arguments.engine, models, arguments.quantization, arguments.device, arguments.dtype,
            num_beams=arguments.num_beams, max_new_tokens=arguments.max_new_tokens, compile=arguments.compile,
            batch_size=arguments.max_batch_sentences, batch_invariant=arguments.batch_invariant,
        )  # fmt: skip
        engine.decode([WARM_UP_SENTENCE], max_new_tokens=8)
        # Requests are checked on the event loop while a batch decodes on another thread. A fast tokenizer's padding
        # and truncation are settings of one shared Rust object: a call without padding there would switch off the
        # padding of the batch being encoded here. The requests get their own copy.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.engine = engine

    def options(self, body: TranslateRequest) -> DecodingOptions:
        num_beams = body.num_beams or self.engine.num_beams
        max_new_tokens = body.max_new_tokens or self.arguments.max_new_tokens
        errors = []
        if max_new_tokens > self.arguments.max_new_tokens:
            errors.append(field_error("max_new_tokens", f"{max_new_tokens}: more than this server's --max_new_tokens "
                                      f"{self.arguments.max_new_tokens}.", max_new_tokens))  # fmt: skip
        if body.alignments and self.arguments.engine == "onnx":
            errors.append(field_error("alignments", f"the {self.arguments.engine} engine gives no cross-attention; "
                                      "this server cannot align.", True))  # fmt: skip
        if body.n_best > num_beams:
            errors.append(field_error("n_best", f"{body.n_best}: more than num_beams {num_beams}; n_best hypotheses "
                                      "come from a beam at least as wide.", body.n_best))  # fmt: skip
        if errors:
            raise RequestError(*errors)
        return DecodingOptions(num_beams, max_new_tokens, body.n_best, body.return_scores, body.alignments)

    def sentences(self, body: TranslateRequest) -> tuple[list[Source], list[int]]:
        """The request's sentences (with their target prefixes) and their lengths in source tokens.

        Raises:
            RequestError: no sentence, too many, an empty one, one longer than a batch may be, or target prefixes
                that do not pair one to one with the sentences.
        """
        sentences = [body.text] if isinstance(body.text, str) else list(body.text)
        limit = self.arguments.max_request_sentences
        if not sentences:
            raise RequestError(field_error("text", "an empty list: give at least one sentence.", []))
        if len(sentences) > limit:
            raise RequestError(field_error("text", f"{len(sentences)} sentences: more than this server's "
                                           f"--max_request_sentences {limit}.", None))  # fmt: skip
        at = "text" if isinstance(body.text, str) else "text[{}]"
        empty = [field_error(at.format(i), "an empty sentence.", s) for i, s in enumerate(sentences) if not s.strip()]
        if empty:
            raise RequestError(*empty)
        lengths = [len(ids) for ids in self.tokenizer(sentences)["input_ids"]]
        longest = min(self.arguments.max_batch_tokens, getattr(self.tokenizer, "model_max_length", 10**9))
        too_long = [
            field_error(at.format(i), f"{length} tokens: more than the {longest} this server takes in one sentence.")
            for i, length in enumerate(lengths)
            if length > longest
        ]
        if too_long:
            raise RequestError(*too_long)
        prefixes = body.target_prefix if body.target_prefix is not None else [""] * len(sentences)
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        if len(prefixes) != len(sentences):
            raise RequestError(field_error("target_prefix", f"{len(prefixes)} prefixes for {len(sentences)} "
                                           "sentences: give one per sentence ('' for none).", None))  # fmt: skip
        if any(prefixes) and self.arguments.engine == "onnx":
            raise RequestError(field_error("target_prefix", "the onnx engine decodes one token per step from the "
                                           "start; this server cannot continue a prefix.", None))  # fmt: skip
        constraints = self.constraints(body, len(sentences))
        sources = [Source(*fields) for fields in zip(sentences, prefixes, constraints, strict=True)]
        return sources, lengths

    def constraints(self, body: TranslateRequest, count: int) -> list:
        """Each sentence's `LexicalConstraints` (None for none) from the request's `constraints` and `avoid`.

        Raises:
            RequestError: phrases not shaped as `text`, an empty phrase, more constraint tokens than
                `max_new_tokens`, or an engine without constrained search.
        """
        given = {}
        for name in ("constraints", "avoid"):
            value = getattr(body, name)
            if value is None:
                continue
            if isinstance(body.text, str) and value and not all(isinstance(phrase, str) for phrase in value):
                raise RequestError(field_error(name, "a list of phrases for one sentence.", None))
            if not isinstance(body.text, str) and (len(value) != count or any(isinstance(v, str) for v in value)):
                raise RequestError(field_error(name, f"a list of {count} phrase lists, one per sentence ([] for "
                                               "none).", None))  # fmt: skip
            rows = [value] if isinstance(body.text, str) else value
            empty = [f"{name}[{i}]" if isinstance(body.text, str) else f"{name}[{r}][{i}]"
                     for r, row in enumerate(rows) for i, phrase in enumerate(row) if not phrase.strip()]  # fmt: skip
            if empty:
                raise RequestError(*(field_error(at, "an empty phrase.", "") for at in empty))
            given[name] = rows
        if not any(phrase for rows in given.values() for row in rows for phrase in row):
            return [None] * count
        if self.arguments.engine == "ctranslate2":
            raise RequestError(field_error(next(iter(given)), f"the {self.arguments.engine} engine has no "
                                           "lexically constrained search.", None))  # fmt: skip
        found = []
        for row in range(count):
            include, avoid = (given.get(name, [[]] * count)[row] for name in ("constraints", "avoid"))
            found.append(lexical_constraints(self.tokenizer, include, avoid) if include or avoid else None)
        limit = body.max_new_tokens or self.arguments.max_new_tokens
        too_many = [row for row, c in enumerate(found) if c and c.token_count > limit]
        if too_many:
            row = too_many[0]
            message = (
                f"{found[row].token_count} constraint tokens for sentence {row}: more than max_new_tokens {limit}."
            )
            raise RequestError(field_error("constraints", message, None))
        return found

    def decode(self, sentences: list[Source], options: DecodingOptions) -> list[list[Hypothesis]]:
        """One batch, on the decoding thread; counts the tokens it returns."""
        prefixes = [sentence.prefix for sentence in sentences]
        constraints = [sentence.constraints for sentence in sentences]
        texts = [sentence.text for sentence in sentences]
        found = self.engine.decode(texts, options.num_beams, options.max_new_tokens, options.n_best, options.scores,
                                   prefixes=prefixes if any(prefixes) else None,
                                   constraints=constraints if any(constraints) else None,
                                   alignments=options.alignments)  # fmt: skip
        texts = [hypotheses[0].text for hypotheses in found]
        self.metrics.tokens.inc(sum(map(len, self.engine.tokenizer(texts, add_special_tokens=False)["input_ids"])))
        self.metrics.sentences.inc(len(sentences))
        return found

    def answer(self, found: list, options: DecodingOptions) -> TranslateResponse:
        translations = []
        for hypotheses in found:
            scored = [Hypothesis(text=h.text, score=h.score if options.scores else None,
                                 alignment=format_alignment(h.alignment) if options.alignments else None)
                      for h in hypotheses]  # fmt: skip
            best = scored[0]
            translations.append(Translation(text=best.text, score=best.score, alignment=best.alignment,
                                            n_best=scored if options.n_best > 1 else None))  # fmt: skip
        return TranslateResponse(translations=translations, model=self.model_name)


def model_name(model: str) -> str:
    """A folder's name, or a Hub id as given."""
    return Path(model).name if Path(model).exists() else model


def create_app(
    arguments: ServeArguments,
    on_load_failure: Callable[[str], None] | None = None,
    service: TranslationService | None = None,
    submit: Callable[[list[Source], list[int], DecodingOptions], Awaitable[list]] | None = None,
) -> FastAPI:
    """The server's ASGI app.

    Args:
        arguments: the server's flags.
        on_load_failure: called with the one-line reason when the model fails to load (the CLI exits).
        service: the engine holder (default: one made from `arguments`).
        submit: decodes a request's sentences (default: a `DynamicBatcher` of this app; Ray Serve passes its own).
    """
    service = service or TranslationService(arguments)
    batcher = None
    if submit is None:
        batcher = DynamicBatcher(service.decode, arguments.max_batch_tokens, arguments.max_batch_sentences,
                                 arguments.max_wait_ms, arguments.max_queue, service.metrics,
                                 service.torch_thread)  # fmt: skip
        submit = batcher.submit

    async def load_in_background() -> None:
        try:
            await service.on_torch_thread(service.load)
        except Exception as error:  # noqa: BLE001 - any failure to load is reported in one line
            service.status, service.failure = "failed", f"{arguments.model}: {type(error).__name__}: {error}"
            logger.error("could not load the model: %s", service.failure)
            if on_load_failure is not None:
                on_load_failure(service.failure)
            return
        service.status = "ok"
        logger.info("model %s ready (%s engine)", service.model_name, arguments.engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if batcher is not None:
            batcher.start()
        # a service loaded already (a Ray replica loads before it takes requests) is not loaded again
        loading = asyncio.create_task(load_in_background()) if service.engine is None else None
        yield
        service.status = "draining"
        if batcher is not None:
            await batcher.drain()
        if loading is not None:
            await asyncio.gather(loading, return_exceptions=True)

    app = FastAPI(title="hf_attention translation server", lifespan=lifespan)
    app.state.service = service

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": service.status, "model": service.model_name}
        if service.failure:
            body["error"] = service.failure
        return JSONResponse(body, status_code=200 if service.status == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        setting = getattr(service.engine, "setting", arguments.quantization or arguments.dtype)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "hf_attention",
                                            "engine": arguments.engine, "setting": setting}]}  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/translate", response_model=TranslateResponse, response_model_exclude_none=True)
    async def translate(body: TranslateRequest, request: Request):
        started = time.perf_counter()
        response = await answer(body, request)
        service.metrics.requests.labels(status=str(response.status_code)).inc()
        service.metrics.latency.observe(time.perf_counter() - started)
        return response

    async def answer(body: TranslateRequest, request: Request) -> Response:
        if service.status != "ok":
            detail = "the model is still loading" if service.status == "loading" else f"the server is {service.status}"
            return unavailable(detail)
        try:
            options = service.options(body)
            sentences, lengths = service.sentences(body)
        except RequestError as error:
            return JSONResponse({"detail": error.errors}, status_code=422)
        decoding = asyncio.ensure_future(submit(sentences, lengths, options))
        left = asyncio.ensure_future(client_left(request))
        await asyncio.wait({decoding, left}, return_when=asyncio.FIRST_COMPLETED)
        if not decoding.done():  # the caller is gone: its sentences leave the queue
            decoding.cancel()
            service.metrics.cancelled.inc()
            return Response(status_code=499)
        left.cancel()
        try:
            found = decoding.result()
        except QueueFull:
            return unavailable(f"the queue is full ({arguments.max_queue} sentences wait): retry later")
        except ShuttingDown:
            return unavailable("the server is shutting down")
        except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, not the server
            logger.exception("decoding a batch failed")
            return JSONResponse({"detail": f"decoding failed: {type(error).__name__}: {error}"}, status_code=500)
        return JSONResponse(service.answer(found, options).model_dump(exclude_none=True))

    return app


def unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})


async def client_left(request: Request) -> None:
    """Returns when the client disconnects (the body is read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
