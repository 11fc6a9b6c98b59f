// MiMo chat: a single-page client for the server's OpenAI-compatible /v1/chat/completions.
// Plain JavaScript, no dependencies. Model output is untrusted text: it only ever reaches the page
// through textContent / createTextNode, never through innerHTML.
"use strict";

(() => {
  const SETTINGS_KEY = "mimo.chat.settings";
  const API_KEY_KEY = "mimo.chat.apiKey";
  const DEFAULTS = { temperature: 0.8, maxTokens: 512, thinking: false, drafts: null, model: "" };

  const $ = (id) => document.getElementById(id);
  const el = {
    messages: $("messages"),
    conversation: $("conversation"),
    empty: $("empty-state"),
    form: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    settings: $("settings"),
    settingsToggle: $("settings-toggle"),
    settingsClose: $("settings-close"),
    model: $("model"),
    modelName: $("model-name"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    maxTokens: $("max-tokens"),
    maxTokensHelp: $("max-tokens-help"),
    thinking: $("thinking"),
    drafts: $("drafts"),
    draftsValue: $("drafts-value"),
    draftsHelp: $("drafts-help"),
    apiKey: $("api-key"),
  };

  const state = {
    history: [],         // completed turns sent back to the server: {role, content}
    controller: null,    // AbortController of the reply being streamed
    settings: loadSettings(),
    maxDrafts: 0,
    maxModelLen: null,
  };

  // ---------------------------------------------------------------- settings

  function loadSettings() {
    try {
      const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
      return { ...DEFAULTS, ...(saved && typeof saved === "object" ? saved : {}) };
    } catch {
      return { ...DEFAULTS };
    }
  }

  function saveSettings() {
    try {
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
    } catch {
      // storage can be unavailable (private mode, quota): settings then last for this page only
    }
  }

  function apiKey() {
    try {
      return localStorage.getItem(API_KEY_KEY) || "";
    } catch {
      return "";
    }
  }

  function draftsSetting() {
    const d = state.settings.drafts;
    return d === null || d === undefined ? state.maxDrafts : Math.max(0, Math.min(state.maxDrafts, d));
  }

  function renderSettings() {
    const s = state.settings;
    el.temperature.value = String(s.temperature);
    el.temperatureValue.textContent = Number(s.temperature).toFixed(2);
    el.maxTokens.value = String(s.maxTokens);
    el.thinking.checked = Boolean(s.thinking);
    el.drafts.max = String(state.maxDrafts);
    el.drafts.value = String(draftsSetting());
    el.drafts.disabled = state.maxDrafts === 0;
    el.draftsValue.textContent = String(draftsSetting());
    el.draftsHelp.textContent = state.maxDrafts === 0
      ? "This server has no MTP drafting."
      : `Tokens the MTP heads draft per step: 0 (off) to ${state.maxDrafts}.`;
    el.apiKey.value = apiKey();
  }

  function bindSettings() {
    el.temperature.addEventListener("input", () => {
      state.settings.temperature = Number(el.temperature.value);
      el.temperatureValue.textContent = state.settings.temperature.toFixed(2);
      saveSettings();
    });
    el.maxTokens.addEventListener("change", () => {
      let n = Math.floor(Number(el.maxTokens.value));
      if (!Number.isFinite(n) || n < 1) n = DEFAULTS.maxTokens;
      if (state.maxModelLen) n = Math.min(n, state.maxModelLen);
      state.settings.maxTokens = n;
      el.maxTokens.value = String(n);
      saveSettings();
    });
    el.thinking.addEventListener("change", () => {
      state.settings.thinking = el.thinking.checked;
      saveSettings();
    });
    el.drafts.addEventListener("input", () => {
      state.settings.drafts = Number(el.drafts.value);
      el.draftsValue.textContent = el.drafts.value;
      saveSettings();
    });
    el.model.addEventListener("change", () => {
      state.settings.model = el.model.value;
      el.modelName.textContent = el.model.value;
      saveSettings();
    });
    el.apiKey.addEventListener("change", () => {
      try {
        localStorage.setItem(API_KEY_KEY, el.apiKey.value.trim());
      } catch {
        // see saveSettings
      }
      loadServer();
    });
    el.settings.addEventListener("submit", (e) => e.preventDefault());
    el.settingsToggle.addEventListener("click", () => toggleSettings());
    el.settingsClose.addEventListener("click", () => toggleSettings(false));
    document.addEventListener("click", (e) => {  // a click outside the open panel closes it
      if (!el.settings.hidden && !el.settings.contains(e.target) && !el.settingsToggle.contains(e.target)) {
        toggleSettings(false);
      }
    });
  }

  function toggleSettings(open) {
    const show = open === undefined ? el.settings.hidden : open;
    el.settings.hidden = !show;
    el.settingsToggle.setAttribute("aria-expanded", String(show));
  }

  // ---------------------------------------------------------------- server

  function headers(extra) {
    const h = { ...(extra || {}) };
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function errorMessage(response) {
    // OpenAI envelope {"error": {"message"}}, the older flat {"message"}, FastAPI's {"detail"}, or plain text
    const text = await response.text().catch(() => "");
    let message = "";
    try {
      const body = JSON.parse(text);
      if (body && body.error) message = typeof body.error === "string" ? body.error : body.error.message;
      else if (body && body.message) message = body.message;
      else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch {
      message = text.trim();
    }
    const status = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
    return message ? `${message} (${status})` : status;
  }

  async function loadServer() {
    let notice = "";
    try {
      const [info, models] = await Promise.all([
        fetch("/server_info", { headers: headers() }),
        fetch("/v1/models", { headers: headers() }),
      ]);
      if (info.status === 401 || models.status === 401) {
        notice = "This server needs an API key: enter it in Settings.";
        toggleSettings(true);
      } else {
        if (info.ok) {
          const data = await info.json();
          state.maxDrafts = Math.max(0, Number(data.num_speculative_tokens) || 0);
          state.maxModelLen = Number(data.max_model_len) || null;
        }
        if (models.ok) fillModels((await models.json()).data || []);
        else notice = `Could not list models: ${await errorMessage(models)}`;
      }
    } catch (err) {
      notice = `Could not reach the server: ${err.message}`;
    }
    if (state.maxModelLen) {
      el.maxTokens.max = String(state.maxModelLen);
      el.maxTokensHelp.textContent = `Upper limit on the length of a reply (the context holds ${state.maxModelLen} tokens).`;
    }
    renderSettings();
    showNotice(notice);
  }

  function fillModels(list) {
    const ids = list.map((m) => m.id).filter(Boolean);
    el.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    const chosen = ids.includes(state.settings.model) ? state.settings.model : ids[0] || "";
    el.model.value = chosen;
    el.modelName.textContent = chosen || "no model";
  }

  function showNotice(text) {
    let box = document.getElementById("server-notice");
    if (!text) {
      if (box) box.remove();
      return;
    }
    if (!box) {
      box = document.createElement("p");
      box.id = "server-notice";
      box.className = "server-notice";
      box.setAttribute("role", "alert");
      el.conversation.prepend(box);
    }
    box.textContent = text;
  }

  // ---------------------------------------------------------------- Markdown-ish rendering

  // Blocks: ``` fenced code (an unclosed fence runs to the end: the reply may still be streaming),
  // # headings, - / 1. lists, > quotes, paragraphs (a single newline is a line break).
  function renderMarkdown(text, target) {
    const out = [];
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;

    const flushPara = () => {
      if (!para.length) return;
      const p = document.createElement("p");
      para.forEach((line, i) => {
        if (i) p.appendChild(document.createElement("br"));
        appendInline(p, line);
      });
      out.push(p);
      para = [];
    };
    const flushList = () => {
      if (list) out.push(list.node);
      list = null;
    };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
      if (fence) {
        flushPara();
        flushList();
        const code = [];
        const close = new RegExp(`^\\s*${fence[1][0] === "`" ? "`" : "~"}{${fence[1].length},}\\s*$`);
        let j = i + 1;
        while (j < lines.length && !close.test(lines[j])) code.push(lines[j++]);
        out.push(codeBlock(code.join("\n"), fence[2]));
        i = j;
        continue;
      }
      if (!line.trim()) {
        flushPara();
        flushList();
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flushPara();
        flushList();
        const h = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
        appendInline(h, heading[2]);
        out.push(h);
        continue;
      }
      const item = line.match(/^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/);
      if (item) {
        flushPara();
        const ordered = !item[1];
        if (!list || list.ordered !== ordered) {
          flushList();
          list = { ordered, node: document.createElement(ordered ? "ol" : "ul") };
          if (ordered && item[2] !== "1") list.node.start = Number(item[2]);
        }
        const li = document.createElement("li");
        appendInline(li, item[3]);
        list.node.appendChild(li);
        continue;
      }
      const quote = line.match(/^>\s?(.*)$/);
      if (quote) {
        flushPara();
        flushList();
        const last = out[out.length - 1];
        const bq = last && last.tagName === "BLOCKQUOTE" ? last : document.createElement("blockquote");
        if (bq !== last) out.push(bq);
        else bq.appendChild(document.createElement("br"));
        appendInline(bq, quote[1]);
        continue;
      }
      if (list && /^\s{2,}\S/.test(line)) {  // continuation of a list item
        const li = list.node.lastChild;
        li.appendChild(document.createElement("br"));
        appendInline(li, line.trim());
        continue;
      }
      flushList();
      para.push(line);
    }
    flushPara();
    flushList();
    target.replaceChildren(...out);
  }

  function codeBlock(code, lang) {
    const wrap = document.createElement("div");
    wrap.className = "code-block";
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const label = document.createElement("span");
    label.textContent = lang || "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(code, copy));
    bar.append(label, copy);
    const pre = document.createElement("pre");
    const codeEl = document.createElement("code");
    if (lang) codeEl.className = `language-${lang}`;
    codeEl.textContent = code;
    pre.appendChild(codeEl);
    wrap.append(bar, pre);
    return wrap;
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  // Inline: `code`, **bold**, *italic*, [text](http(s) link). Everything else stays literal text.
  const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w*])\*(?=\S)([^*]*?\S)\*(?![\w*])|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function appendInline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      let node;
      if (m[1]) {
        node = document.createElement("code");
        node.textContent = m[2].replace(/^ (.*) $/, "$1");
      } else if (m[3] !== undefined) {
        node = document.createElement("strong");
        appendInline(node, m[3]);
      } else if (m[4] !== undefined) {
        node = document.createElement("em");
        appendInline(node, m[4]);
      } else {
        node = document.createElement("a");
        node.href = m[6];
        node.target = "_blank";
        node.rel = "noopener noreferrer";
        node.textContent = m[5];
      }
      parent.appendChild(node);
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  // ---------------------------------------------------------------- conversation view

  function scrollToBottom(force) {
    const c = el.conversation;
    const nearBottom = c.scrollHeight - c.scrollTop - c.clientHeight < 120;
    if (force || nearBottom) c.scrollTop = c.scrollHeight;
  }

  function addUserMessage(text) {
    const li = document.createElement("li");
    li.className = "message user";
    li.dataset.testid = "message-user";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    li.appendChild(bubble);
    el.messages.appendChild(li);
    el.empty.hidden = true;
    scrollToBottom(true);
    return li;
  }

  function addAssistantMessage() {
    const li = document.createElement("li");
    li.className = "message assistant";
    li.dataset.testid = "message-assistant";
    li.dataset.state = "waiting";
    const avatar = document.createElement("div");
    avatar.className = "avatar";
    avatar.setAttribute("aria-hidden", "true");
    avatar.textContent = "M";
    const body = document.createElement("div");
    body.className = "message-body";
    const content = document.createElement("div");
    content.className = "content markdown";
    content.dataset.testid = "content";
    const typing = document.createElement("div");
    typing.className = "typing";
    typing.setAttribute("aria-label", "waiting for the reply");
    typing.append(document.createElement("span"), document.createElement("span"), document.createElement("span"));
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.dataset.testid = "stats";
    stats.hidden = true;
    body.append(content, typing, stats);
    li.append(avatar, body);
    el.messages.appendChild(li);
    scrollToBottom(true);
    return { li, body, content, typing, stats, thinking: null, thinkingText: null };
  }

  function ensureThinking(view) {
    if (view.thinking) return;
    const details = document.createElement("details");
    details.className = "thinking";
    details.dataset.testid = "thinking";
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const text = document.createElement("div");
    text.className = "thinking-text";
    details.append(summary, text);
    view.body.insertBefore(details, view.content);
    view.thinking = details;
    view.thinkingSummary = summary;
    view.thinkingText = text;
  }

  function showError(view, message) {
    const box = document.createElement("div");
    box.className = "error";
    box.dataset.testid = "error";
    box.setAttribute("role", "alert");
    box.textContent = message;
    view.body.insertBefore(box, view.stats);
  }

  function setStreaming(on) {
    el.stop.hidden = !on;
    el.send.hidden = on;
    updateSendEnabled();
  }

  function updateSendEnabled() {
    el.send.disabled = Boolean(state.controller) || !el.input.value.trim();
  }

  function autoGrow() {
    el.input.style.height = "auto";
    el.input.style.height = `${Math.min(el.input.scrollHeight, 220)}px`;
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    el.messages.replaceChildren();
    el.empty.hidden = false;
    el.input.value = "";
    autoGrow();
    updateSendEnabled();
    el.input.focus();
  }

  // ---------------------------------------------------------------- streaming a reply

  // Reads an SSE body and calls onEvent(parsed JSON) per `data:` line; resolves at [DONE] or end of body.
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");  // stream: true keeps a character split across reads intact
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = done ? "" : lines.pop();
      let finished = false;
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;  // blank separators, comments, event: lines
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          finished = true;
          break;
        }
        if (data) onEvent(JSON.parse(data));
      }
      onEvent(null);  // end of one network read: a good moment to re-render
      if (finished || done) {
        if (finished) reader.cancel().catch(() => {});
        return;
      }
    }
  }

  async function send(text) {
    if (state.controller || !text.trim()) return;
    addUserMessage(text);
    const history = state.history;  // "New chat" replaces it; a reply still finishing then lands in the old one
    const turn = { role: "user", content: text };
    history.push(turn);
    const view = addAssistantMessage();
    const controller = new AbortController();
    state.controller = controller;
    setStreaming(true);

    const s = state.settings;
    const body = {
      model: el.model.value || undefined,
      messages: history.slice(),
      stream: true,
      stream_options: { include_usage: true },
      temperature: s.temperature,
      max_tokens: s.maxTokens,
      chat_template_kwargs: { enable_thinking: Boolean(s.thinking) },
      num_speculative_tokens: draftsSetting(),
    };

    const t0 = performance.now();
    let tFirst = null;
    let tLast = null;
    let content = "";
    let reasoning = "";
    let dirty = false;
    let usage = null;
    let mimo = null;
    let finishReason = null;
    let failed = false;

    const render = () => {
      if (!dirty) return;
      dirty = false;
      if (view.thinkingText) view.thinkingText.textContent = reasoning;
      renderMarkdown(content, view.content);
      scrollToBottom(false);
    };

    const onEvent = (event) => {
      if (event === null) return render();
      if (event.error) {
        failed = true;
        showError(view, event.error.message || String(event.error));
        return;
      }
      if (event.usage) usage = event.usage;
      if (event.mimo) mimo = event.mimo;
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (choice.finish_reason) finishReason = choice.finish_reason;
      if (delta.reasoning_content) {
        ensureThinking(view);
        reasoning += delta.reasoning_content;
      }
      if (delta.content) {
        if (!content && view.thinking) collapseThinking(view, t0);
        content += delta.content;
      }
      if (delta.content || delta.reasoning_content) {
        const now = performance.now();
        if (tFirst === null) {
          tFirst = now;
          view.typing.remove();
          view.li.dataset.state = "streaming";
        }
        tLast = now;
        dirty = true;
      }
    };

    let outcome = "done";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        failed = true;
        showError(view, await errorMessage(response));
      } else {
        await readEvents(response, onEvent);
      }
    } catch (err) {
      if (err.name === "AbortError") {
        outcome = "stopped";
      } else {
        failed = true;
        showError(view, err instanceof SyntaxError
          ? `The server sent something that is not JSON: ${err.message}`
          : `Could not reach the server: ${err.message}`);
      }
    }
    render();
    view.typing.remove();
    if (view.thinking && view.thinking.open && content) collapseThinking(view, t0);
    if (view.thinkingSummary && view.thinkingSummary.textContent === "Thinking…") {
      view.thinkingSummary.textContent = "Thinking";
    }
    if (failed && outcome !== "stopped") outcome = "error";
    view.li.dataset.state = outcome;

    if (content || reasoning) {
      history.push({ role: "assistant", content });
    } else if (outcome !== "done") {
      // nothing came back: drop the unanswered turn so the next message does not follow two user turns
      history.splice(history.indexOf(turn), 1);
    }
    showStats(view, { outcome, t0, tFirst, tLast, usage, mimo, finishReason, empty: !content && !reasoning });
    state.controller = null;
    setStreaming(false);
    el.input.focus();
  }

  function collapseThinking(view, t0) {
    view.thinking.open = false;
    view.thinkingSummary.textContent = `Thought for ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  }

  function showStats(view, r) {
    const parts = [];
    if (r.outcome === "stopped") parts.push("Stopped");
    if (r.usage) {
      const n = r.usage.completion_tokens;
      parts.push(`${n} token${n === 1 ? "" : "s"}`);
      // decode speed as the reader sees it: tokens after the first over the time from first to last token
      const seconds = r.tFirst !== null ? (r.tLast - r.tFirst) / 1000 : 0;
      if (n > 1 && seconds > 0) parts.push(`${((n - 1) / seconds).toFixed(1)} tok/s`);
    }
    if (r.tFirst !== null) parts.push(`first token ${((r.tFirst - r.t0) / 1000).toFixed(2)} s`);
    if (r.mimo && r.mimo.acceptance_length !== null && r.mimo.acceptance_length !== undefined) {
      parts.push(`acceptance length ${Number(r.mimo.acceptance_length).toFixed(2)}`);
    }
    if (r.finishReason === "length") parts.push("hit max tokens");
    if (r.outcome === "done" && r.empty) parts.push("empty reply");
    if (!parts.length) return;
    view.stats.replaceChildren(...parts.map((text) => {
      const span = document.createElement("span");
      span.textContent = text;
      return span;
    }));
    view.stats.hidden = false;
  }

  // ---------------------------------------------------------------- wiring

  function submit() {
    const text = el.input.value;
    if (!text.trim() || state.controller) return;
    el.input.value = "";
    autoGrow();
    send(text);
  }

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  el.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  el.input.addEventListener("input", () => {
    autoGrow();
    updateSendEnabled();
  });
  el.stop.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      if (state.controller) state.controller.abort();
      else if (!el.settings.hidden) toggleSettings(false);
    }
  });
  el.newChat.addEventListener("click", newChat);
  for (const button of document.querySelectorAll(".suggestion")) {
    button.addEventListener("click", () => {
      if (state.controller) return;
      send(button.dataset.prompt);
    });
  }

  bindSettings();
  renderSettings();
  loadServer();
  el.input.focus();
})();
