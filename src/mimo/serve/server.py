"""`mimo serve`: ServeConfig, `run(config)` (blocks until SIGINT / SIGTERM) and `start_background(config)`.

    srv = start_background(ServeConfig(port=0))     # a free port on 127.0.0.1, the bundled model
    srv.url                                          # e.g. http://127.0.0.1:40123
    srv.stop()

Shutdown (signal or `stop()`): uvicorn stops accepting connections and lets open requests finish for up to
`graceful_timeout` seconds; then the lifespan's exit aborts whatever is left (their KV is freed) and stops the
engine thread. `run` returns 0.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # a model directory with a tokenizer; None = the bundled default model
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model directory's name
    num_speculative_tokens: int | None = None  # default: all MTP heads
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_queue: int = 256  # requests admitted beyond max_num_seqs before answering 429
    graceful_timeout: float = 5.0
    threads: int = 1  # torch intra-op threads: the tiny model is dispatch-bound, one thread is fastest
    compile: bool = False  # decode steps as torch.compile graphs (engine.LLM): faster, the first requests compile

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        for name in ("max_num_seqs", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")


def build(config: ServeConfig):
    """The app and its state (model loaded, engine thread running)."""
    import torch

    from mimo.engine import LLM
    from mimo.engine.config import DEFAULT_MODEL
    from mimo.serve.app import ServerState, build_app
    from mimo.serve.async_engine import AsyncEngine
    from mimo.serve.metrics import Metrics

    torch.set_num_threads(config.threads)
    llm = LLM(config.model, num_speculative_tokens=config.num_speculative_tokens,
              max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len, compile=config.compile)
    if llm.tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer (tokenizer.json); the server needs one")
    name = config.served_model_name or Path(str(config.model or DEFAULT_MODEL)).resolve().name
    metrics = Metrics(llm, name)
    state = ServerState(llm, AsyncEngine(llm, config.max_queue), metrics, name, config.api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.shutting_down = True
        state.engine.shutdown()

    return build_app(state, lifespan=lifespan), state


def _uvicorn(config: ServeConfig, app):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # A signal asks for the graceful shutdown and nothing more, so `mimo serve` exits 0; uvicorn's own
            # handler records it and re-raises it after shutting down, which ends the process with -signal.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C stops waiting for open requests
            self.should_exit = True

    return Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                         timeout_graceful_shutdown=config.graceful_timeout, access_log=False))


def run(config: ServeConfig) -> int:
    app, state = build(config)
    server = _uvicorn(config, app)
    sock = _bind(config)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    key = ' -H "Authorization: Bearer $MIMO_API_KEY"' if config.api_key else ""
    body = json.dumps({"model": state.model_name, "messages": [{"role": "user", "content": "sort 5 3 9 1"}]})
    print(f"mimo: serving {state.model_name} at {url}  (chat page: {url}/ ; Ctrl-C stops)\n"
          f"try:  curl {url}/v1/chat/completions{key} -H 'Content-Type: application/json' -d '{body}'", flush=True)
    if config.model is None:
        print("note: the bundled mimo-tiny is a ~10M-parameter demo model trained on this project's CPU: it "
              "answers its toy tasks ('add 198 905', 'reverse abcdef', 'sort 4 8 7 6') right about 9 times in "
              "10, continues Python-like text, and talks nonsense otherwise (see its model card)", flush=True)
    server.run(sockets=[sock])
    print("mimo: stopped", flush=True)
    return 0


def _bind(config: ServeConfig) -> socket.socket:
    fam = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    # listening now, not when uvicorn starts: a client that reads the printed URL and connects at once waits
    # in the backlog instead of being refused
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    def __init__(self, config: ServeConfig):
        app, self.state = build(config)
        self._server = _uvicorn(config, app)
        sock = _bind(config)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="mimo-http")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    @property
    def llm(self):
        return self.state.llm

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


def start_background(config: ServeConfig) -> BackgroundServer:
    """Serve in a thread of this process (tests, `mimo chat` without --url, benchmarks)."""
    return BackgroundServer(config)

