"""The translation server: the real server in a child process on 127.0.0.1 and a free port, driven over HTTP.

Translations equal `generate()`'s alone, under 1 and under 32 concurrent clients, with batching visible in
`/metrics`; bad input gets 422 naming the field, a full queue 503 with Retry-After, a failing batch 500 for its
requests only; a client that leaves frees its slot; SIGTERM drains. The batcher's choices are tested in-process."""

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from .helpers import generate_alone, require_module, save_perturbed_copy, save_toy_translation_model

httpx = require_module("httpx")
require_module("fastapi")
from hf_attention.serving import DynamicBatcher, QueueFull, ServeArguments  # noqa: E402
from hf_attention.serving.process import ServerProcess, metric  # noqa: E402
from hf_attention.serving.schema import DecodingOptions  # noqa: E402
from hf_attention.serving.server import main  # noqa: E402

FAULTS = str(Path(__file__).parent / "serve_with_faults.py")
SOURCES = ["we buy two dogs", "they sell ninety one trees and five houses", "i see cats", "you count three hundred",
           "two cats", "we see five houses and one dog", "they buy trees", "i count dogs"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_toy_translation_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess([str(model_dir), "--quantization", "none", "--max_wait_ms", "50", "--max_new_tokens", "16",
                        "--max_request_sentences", "8", "--max_batch_tokens", "512"]) as server:  # fmt: skip
        yield server


def translate(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/translate", json=body, timeout=60)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_translations_and_scores_equal_generate_alone(server, model_dir, num_beams):
    n_best = min(num_beams, 2)
    response = translate(server, text=SOURCES[:3], num_beams=num_beams, n_best=n_best, max_new_tokens=12,
                         return_scores=True)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model_dir.name and len(body["translations"]) == 3
    for sentence, translation in zip(SOURCES, body["translations"], strict=False):
        expected = generate_alone(model_dir, sentence, num_beams, n_best)
        assert translation["text"] == expected[0][0]
        assert translation["score"] == pytest.approx(expected[0][1], abs=1e-4)
        if n_best > 1:
            assert [(h["text"], pytest.approx(h["score"], abs=1e-4)) for h in translation["n_best"]] == expected
    plain = translate(server, text=SOURCES[0], num_beams=num_beams, max_new_tokens=12).json()["translations"]
    assert plain == [{"text": generate_alone(model_dir, SOURCES[0], num_beams)[0][0]}]  # no score unless asked for


def test_a_target_prefix_is_continued_as_generate_continues_it_alone(server, model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    starts = ["wir kaufen", "", "ich"]
    response = translate(server, text=SOURCES[:3], target_prefix=starts, num_beams=2, max_new_tokens=12)
    assert response.status_code == 200, response.text
    for sentence, start, translation in zip(SOURCES, starts, response.json()["translations"], strict=False):
        ids = tokenizer(text_target=start, add_special_tokens=False)["input_ids"] if start else []
        prefix = torch.tensor([[model.generation_config.decoder_start_token_id, *ids]])
        generated = model.generate(**tokenizer([sentence], return_tensors="pt"), decoder_input_ids=prefix,
                                   num_beams=2, max_new_tokens=12)  # fmt: skip
        assert translation["text"] == tokenizer.decode(generated[0], skip_special_tokens=True).strip()
        assert translation["text"].startswith(start)


def test_constraints_and_alignments_are_the_python_api_s(server, model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_attention import align
    from hf_attention.inference.alignment import format_alignment
    from hf_attention.inference.engines import TorchEngine

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = TorchEngine(model, tokenizer)
    include, avoid = [["hunde kaufen"], [], ["drei"]], [[], ["z"], []]
    response = translate(server, text=SOURCES[:3], constraints=include, avoid=avoid, alignments=True, num_beams=2,
                         max_new_tokens=12)  # fmt: skip
    assert response.status_code == 200, response.text
    for row, translation in enumerate(response.json()["translations"]):
        wanted = engine.lexical_constraints(include[row], avoid[row])
        generated = model.generate(**tokenizer([SOURCES[row]], return_tensors="pt"), num_beams=2, max_new_tokens=12,
                                   constraints=[wanted])  # fmt: skip
        text = tokenizer.decode(generated[0], skip_special_tokens=True).strip()
        assert translation["text"] == text and all(phrase in text for phrase in include[row])
        ids = [i for i in generated[0].tolist()[1:] if i != tokenizer.pad_token_id]  # the tokens as generated
        assert translation["alignment"] == format_alignment(align(model, tokenizer, [SOURCES[row]], [ids])[0])
    one = translate(server, text=SOURCES[0], constraints=["hunde kaufen"], num_beams=2, max_new_tokens=12).json()
    assert "hunde kaufen" in one["translations"][0]["text"]


def test_an_ensemble_server_answers_as_the_python_ensemble(model_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_attention import EnsembleForConditionalGeneration

    second = save_perturbed_copy(model_dir, tmp_path / "second", scale=0.2)
    with ServerProcess([str(model_dir), "--ensemble_with", str(second), "--quantization", "none",
                        "--max_new_tokens", "12"]) as ensemble_server:  # fmt: skip
        response = translate(ensemble_server, text=SOURCES[:2], num_beams=2)
        setting = httpx.get(ensemble_server.url + "/v1/models").json()["data"][0]["setting"]
    assert response.status_code == 200, response.text
    assert setting.startswith("ensemble of 2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    members = [AutoModelForSeq2SeqLM.from_pretrained(folder).eval() for folder in (model_dir, second)]
    ensemble = EnsembleForConditionalGeneration(members).eval()
    for sentence, translation in zip(SOURCES, response.json()["translations"], strict=False):
        generated = ensemble.generate(**tokenizer([sentence], return_tensors="pt"), num_beams=2, max_new_tokens=12)
        assert translation["text"] == tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def concurrent_clients_get_what_one_client_gets(server, requests: list[dict]) -> tuple[str, str]:
    """Sends `requests` one at a time, then from 32 concurrent clients; asserts equal answers. Returns /metrics
    before and after the concurrent round."""
    one_client = [translate(server, **body).json()["translations"] for body in requests]
    before = httpx.get(server.url + "/metrics").text
    with ThreadPoolExecutor(32) as clients:
        responses = list(clients.map(lambda body: translate(server, **body), requests))
    assert [response.status_code for response in responses] == [200] * len(requests)
    assert [response.json()["translations"] for response in responses] == one_client
    return before, httpx.get(server.url + "/metrics").text


def test_32_concurrent_clients_get_what_one_client_gets_and_are_batched(server):
    requests = [{"text": SOURCES[i % len(SOURCES)], "num_beams": 1 + i % 2} for i in range(64)]
    before, after = concurrent_clients_get_what_one_client_gets(server, requests)
    batches = metric(after, "hf_attention_batches_total") - metric(before, "hf_attention_batches_total")
    sentences = metric(after, "hf_attention_batch_sentences_sum") - metric(before, "hf_attention_batch_sentences_sum")
    assert sentences == len(requests) and batches < len(requests) / 4  # dynamic batching took place
    assert metric(after, "hf_attention_requests_total", 'status="200"') >= 2 * len(requests)
    assert metric(after, "hf_attention_queue_depth") == 0


def test_an_int8_server_answers_each_request_as_alone_when_batched(model_dir):
    """int8 activations are quantised row by row (`--batch_invariant`, the default), not with one scale per batch."""
    with ServerProcess([str(model_dir), "--quantization", "int8", "--max_wait_ms", "50",
                        "--max_new_tokens", "16"]) as int8_server:  # fmt: skip
        requests = [{"text": SOURCES[i % len(SOURCES)] + " " + "und " * (i % 5)} for i in range(32)]
        before, after = concurrent_clients_get_what_one_client_gets(int8_server, requests)
        assert metric(after, "hf_attention_batches_total") - metric(before, "hf_attention_batches_total") < 16
        models = httpx.get(int8_server.url + "/v1/models").json()["data"]
        assert models[0]["setting"] == "int8"


@pytest.mark.parametrize(
    "body, field, message",
    [
        ({"text": "a dog", "beams": 2}, "beams", "Extra inputs"),
        ({"text": "a dog", "num_beams": "two"}, "num_beams", "valid integer"),
        ({"text": 3}, "text", "valid string"),
        ({"text": "   "}, "text", "empty sentence"),
        ({"text": []}, "text", "at least one sentence"),
        ({"text": ["a dog", ""]}, ["text", 1], "empty sentence"),
        ({"text": ["a dog"] * 9}, "text", "--max_request_sentences 8"),
        ({"text": "a dog", "num_beams": 2, "n_best": 3}, "n_best", "more than num_beams 2"),
        ({"text": "a dog", "max_new_tokens": 17}, "max_new_tokens", "--max_new_tokens 16"),
        ({"text": "a dog", "num_beams": 0}, "num_beams", "greater than or equal to 1"),
        ({"text": "dog " * 600}, "text", "more than the 512"),
        ({"text": ["a dog", "a cat"], "target_prefix": ["ein"]}, "target_prefix", "1 prefixes for 2 sentences"),
        ({"text": ["a dog", "a cat"], "constraints": [["hund"]]}, "constraints", "a list of 2 phrase lists"),
        ({"text": "a dog", "avoid": ["hund", " "]}, ["avoid", 1], "an empty phrase"),
        ({"text": "a dog", "constraints": ["hund " * 20]}, "constraints", "more than max_new_tokens 16"),
    ],
    ids=[
        "unknown-option",
        "wrong-type",
        "not-text",
        "empty",
        "no-sentence",
        "one-empty",
        "too-many",
        "n-best",
        "too-long-output",
        "no-beam",
        "too-long-source",
        "prefixes",
        "constraints-shape",
        "empty-phrase",
        "constraint-too-long",
    ],  # fmt: skip
)
def test_bad_input_is_answered_422_naming_the_field(server, body, field, message):
    response = translate(server, **body)
    assert response.status_code == 422
    (error, *_) = response.json()["detail"]
    expected = [field] if isinstance(field, str) else field
    assert error["loc"][1 : 1 + len(expected)] == expected and message in error["msg"]


def test_a_bad_flag_stops_the_server_before_it_listens(model_dir, capsys):
    refused = [(["--max_batch_tokens", "0"], "--max_batch_tokens 0"), (["--engine", "tf"], "--engine tf"),
               (["--port", "70000"], "--port 70000"), (["--device", "cuda:0"], "--device cuda:0"),
               (["--ensemble_with", str(model_dir), "--engine", "onnx"], "--ensemble_with")]  # fmt: skip
    for flags, named in refused:
        if named.startswith("--device") and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as stop:
            main([str(model_dir), *flags])
        assert str(stop.value).startswith(f"error: {named}:")


def test_a_model_that_does_not_load_ends_the_server_with_one_line(tmp_path):
    with pytest.raises(RuntimeError, match="could not load the model"):
        with ServerProcess([str(tmp_path / "missing")], ready_timeout=60):
            pass


@pytest.fixture(scope="module")
def faulty_server(model_dir):
    with ServerProcess([str(model_dir), "--quantization", "none", "--max_wait_ms", "0", "--max_batch_sentences", "1",
                        "--max_queue", "2", "--max_new_tokens", "8"], entry=FAULTS) as server:  # fmt: skip
        yield server


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def queue_depth(server) -> float:
    return metric(httpx.get(server.url + "/metrics").text, "hf_attention_queue_depth")


def decoded_batches(server) -> float:
    return metric(httpx.get(server.url + "/metrics").text, "hf_attention_batches_total")


def translate_when_there_is_room(server, **body) -> httpx.Response:
    """Retry as `Retry-After` asks while the queue of 2 is full (the failing request alone fills it)."""
    deadline = time.monotonic() + 30
    while (response := translate(server, **body)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    return response


def test_a_full_queue_answers_503_with_retry_after(faulty_server):
    with ThreadPoolExecutor(3) as clients:
        busy = clients.submit(translate, faulty_server, text="SLOW dogs")
        time.sleep(0.3)  # the slow sentence is decoding; two more fill the queue of 2
        queued = [clients.submit(translate, faulty_server, text=text) for text in ("i see cats", "two cats")]
        wait_for(lambda: queue_depth(faulty_server) == 2)
        refused = translate(faulty_server, text="we buy trees")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "queue is full" in refused.json()["detail"]
        assert [future.result().status_code for future in (busy, *queued)] == [200, 200, 200]
    assert translate(faulty_server, text="we buy trees").status_code == 200  # room again


def test_a_client_that_leaves_frees_its_slot(faulty_server):
    with ThreadPoolExecutor(1) as clients:
        busy = clients.submit(translate, faulty_server, text="SLOW dogs")
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):  # waits behind the slow batch, then gives up
            httpx.post(faulty_server.url + "/v1/translate", json={"text": "i see cats"}, timeout=0.5)
        wait_for(lambda: queue_depth(faulty_server) == 0)
        assert not busy.done()  # its slot was freed while the slow batch still decoded
        cancelled = metric(httpx.get(faulty_server.url + "/metrics").text, "hf_attention_cancelled_requests_total")
        assert cancelled == 1 and busy.result().status_code == 200


def test_a_batch_that_fails_fails_only_its_requests(faulty_server):
    before = decoded_batches(faulty_server)
    with ThreadPoolExecutor(3) as clients:
        failing = clients.submit(translate, faulty_server, text=["i see cats", "FAIL"])
        fine = clients.submit(translate_when_there_is_room, faulty_server, text="two cats")
        assert failing.result().status_code == 500 and "a fault the test injected" in failing.result().json()["detail"]
        assert fine.result().status_code == 200
    assert translate(faulty_server, text="we buy trees").status_code == 200
    assert decoded_batches(faulty_server) > before
    assert "failed_batches_total 1.0" in httpx.get(faulty_server.url + "/metrics").text


def test_health_waits_for_the_model_and_sigterm_drains_the_queue(model_dir):
    environment = {**os.environ, "HF_ATTENTION_TEST_LOAD_SECONDS": "2", "HF_ATTENTION_TEST_SLOW_SECONDS": "0.5"}
    with ServerProcess([str(model_dir), "--quantization", "none", "--max_wait_ms", "0", "--max_batch_sentences", "1"],
                       entry=FAULTS, environment=environment, wait_until_ready=False) as server:  # fmt: skip
        assert server.health() == (503, {"status": "loading", "model": model_dir.name})
        assert translate(server, text="two cats").status_code == 503
        server.wait_for_health(time.monotonic() + 60)
        with ThreadPoolExecutor(4) as clients:
            pending = [clients.submit(translate, server, text=f"SLOW {text}") for text in SOURCES[:4]]
            wait_for(lambda: queue_depth(server) == 3)  # one decodes, three wait
            server.terminate()
            assert [future.result().status_code for future in pending] == [200] * 4
        assert server.process.wait(30) == -signal.SIGTERM  # after the drain, as uvicorn ends: by the signal
        with pytest.raises(httpx.ConnectError):
            translate(server, text="two cats")


# The batcher in-process: which sentences decode together.


def run_batcher(submissions, max_batch_sentences=8, max_batch_tokens=1000, max_wait_ms=20.0, max_queue=100):
    """Submits (sentences, lengths, options) concurrently; returns the answers and the batches decode saw."""
    seen = []

    def decode(sentences, options):
        seen.append((sentences, options))
        return [[f"{sentence}/{options.num_beams}"] for sentence in sentences]

    async def scenario():
        batcher = DynamicBatcher(decode, max_batch_tokens, max_batch_sentences, max_wait_ms, max_queue)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(*submission) for submission in submissions),
                                       return_exceptions=True)  # fmt: skip
        await batcher.drain()
        return answers

    return asyncio.run(scenario()), seen


GREEDY, BEAM = DecodingOptions(1, 8), DecodingOptions(4, 8)


def test_the_batcher_groups_by_options_and_sorts_by_length():
    answers, seen = run_batcher([(["a"], [1], GREEDY), (["b b b", "c"], [3, 1], BEAM), (["d d"], [2], GREEDY)])
    assert answers == [[["a/1"]], [["b b b/4"], ["c/4"]], [["d d/1"]]]
    assert seen == [(["d d", "a"], GREEDY), (["b b b", "c"], BEAM)]  # one batch per option, longest first


def test_the_batcher_keeps_to_its_limits_and_serves_the_oldest_first():
    sentences = [([f"s{i}"], [i + 1], GREEDY) for i in range(5)]
    _, seen = run_batcher(sentences, max_batch_sentences=2)
    assert [batch for batch, _ in seen] == [["s1", "s0"], ["s3", "s2"], ["s4"]]
    _, seen = run_batcher(sentences, max_batch_tokens=6)  # padded tokens: rows x the longest
    assert all(len(batch) * max(int(s[1:]) + 1 for s in batch) <= 6 for batch, _ in seen)
    assert sorted(s for batch, _ in seen for s in batch) == [f"s{i}" for i in range(5)]


def test_the_batcher_refuses_past_its_queue_and_fails_only_the_failing_batch():
    answers, _ = run_batcher([(["a", "b"], [1, 1], GREEDY), (["c"], [1], GREEDY)], max_queue=2)
    assert answers[0] == [["a/1"], ["b/1"]] and isinstance(answers[1], QueueFull)

    def decode(sentences, options):
        if "bad" in sentences:
            raise ValueError("bad batch")
        return [[sentence] for sentence in sentences]

    async def scenario():
        batcher = DynamicBatcher(decode, 100, 1, 0, 10)
        batcher.start()
        answers = await asyncio.gather(batcher.submit(["bad"], [1], GREEDY), batcher.submit(["good"], [1], GREEDY),
                                       return_exceptions=True)  # fmt: skip
        await batcher.drain()
        return answers

    failed, served = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and served == [["good"]]


def test_clients_that_come_back_over_more_than_max_wait_stay_in_one_batch():
    """Clients answered by one batch send their next requests one after another. Each arrival restarts the wait, so
    8 clients coming back 20 ms apart (140 ms in all, max_wait 50 ms) make one batch again; a deadline counted from the
    oldest arrival started a batch after 50 ms and split them into groups that took turns."""
    seen = []

    def decode(sentences, options):
        time.sleep(0.01)
        seen.append(len(sentences))
        return [[sentence] for sentence in sentences]

    async def client(batcher, number: int) -> None:
        for round_number in range(4):
            await asyncio.sleep(0.02 * number)  # the answers go out one by one; the clients come back in turn
            assert await batcher.submit([f"{number}.{round_number}"], [1], GREEDY) == [[f"{number}.{round_number}"]]

    async def scenario():
        batcher = DynamicBatcher(decode, 1000, 64, max_wait_ms=50, max_queue=100)
        batcher.start()
        await asyncio.gather(*(client(batcher, number) for number in range(8)))
        await batcher.drain()

    asyncio.run(scenario())
    assert seen == [8, 8, 8, 8]


def test_an_idle_batcher_waits_max_wait_for_company_and_at_most_four_times_that_while_sentences_keep_coming():
    started = []

    def decode(sentences, options):
        started.append((time.perf_counter(), len(sentences)))
        return [[sentence] for sentence in sentences]

    async def scenario(arrivals: list[float]):
        batcher = DynamicBatcher(decode, 1000, 64, max_wait_ms=50, max_queue=100)
        batcher.start()
        begin = time.perf_counter()

        async def arrive(delay: float, number: int):
            await asyncio.sleep(delay)
            await batcher.submit([str(number)], [1], GREEDY)

        await asyncio.gather(*(arrive(delay, number) for number, delay in enumerate(arrivals)))
        await batcher.drain()
        return begin

    begin = asyncio.run(scenario([0.0]))
    assert len(started) == 1 and 0.045 <= started[0][0] - begin < 0.15  # one sentence: max_wait, no more
    started.clear()
    begin = asyncio.run(scenario([0.03 * number for number in range(12)]))  # a steady stream, 30 ms apart
    assert 0.19 <= started[0][0] - begin < 0.3 and started[0][1] < 12  # cut at 4 x max_wait


def test_serve_arguments_read_ray_style_strings():
    arguments = ServeArguments.from_dict({"model": "m", "max_wait_ms": "2.5", "compile": "false", "num_beams": "None"})
    assert (arguments.max_wait_ms, arguments.compile, arguments.num_beams) == (2.5, False, None)
    assert ServeArguments.from_dict({"model": "m", "ensemble_with": "a,b"}).ensemble_with == ["a", "b"]
    with pytest.raises(ValueError, match="max_batch_tokens=lots: must be of type int"):
        ServeArguments.from_dict({"model": "m", "max_batch_tokens": "lots"})
    with pytest.raises(ValueError, match="beams: not an option of the server"):
        ServeArguments.from_dict({"model": "m", "beams": "2"})


def test_checking_a_request_leaves_the_decoding_tokenizer_s_padding_alone(model_dir):
    """A request is checked on the event loop while a batch is encoded (padded) on the decoding thread. A fast
    tokenizer's padding is a setting of one Rust object, so a check through the engine's tokenizer, between its
    setting and its encoding, made the batch unpadded: "Unable to create tensor" (seen under Ray Serve). Requests are
    checked with their own copy."""
    from hf_attention.serving.app import TranslationService
    from hf_attention.serving.schema import TranslateRequest

    service = TranslationService(ServeArguments(model=str(model_dir), quantization="none"))
    service.load()
    backend = service.engine.tokenizer.backend_tokenizer
    backend.enable_padding(pad_id=service.engine.tokenizer.pad_token_id)  # the decoding thread, mid-encoding
    sources, lengths = service.sentences(TranslateRequest(text=SOURCES[:2], constraints=[["hunde"], []]))
    assert backend.padding is not None  # still padding the decoding thread's batch
    assert lengths == [len(ids) for ids in service.engine.tokenizer(SOURCES[:2])["input_ids"]]
    assert sources[0].constraints is not None and sources[1].constraints is None


def test_the_server_loads_and_decodes_every_batch_on_one_thread(model_dir, monkeypatch):
    """OpenMP keeps a pool of worker threads for each thread that starts parallel work; with two pools on a 2-core
    machine libgomp sleeps between parallel regions instead of spinning, and a sentence decoded in twice the time.
    The model loads, warms up and decodes every batch on the service's one torch thread, not the event loop's."""
    from fastapi.testclient import TestClient

    from hf_attention.serving import app as app_module

    threads = []
    load_engine = app_module.load_engine

    def recording_load_engine(*args, **kwargs):
        threads.append(("load", threading.get_ident()))
        engine = load_engine(*args, **kwargs)
        decode = engine.decode

        def recording_decode(*decode_args, **decode_kwargs):
            threads.append(("decode", threading.get_ident()))
            return decode(*decode_args, **decode_kwargs)

        engine.decode = recording_decode
        return engine

    monkeypatch.setattr(app_module, "load_engine", recording_load_engine)
    arguments = ServeArguments(model=str(model_dir), quantization="none", max_new_tokens=8)
    with TestClient(app_module.create_app(arguments)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for texts in (SOURCES[:1], SOURCES[:3]):
            assert client.post("/v1/translate", json={"text": texts}).status_code == 200
    assert [kind for kind, _ in threads] == ["load", "decode", "decode", "decode"]  # the warm-up, two requests
    assert len({ident for _, ident in threads}) == 1 and threads[0][1] != threading.get_ident()
