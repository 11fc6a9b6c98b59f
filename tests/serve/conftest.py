"""One real server per session: uvicorn on 127.0.0.1 (a free port) over the bundled default model."""

import pytest

from mimo.serve.server import ServeConfig, start_background


@pytest.fixture(scope="session")
def server():
    srv = start_background(ServeConfig(port=0, max_num_seqs=64, max_queue=256))
    yield srv
    srv.stop()


@pytest.fixture
def idle(server):
    """The server with no request in flight and empty KV pools (checked before and after the test)."""
    _wait_idle(server)
    yield server
    _wait_idle(server)


def _wait_idle(server, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        u = server.llm.block_manager.usage()
        if not server.llm.has_unfinished_requests() and u.full_used == 0 and u.sliding_used == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"server not idle: {server.llm.stats()}")
