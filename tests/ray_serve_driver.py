"""Runs `serving.ray_app:app` on a local single-node Ray for the serving tests: prints one JSON line with the proxy's
URL and the number of running replicas, serves until its standard input closes, then shuts Ray down."""

import json
import socket
import sys

import ray
from ray import serve

from hf_attention.serving.ray_app import app

if __name__ == "__main__":
    flags = dict(argument.split("=", 1) for argument in sys.argv[1:])
    with socket.socket() as probe:  # a free port for Ray's HTTP proxy
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(flags), name="translation", route_prefix="/")
        status = serve.status().applications["translation"].deployments["hf_attention_translator"]
        replicas = status.replica_states.get("RUNNING", 0)
        print(json.dumps({"url": f"http://127.0.0.1:{port}", "replicas": replicas}), flush=True)
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()
