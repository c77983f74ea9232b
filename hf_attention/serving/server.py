"""`hf-attention-serve MODEL` (`scripts/serve.py`): the translation server under uvicorn.

Every flag is checked before the port is taken; the server then listens at once, answers `/health` with 503 while
the model loads, and logs `serving MODEL on http://HOST:PORT` (with `--port 0`, the free port it got). SIGTERM or
Ctrl-C drains: the listening socket closes, `/health` says "draining", every request already received is answered,
then the process ends by the signal, as uvicorn's do (status 143 in a shell). A model that fails to load ends the
process with status 1 and a one-line reason.
"""

import logging
import socket
import sys

import uvicorn
from transformers import HfArgumentParser

from .. import hardware
from ..inference.allocator import reuse_freed_memory
from .app import create_app
from .arguments import ServeArgumentError, ServeArguments


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM first marks the app as draining (so `/health` turns load balancers away
    while the queued requests finish)."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        if self.service.status == "ok":
            self.service.status = "draining"
        super().handle_exit(sig, frame)


def parse(argv: list[str] | None) -> ServeArguments:
    if argv is None:
        argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):  # the model as the first word: `hf-attention-serve MODEL --port 80`
        argv = ["--model", argv[0], *argv[1:]]
    (arguments,) = HfArgumentParser(ServeArguments).parse_args_into_dataclasses(args=argv)
    return arguments


def main(argv: list[str] | None = None) -> None:
    try:
        arguments = parse(argv)
        listening = socket.create_server((arguments.host, arguments.port))
    except ServeArgumentError as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        sys.exit(f"error: --host/--port: cannot listen there: {error.strerror or error}.")
    logging.basicConfig(level=arguments.log_level.upper(), format="%(levelname)s: %(message)s")
    reuse_freed_memory()  # the server owns its process: its batches reuse freed memory (inference/allocator.py)
    failures = []

    def stop_on_load_failure(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True

    app = create_app(arguments, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(app, log_level=arguments.log_level, timeout_graceful_shutdown=None)
    server = DrainingServer(config, app.state.service)
    host, port = listening.getsockname()[:2]
    print(hardware.describe(), file=sys.stderr)
    print(f"serving {arguments.model} on http://{host}:{port}", file=sys.stderr, flush=True)
    server.run(sockets=[listening])
    if failures:
        sys.exit(f"error: could not load the model {failures[0]}")


if __name__ == "__main__":
    main()
