"""The server's Prometheus metrics (`GET /metrics`): what an operator watches to size batches and replicas."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Batches of 1 sentence (no company) up to the largest a 2-core CPU decodes in a second.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    """One registry per app, so that two servers in one process (tests, Ray replicas) count apart."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "hf_attention_requests", "Translate requests answered, by HTTP status.", ["status"], registry=self.registry
        )
        self.sentences = Counter("hf_attention_sentences", "Sentences translated.", registry=self.registry)
        self.tokens = Counter(
            "hf_attention_generated_tokens", "Tokens of the translations returned.", registry=self.registry
        )
        self.batches = Counter("hf_attention_batches", "Batches decoded.", registry=self.registry)
        self.failed_batches = Counter(
            "hf_attention_failed_batches", "Batches whose decoding raised.", registry=self.registry
        )
        self.cancelled = Counter(
            "hf_attention_cancelled_requests", "Requests whose client left before the answer.", registry=self.registry
        )
        self.batch_size = Histogram(
            "hf_attention_batch_sentences", "Sentences per decoded batch.", buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge("hf_attention_queue_depth", "Sentences waiting for a batch.", registry=self.registry)
        self.latency = Histogram(
            "hf_attention_request_latency_seconds", "Time from a request's arrival to its answer.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "hf_attention_batch_seconds", "Time to decode one batch.", buckets=LATENCY_BUCKETS, registry=self.registry
        )
