"""The server as a Ray Serve deployment: two replicas on a local single-node Ray answer through Ray Serve's HTTP
proxy with the translations `generate()` gives alone, and the deployment's flags are checked before Ray starts."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .helpers import generate_alone, require_module, save_toy_translation_model

require_module("ray.serve")
httpx = require_module("httpx")
from hf_attention.serving.arguments import ServeArgumentError  # noqa: E402
from hf_attention.serving.ray_app import app, deployment_options  # noqa: E402

DRIVER = str(Path(__file__).parent / "ray_serve_driver.py")
SOURCES = ["we buy two dogs", "they sell ninety one trees and five houses", "i see cats", "you count three hundred"]


@pytest.mark.slow  # 48 s, most of it starting Ray: the default suite was at 14 of its 15 minutes
def test_two_replicas_answer_through_ray_serves_proxy(tmp_path):
    model = save_toy_translation_model(tmp_path / "model")
    driver = subprocess.Popen(
        [sys.executable, DRIVER, f"model={model}", "num_replicas=2", "quantization=none", "max_new_tokens=12",
         "max_wait_ms=20"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        started = json.loads(driver.stdout.readline() or "{}")
        assert started.get("replicas") == 2, "Ray Serve did not start two replicas"
        url = started["url"]
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok", "model": "model"}
        requests = [{"text": SOURCES[i % 4], "num_beams": 1 + i % 2} for i in range(16)]
        with ThreadPoolExecutor(16) as clients:
            responses = list(
                clients.map(lambda body: httpx.post(url + "/v1/translate", json=body, timeout=60), requests)
            )
        for body, response in zip(requests, responses, strict=True):
            assert response.status_code == 200, response.text
            expected = generate_alone(model, body["text"], body["num_beams"])[0][0]
            assert response.json()["translations"] == [{"text": expected}]
        refused = httpx.post(url + "/v1/translate", json={"text": "a dog", "beams": 2}, timeout=30)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "beams"]
    finally:
        driver.stdin.close()
        try:
            driver.wait(120)
        except subprocess.TimeoutExpired:
            driver.kill()


def test_deployment_flags_become_ray_options_and_bad_ones_are_named():
    assert deployment_options({"num_replicas": "3"}, max_batch_sentences=8) == {
        "ray_actor_options": {"num_cpus": 1.0}, "max_ongoing_requests": 16, "num_replicas": 3,
    }  # fmt: skip
    scaling = deployment_options({"num_replicas": "auto", "max_replicas": "6"}, max_batch_sentences=8)
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 8}
    with pytest.raises(ServeArgumentError, match="num_replicas=zero: must be a positive number"):
        deployment_options({"num_replicas": "zero"}, 8)
    with pytest.raises(ServeArgumentError, match="--max_batch_tokens 0: must be a positive"):
        app({"model": "m", "max_batch_tokens": "0"})
