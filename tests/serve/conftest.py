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


class scripted_output:
    """Make the engine emit `text` (then EOS) for the requests started inside the block, whatever the model
    would have said. The HTTP layer, chat template, detokeniser and parsers all run for real; only the
    sampled ids are replaced. The tiny model never writes a tool call or a think block on its own, and the
    parsing path must still be tested end to end."""

    def __init__(self, server, text: str):
        self.llm, self.ids = server.llm, server.llm.tokenizer.encode(text) + [server.llm.tokenizer.eos_id]

    def __enter__(self):
        real = self.llm._sample
        ids = self.ids

        def scripted(sched, items, drafts_of, logits):
            out = real(sched, items, drafts_of, logits)
            return [(toks if not toks else [ids[min(it.seq.num_output_tokens, len(ids) - 1)]], None)
                    for it, (toks, _) in zip(sched, out)]

        self.llm._sample = scripted
        return self

    def __exit__(self, *exc):
        del self.llm._sample
