"""A server in a child process on 127.0.0.1 and a free port, for benchmarks and tests: started, waited for until
`/health` says ready, and always stopped (SIGTERM, then kill)."""

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

LISTENING = re.compile(r"serving .* on (http://[\d.]+:\d+)")


class ServerProcess:
    """`with ServerProcess([MODEL, "--max_wait_ms", "5"]) as server: httpx.post(server.url + "/v1/translate", ...)`.

    Args:
        arguments: the server's command line, without `--host` and `--port` (127.0.0.1 and a free port).
        entry: the module or script the child runs (default: `hf_attention.serving.server`).
        environment: the child's environment (default: this process's).
        ready_timeout: seconds to wait for `/health` to answer 200.
    """

    def __init__(self, arguments: list[str], entry: str | None = None, environment: dict | None = None,
                 ready_timeout: float = 120.0, wait_until_ready: bool = True):  # fmt: skip
        entry_point = ["-m", "hf_attention.serving.server"] if entry is None else [entry]
        self.command = [sys.executable, *entry_point, *arguments, "--host", "127.0.0.1", "--port", "0"]
        self.environment, self.ready_timeout, self.wait_until_ready = environment, ready_timeout, wait_until_ready
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.log: list[str] = []
        self._listening = threading.Event()

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(
            self.command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.environment
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        try:
            deadline = time.monotonic() + self.ready_timeout
            while not self._listening.wait(0.1):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {self.log_tail()}")
            if self.wait_until_ready:
                self.wait_for_health(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line.rstrip("\n"))
            found = LISTENING.search(line)
            if found and self.url is None:
                self.url = found.group(1)
                self._listening.set()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log[-lines:])

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def wait_for_health(self, deadline: float) -> None:
        while self._health_or_refused() != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server never became ready: {self.log_tail()}")
            time.sleep(0.1)

    def _health_or_refused(self) -> int | None:
        try:
            return self.health()[0]
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
            return None  # not listening (any more), or closing the connection as it exits

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits."""
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Stops the child (SIGTERM, then kill after `timeout` seconds) and returns its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of `name{labels}` in a Prometheus text exposition (0 when absent)."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0
