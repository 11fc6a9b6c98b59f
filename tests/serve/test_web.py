"""The web chat page (`GET /`) in a real headless Chromium, driven by Selenium, against a real server.

The browser is the system's Chromium and chromedriver (Debian: `apt-get install chromium chromium-driver`,
which `make browser` does when run as root). Without them the tests skip, except as root or under `CI=true`,
where a missing browser is a failure.

The default model answers in a handful of tokens, too few to watch a reply grow or to stop one, so the tests
that need a long reply add `ignore_eos: true` to the page's request (a wrapper around `window.fetch`). The
error and rendering tests answer the page's request from a stub inside the page, so they do not depend on what
the model writes. Set `MIMO_UPDATE_SCREENSHOT=1` to rewrite `docs/images/chat.png`.
"""

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from tests.serve.conftest import scripted_output

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "chat.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ------------------------------------------------------------------------------------------ fixtures


def _missing_browser(reason: str):
    if os.environ.get("CI", "").lower() == "true" or os.geteuid() == 0:
        pytest.fail(f"{reason}; install it with `make browser` (apt-get install chromium chromium-driver)")
    pytest.skip(f"{reason}; as root, `make browser` installs it")


@pytest.fixture(scope="module")
def driver():
    binary = next((p for p in map(shutil.which, BROWSERS) if p), None)
    chromedriver = shutil.which("chromedriver")
    if binary is None or chromedriver is None:
        _missing_browser(f"no {'Chromium' if binary is None else 'chromedriver'} found on PATH")
    profile = tempfile.mkdtemp(prefix="mimo-web-test-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,800", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    except WebDriverException as err:
        shutil.rmtree(profile, ignore_errors=True)
        _missing_browser(f"Chromium did not start: {err.msg}")
    # a fixed viewport, whatever the window decorations take
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------ helpers


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_for(condition, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def console_errors(drv) -> list[dict]:
    """Browser console entries at level SEVERE since the last call (reading the log drains it)."""
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def open_page(drv, server) -> None:
    """A fresh page: no stored settings, no conversation, server info loaded."""
    drv.get(server.url + "/")
    drv.execute_script("localStorage.clear()")
    drv.refresh()
    wait_for(lambda: drv.find_element(By.ID, "model-name").text not in ("", "…"), what="the model list")
    console_errors(drv)  # start each test with an empty log


# Records the request bodies the page sends to /v1/chat/completions in window.__requests; with
# window.__ignoreEos set, adds ignore_eos (the tiny model otherwise ends after a few tokens).
RECORD_REQUESTS = """
window.__requests = [];
window.__ignoreEos = arguments[0];
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (url === "/v1/chat/completions") {
    const body = JSON.parse(options.body);
    window.__requests.push(body);
    if (window.__ignoreEos) options = {...options, body: JSON.stringify({...body, ignore_eos: true})};
  }
  return realFetch(url, options);
};
"""

# Answers /v1/chat/completions inside the page: status, then the body as byte chunks (lists of ints), each
# its own read of the body.
STUB_REPLY = """
const [status, chunks] = arguments;
window.fetch = async (url, options) => {
  const stream = new ReadableStream({
    async start(controller) {
      for (const c of chunks) {
        controller.enqueue(new Uint8Array(c));
        await new Promise((r) => setTimeout(r, 0));
      }
      controller.close();
    },
  });
  const type = status === 200 ? "text/event-stream" : "application/json";
  return new Response(stream, {status, headers: {"Content-Type": type}});
};
"""


def sse(*events) -> bytes:
    """SSE `data:` lines; JSON keeps non-ASCII characters as raw UTF-8 bytes, as the server sends them."""
    raw = [e if isinstance(e, bytes) else json.dumps(e, ensure_ascii=False).encode() for e in events]
    return b"".join(b"data: " + e + b"\n\n" for e in raw)


def delta(**fields) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


def state_of(msg) -> str:
    return msg.get_attribute("data-state")


def last_reply(drv):
    replies = drv.find_elements(By.CSS_SELECTOR, ".message.assistant")
    return replies[-1] if replies else None


def send_message(drv, text: str) -> None:
    box = drv.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_finished(drv, timeout: float = 120.0):
    return wait_for(lambda: (m := last_reply(drv)) is not None and state_of(m) in ("done", "stopped", "error") and m,
                    timeout, what="the reply to finish")


def set_field(drv, element_id: str, value) -> None:
    """Set a settings input the way typing would, firing the events the page listens to."""
    drv.execute_script(
        "const e = document.getElementById(arguments[0]);"
        "if (e.type === 'checkbox') e.checked = arguments[1]; else e.value = String(arguments[1]);"
        "e.dispatchEvent(new Event('input', {bubbles: true}));"
        "e.dispatchEvent(new Event('change', {bubbles: true}));", element_id, value)


def open_settings(drv) -> None:
    if not drv.find_element(By.ID, "settings").is_displayed():
        drv.find_element(By.ID, "settings-toggle").click()
    wait_for(lambda: drv.find_element(By.ID, "settings").is_displayed(), 5, what="the settings panel")


# ------------------------------------------------------------------------------------------ tests


def test_page_loads_local_assets_and_server_settings(driver, server):
    html = urllib.request.urlopen(server.url + "/", timeout=30).read().decode()
    assert 'id="input"' in html and "/static/app.js" in html
    open_page(driver, server)
    assert driver.title == "MiMo chat"
    assert "10M-parameter demo model" in driver.find_element(By.ID, "demo-note").text
    models = [m["id"] for m in get_json(server.url + "/v1/models")["data"]]
    info = get_json(server.url + "/server_info")
    assert driver.find_element(By.ID, "model-name").text == models[0]
    # every asset came from this server: nothing from the network
    origin = server.url.rstrip("/")
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert any(r.endswith("/static/style.css") for r in resources)
    assert all(r.startswith(origin) for r in resources), resources
    # the draft slider spans 0 .. the server's maximum and starts at the maximum
    open_settings(driver)
    drafts = driver.find_element(By.ID, "drafts")
    assert int(drafts.get_attribute("max")) == info["num_speculative_tokens"]
    assert int(drafts.get_attribute("value")) == info["num_speculative_tokens"]
    assert int(driver.find_element(By.ID, "max-tokens").get_attribute("max")) == info["max_model_len"]
    assert console_errors(driver) == []


def test_streamed_reply_grows_and_shows_stats(driver, server):
    open_page(driver, server)
    driver.execute_script(RECORD_REQUESTS, True)
    open_settings(driver)
    set_field(driver, "max-tokens", 300)
    set_field(driver, "drafts", 0)  # one token per step: the most chunks
    driver.find_element(By.ID, "settings-close").click()

    box = driver.find_element(By.ID, "input")
    box.send_keys("hello")
    box.send_keys(Keys.SHIFT, Keys.ENTER)  # Shift+Enter: a new line, nothing sent
    box.send_keys("there")
    assert box.get_attribute("value") == "hello\nthere"
    assert driver.find_elements(By.CSS_SELECTOR, ".message.user") == []
    box.send_keys(Keys.ENTER)

    user = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".message.user"), 10, what="the user message")
    assert user[-1].text == "hello\nthere"
    assert box.get_attribute("value") == ""
    assert driver.find_element(By.ID, "stop").is_displayed()

    # poll the reply while it streams: its text must grow through several non-empty lengths
    lengths = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state, n = driver.execute_script(
            "const m = [...document.querySelectorAll('.message.assistant')].pop();"
            "return [m.dataset.state, m.querySelector('.content').textContent.length];")
        if state == "streaming" and n:
            lengths.add(n)
        if state in ("done", "stopped", "error"):
            break
        time.sleep(0.005)
    reply = last_reply(driver)
    assert state_of(reply) == "done", reply.text
    assert len(lengths) >= 2, f"saw the reply at lengths {sorted(lengths)} only"
    assert reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")

    stats = reply.find_element(By.CSS_SELECTOR, ".stats")
    assert stats.is_displayed()
    assert "300 tokens" in stats.text  # usage.completion_tokens: ignore_eos runs to max_tokens
    assert "tok/s" in stats.text and "hit max tokens" in stats.text
    assert not driver.find_element(By.ID, "stop").is_displayed()
    assert driver.find_element(By.ID, "send").is_displayed()

    body = driver.execute_script("return window.__requests")[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hello\nthere"}]
    assert body["max_tokens"] == 300 and body["num_speculative_tokens"] == 0
    assert body["chat_template_kwargs"] == {"enable_thinking": False}

    # a second turn sends the whole conversation back, drafting allowed: the stats show the acceptance length
    # whenever the server verified drafts for it (adaptive drafting may decide a short reply is not worth it)
    info = get_json(server.url + "/server_info")
    set_field(driver, "max-tokens", 40)
    set_field(driver, "drafts", info["num_speculative_tokens"])
    send_message(driver, "sort 5 3 9 1")
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2, 10, what="reply 2")
    reply = wait_finished(driver)
    assert state_of(reply) == "done"
    body = driver.execute_script("return window.__requests")[-1]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["num_speculative_tokens"] == info["num_speculative_tokens"]
    verified = get_json(server.url + "/server_info")["spec_verify_steps"] > info["spec_verify_steps"]
    assert ("acceptance length" in reply.find_element(By.CSS_SELECTOR, ".stats").text) == verified

    # New chat empties the view and the history
    driver.find_element(By.ID, "new-chat").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
    assert driver.find_element(By.ID, "empty-state").is_displayed()
    set_field(driver, "max-tokens", 8)
    send_message(driver, "reverse hello")
    wait_finished(driver)
    assert len(driver.execute_script("return window.__requests")[-1]["messages"]) == 1
    assert console_errors(driver) == []


def test_stop_button_aborts_a_long_reply(driver, idle):
    server = idle
    open_page(driver, server)
    driver.execute_script(RECORD_REQUESTS, True)
    open_settings(driver)
    set_field(driver, "max-tokens", 4000)  # clamped to max_model_len; seconds of generation with ignore_eos
    driver.find_element(By.ID, "settings-close").click()
    send_message(driver, "tell me a long story")
    reply = wait_for(lambda: last_reply(driver), 10, what="the reply")
    wait_for(lambda: state_of(reply) == "streaming"
             and reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent"), 60,
             what="streamed text")
    assert server.llm.has_unfinished_requests()
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: state_of(reply) == "stopped", 10, what="the reply to stop")
    # the aborted fetch closed the connection, and the server dropped the request
    wait_for(lambda: not server.llm.has_unfinished_requests(), 3, what="the server to abort the request")
    content = reply.find_element(By.CSS_SELECTOR, ".content")
    stopped_at = content.get_attribute("textContent")
    assert stopped_at
    time.sleep(0.5)
    assert content.get_attribute("textContent") == stopped_at  # nothing arrives after Stop
    assert reply.find_element(By.CSS_SELECTOR, ".stats").text.startswith("Stopped")
    assert not driver.find_element(By.ID, "stop").is_displayed()

    # the page stays usable: the next message is answered, and the stopped text is part of the history
    driver.execute_script("window.__ignoreEos = false")
    set_field(driver, "max-tokens", 16)
    send_message(driver, "reverse hello")
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2, 10, what="reply 2")
    reply2 = wait_finished(driver, 60)
    assert state_of(reply2) == "done"
    messages = driver.execute_script("return window.__requests")[-1]["messages"]
    # (the raw text of the stopped reply: the page shows it rendered, so compare only its shape)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[1]["content"].strip()
    assert console_errors(driver) == []


def test_settings_persist_and_thinking(driver, server):
    open_page(driver, server)
    info = get_json(server.url + "/server_info")
    open_settings(driver)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 24)
    driver.find_element(By.ID, "thinking").click()
    drafts = min(1, info["num_speculative_tokens"])
    set_field(driver, "drafts", drafts)

    driver.refresh()  # settings live in localStorage
    wait_for(lambda: driver.find_element(By.ID, "model-name").text not in ("", "…"), what="the model list")
    driver.execute_script(RECORD_REQUESTS, False)
    open_settings(driver)
    assert driver.find_element(By.ID, "thinking").is_selected()
    assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == "24"
    assert driver.find_element(By.ID, "drafts").get_attribute("value") == str(drafts)
    assert driver.find_element(By.ID, "temperature-value").text == "0.00"
    driver.find_element(By.ID, "settings-close").click()
    assert not driver.find_element(By.ID, "settings").is_displayed()

    # the tiny model never writes a think block on its own: script what the engine samples (the template,
    # the detokeniser and the server's reasoning parser all run for real)
    with scripted_output(server, "Reverse the letters one by one.\n</think>\n\nolleh"):
        send_message(driver, "reverse hello")
        reply = wait_finished(driver, 60)
    assert state_of(reply) == "done"
    body = driver.execute_script("return window.__requests")[-1]
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 24 and body["num_speculative_tokens"] == drafts
    thinking = reply.find_element(By.CSS_SELECTOR, "details.thinking")
    assert thinking.get_attribute("open") is None  # collapsed once the answer started
    assert thinking.find_element(By.CSS_SELECTOR, "summary").text.startswith("Thought for")
    text = thinking.find_element(By.CSS_SELECTOR, ".thinking-text").get_attribute("textContent")
    assert text == "Reverse the letters one by one."
    assert reply.find_element(By.CSS_SELECTOR, ".content").text == "olleh"
    thinking.find_element(By.CSS_SELECTOR, "summary").click()  # and it opens on a click
    assert thinking.get_attribute("open") is not None
    assert thinking.find_element(By.CSS_SELECTOR, ".thinking-text").text == text
    # the history sent back holds the answer, not the reasoning
    with scripted_output(server, "Done.\n</think>\n\nok"):
        send_message(driver, "thanks")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2, 10, what="reply 2")
        wait_finished(driver, 60)
    assert driver.execute_script("return window.__requests")[-1]["messages"][1] == {
        "role": "assistant", "content": "olleh"}
    assert console_errors(driver) == []


def test_utf8_split_across_reads_and_markdown_is_escaped(driver, server):
    open_page(driver, server)
    text = ("héllo 世界 🎉 done\n\n```python\nprint('<b>x</b>')\n```\n"
            "<img src=x onerror=\"window.__pwned = 1\"> use `a < b` and **bold**")
    body = sse(delta(role="assistant"), *[delta(content=text[i:i + 7]) for i in range(0, len(text), 7)], b"[DONE]")
    assert len(body) > len(body.decode())  # raw UTF-8 on the wire, not JSON escapes
    chunks = [list(body[i:i + 3]) for i in range(0, len(body), 3)]  # splits multi-byte characters
    driver.execute_script(STUB_REPLY, 200, chunks)
    send_message(driver, "show me")
    reply = wait_finished(driver, 30)
    content = reply.find_element(By.CSS_SELECTOR, ".content")
    assert content.find_element(By.CSS_SELECTOR, "p").text == "héllo 世界 🎉 done"
    assert content.find_element(By.CSS_SELECTOR, "pre code").get_attribute("textContent") == "print('<b>x</b>')"
    assert content.find_elements(By.CSS_SELECTOR, "img, b") == []
    assert driver.execute_script("return window.__pwned") is None
    assert '<img src=x onerror="window.__pwned = 1">' in content.text
    assert [c.text for c in content.find_elements(By.CSS_SELECTOR, "p code")] == ["a < b"]
    assert content.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert console_errors(driver) == []


def test_errors_are_shown_in_the_conversation(driver, server):
    open_page(driver, server)
    error = {"error": {"message": "max_tokens is too large for this model", "type": "BadRequestError", "code": 400}}
    driver.execute_script(STUB_REPLY, 400, [list(json.dumps(error).encode())])
    send_message(driver, "hello")
    reply = wait_finished(driver, 10)
    assert state_of(reply) == "error"
    assert "max_tokens is too large for this model" in reply.find_element(By.CSS_SELECTOR, ".error").text
    assert "400" in reply.find_element(By.CSS_SELECTOR, ".error").text

    # an error after the stream started keeps the text that came before it
    chunks = sse(delta(role="assistant"), delta(content="partial answer"), {"error": {"message": "engine failed"}},
                 b"[DONE]")
    driver.execute_script(STUB_REPLY, 200, [list(chunks)])
    send_message(driver, "again")
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2, 10, what="reply 2")
    reply = wait_finished(driver, 10)
    assert state_of(reply) == "error"
    assert reply.find_element(By.CSS_SELECTOR, ".content").text == "partial answer"
    assert reply.find_element(By.CSS_SELECTOR, ".error").text == "engine failed"
    assert driver.find_element(By.ID, "send").is_displayed()
    assert console_errors(driver) == []


def test_api_key_from_settings(driver):
    from mimo.serve.server import ServeConfig, start_background

    srv = start_background(ServeConfig(port=0, api_key="web-test-key"))
    try:
        driver.get(srv.url + "/")
        driver.execute_script("localStorage.clear()")
        driver.refresh()
        notice = wait_for(lambda: driver.find_elements(By.ID, "server-notice"), 30, what="the API-key notice")[0]
        assert "API key" in notice.text
        assert driver.find_element(By.ID, "settings").is_displayed()  # opened for the key
        key = driver.find_element(By.ID, "api-key")
        key.send_keys("web-test-key")
        key.send_keys(Keys.TAB)  # change: stored, and the server asked again with the key
        wait_for(lambda: driver.find_element(By.ID, "model-name").text == "mimo-tiny", 30, what="the model list")
        assert driver.find_elements(By.ID, "server-notice") == []
        assert driver.execute_script("return localStorage.getItem('mimo.chat.apiKey')") == "web-test-key"
        driver.find_element(By.ID, "settings-close").click()
        send_message(driver, "reverse hello")
        assert state_of(wait_finished(driver, 60)) == "done"
        # the only console errors are the 401 answers before the key was entered
        errors = console_errors(driver)
        assert errors and all("401" in e["message"] for e in errors), errors
    finally:
        driver.execute_script("localStorage.clear()")
        srv.stop()


def test_screenshot(driver, server, tmp_path):
    """A short real conversation with the default model; writes docs/images/chat.png when asked to."""
    open_page(driver, server)
    open_settings(driver)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 32)
    driver.find_element(By.ID, "settings-close").click()
    for prompt in ("reverse hello", "sort 5 3 9 1", "add 382 47"):
        n = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
        send_message(driver, prompt)
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) == n + 1, 10,
                 what="the reply")
        assert state_of(wait_finished(driver, 60)) == "done"
    driver.find_element(By.ID, "input").send_keys("reverse world")
    time.sleep(0.3)
    path = tmp_path / "chat.png"
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MIMO_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOT)
    assert console_errors(driver) == []
