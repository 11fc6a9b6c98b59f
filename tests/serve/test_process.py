"""`mimo serve` as a process: a soak of 1,000 short requests keeps memory and KV flat; SIGTERM and SIGINT shut
down gracefully (in-flight requests finish, new connections are refused, exit 0)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

MSG = [{"role": "user", "content": "add 1 2"}]


def start(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "mimo.cli", "serve", "--port", "0", *flags], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 60
    for line in p.stdout:
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
            break
        assert time.monotonic() < deadline, "server did not start"
    else:
        raise AssertionError(f"server exited with {p.wait()}")
    threading.Thread(target=p.stdout.read, daemon=True).start()  # keep draining its output
    return p, url


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for the server's RSS")
def test_soak_of_1000_requests_keeps_kv_empty_and_rss_flat():
    p, url = start()
    try:
        client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=8))

        def one(i):
            body = {"messages": [{"role": "user", "content": f"add {i % 97} {i % 13}"}], "max_tokens": 3,
                    "temperature": 0, "stream": i % 2 == 0}
            r = client.post(url + "/v1/chat/completions", json=body)
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(100))) == {200}
            after_100 = rss_kb(p.pid)
            assert set(pool.map(one, range(100, 1000))) == {200}
        after_1000 = rss_kb(p.pid)
        info = client.get(url + "/server_info").json()
        assert info["num_running"] == 0 and info["num_waiting"] == 0 and info["kv_usage"] == 0.0
        metrics = client.get(url + "/metrics").text
        done = sum(float(v) for v in re.findall(r'mimo:request_success_total\{[^}]*\} ([0-9.e+]+)', metrics))
        assert done == 1000
        assert after_1000 <= 1.10 * after_100, (after_100, after_1000)
    finally:
        p.terminate()
        assert p.wait(30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_requests_finish_then_exits_0(sig):
    p, url = start()
    body = {"model": "mimo-tiny", "messages": MSG, "max_tokens": 60, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        lines.append(next(it))
        p.send_signal(sig)
        lines += list(it)
    lines = [x for x in lines if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert p.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
