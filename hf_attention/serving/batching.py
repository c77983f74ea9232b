"""Dynamic batching: sentences of concurrent requests decoded together, in length-sorted batches.

A request's sentences join one queue. Once the decoder is free and the queue is not empty, the batcher waits for
company while sentences keep coming: until `max_wait_ms` pass without a new one (each arrival restarts the wait, for
at most `LONGEST_WAIT_FACTOR` × `max_wait_ms` in all) or a full batch is queued. It then decodes the oldest sentence
with the sentences queued with the same decoding options that are closest to it in length, as many as fit in
`max_batch_sentences` sentences and `max_batch_tokens` padded source tokens, longest first. Serving the oldest first
means no sentence waits behind an endless stream of better-fitting ones. While a batch decodes (on one thread, off the
event loop, so `/health` and `/metrics` still answer) new requests queue up and make the next batch.

The wait restarts after each batch, not from the oldest sentence's arrival: clients answered by one batch send their
next requests over some milliseconds (32 answers leave one by one), and a batch started on the first few of them
splits the clients into batches that take turns, each waiting for the other. Measured, 32 clients of one sentence
each on a 2-core Xeon: 8.5 sentences per batch on average with a deadline counted from the oldest arrival.

Each row of a batch decodes as `generate()` decodes it alone (every row stops at its request's `max_new_tokens`), so
a request gets the translations it would get alone. An exception while decoding fails the requests of that batch
only; a request whose caller left is taken out of the queue.
"""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..inference.engines import Hypothesis
from .metrics import ServingMetrics
from .schema import DecodingOptions

# decode(sentences, options): per sentence, its hypotheses. A sentence is whatever `decode` takes (the server's:
# `schema.Source`, the text and its target prefix); the batcher only orders them by their lengths.
Decode = Callable[[list, DecodingOptions], list[list[Hypothesis]]]
# While sentences keep arriving less than max_wait_ms apart, the batcher waits at most this many times max_wait_ms.
LONGEST_WAIT_FACTOR = 4


class QueueFull(Exception):
    """The queue holds `max_queue` sentences already: the caller should retry later (503)."""


class ShuttingDown(Exception):
    """The server is draining: it finishes what is queued and takes nothing new (503)."""


@dataclass(eq=False)
class PendingRequest:
    sentences: list
    options: DecodingOptions
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0


@dataclass(eq=False)
class QueuedSentence:
    request: PendingRequest
    index: int  # in its request
    length: int  # source tokens
    arrived: float


class DynamicBatcher:
    """Collects the sentences of concurrent requests into batches for `decode(sentences, options)`.

    Args:
        decode: translates a batch of sentences that share decoding options: per sentence, its hypotheses.
        max_batch_tokens: padded source tokens per batch (sentences × the longest).
        max_batch_sentences: sentences per batch.
        max_wait_ms: how long a free decoder waits for one more sentence before it starts a batch (each arrival
            restarts the wait, `LONGEST_WAIT_FACTOR` times this at most); 0: no waiting.
        max_queue: sentences that may wait; past that, `submit` raises `QueueFull`.
        metrics: where queue depth, batch sizes and batch times are counted.
        executor: the one thread `decode` runs on (the server's torch thread; default: the batcher's own).
    """

    def __init__(self, decode: Decode, max_batch_tokens: int, max_batch_sentences: int, max_wait_ms: float,
                 max_queue: int, metrics: ServingMetrics | None = None,
                 executor: ThreadPoolExecutor | None = None):  # fmt: skip
        self.decode = decode
        self.max_batch_tokens, self.max_batch_sentences = max_batch_tokens, max_batch_sentences
        self.max_wait, self.max_queue = max_wait_ms / 1000, max_queue
        self.metrics = metrics or ServingMetrics()
        self.queue: list[QueuedSentence] = []
        self._last_arrival = float("-inf")
        # requests whose batch is done and whose handlers have not yet taken the answer; `_answered` is set when none
        self._answering: set[int] = set()
        self._answered: asyncio.Event | None = None
        self.closing = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # one decoding thread: the engines are not thread-safe, and torch already uses every core for one batch
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_attention-decode")

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self._wakeup, self._answered = asyncio.Event(), asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hf_attention-batcher")

    async def drain(self) -> None:
        """Takes nothing new, decodes everything queued, then stops."""
        self.closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def submit(self, sentences: list, lengths: list[int], options: DecodingOptions) -> list:
        """The hypotheses of each sentence, once every batch holding one of them has been decoded.

        Raises:
            QueueFull: `max_queue` sentences are waiting already.
            ShuttingDown: the batcher is draining.
            Exception: whatever decoding the batch holding one of the sentences raised.
        """
        if self.closing:
            raise ShuttingDown()
        if len(self.queue) + len(sentences) > self.max_queue:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        request = PendingRequest(sentences, options, loop.create_future(), [None] * len(sentences), len(sentences))
        now = self._last_arrival = loop.time()
        self.queue += [QueuedSentence(request, index, length, now) for index, length in enumerate(lengths)]
        self.metrics.queue_depth.set(len(self.queue))
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:  # the caller left: its sentences leave the queue
            self._withdraw(request)
            raise
        finally:
            self._answering.discard(id(request))
            if not self._answering:
                self._answered.set()

    def _withdraw(self, request: PendingRequest) -> None:
        self.queue = [queued for queued in self.queue if queued.request is not request]
        self.metrics.queue_depth.set(len(self.queue))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if self.closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._answering:  # the quiet wait counts from when the last batch's answers have left
                self._answered.clear()
                try:
                    await asyncio.wait_for(self._answered.wait(), LONGEST_WAIT_FACTOR * self.max_wait)
                except TimeoutError:
                    pass
            free_since = loop.time()  # the decoder's: at most LONGEST_WAIT_FACTOR * max_wait from here
            latest = free_since + LONGEST_WAIT_FACTOR * self.max_wait
            while self.queue and not self.closing and not self._full_batch_queued():
                deadline = min(max(free_since, self._last_arrival) + self.max_wait, latest)
                if loop.time() >= deadline:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                except TimeoutError:
                    break
            if self.queue:
                await self._decode(self._next_batch())

    def _full_batch_queued(self) -> bool:
        options = self.queue[0].request.options
        lengths = [queued.length for queued in self.queue if queued.request.options == options]
        return len(lengths) >= self.max_batch_sentences or max(lengths) * len(lengths) >= self.max_batch_tokens

    def _next_batch(self) -> list[QueuedSentence]:
        """The oldest sentence and, among those queued with the same options, the ones closest to it in length, as
        many as the limits allow, longest first: a full batch of similar lengths that the oldest is part of (a cut of
        the whole queue into batches could leave the oldest alone)."""
        options = self.queue[0].request.options
        candidates = sorted((queued for queued in self.queue if queued.request.options == options),
                            key=lambda queued: -queued.length)  # fmt: skip
        lengths = [queued.length for queued in candidates]
        oldest = next(position for position, queued in enumerate(candidates) if queued is self.queue[0])
        start, end = oldest, oldest + 1  # the batch: candidates[start:end]

        def fits(start: int, end: int) -> bool:
            return end - start <= self.max_batch_sentences and lengths[start] * (end - start) <= self.max_batch_tokens

        while True:
            growths = []
            if start > 0 and fits(start - 1, end):
                growths.append((lengths[start - 1] - lengths[oldest], start - 1, end))
            if end < len(candidates) and fits(start, end + 1):
                growths.append((lengths[oldest] - lengths[end], start, end + 1))
            if not growths:
                break
            _, start, end = min(growths)
        batch = candidates[start:end]
        taken = set(map(id, batch))
        self.queue = [queued for queued in self.queue if id(queued) not in taken]
        self.metrics.queue_depth.set(len(self.queue))
        return batch

    async def _decode(self, batch: list[QueuedSentence]) -> None:
        sentences = [queued.request.sentences[queued.index] for queued in batch]
        options = batch[0].request.options
        started = time.perf_counter()
        try:
            hypotheses = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.decode, sentences, options
            )
            if len(hypotheses) != len(batch):
                raise RuntimeError(f"the engine answered {len(hypotheses)} of {len(batch)} sentences")
        except Exception as error:  # only this batch's requests fail; the server keeps serving
            self.metrics.failed_batches.inc()
            for request in {id(queued.request): queued.request for queued in batch}.values():
                self._withdraw(request)
                if not request.future.done():
                    request.future.set_exception(error)
            return
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        for queued, found in zip(batch, hypotheses, strict=True):
            request = queued.request
            request.results[queued.index] = found
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                self._answering.add(id(request))
                request.future.set_result(request.results)
