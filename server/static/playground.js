// The chat playground. It talks to this server's public API exactly as any OpenAI client would:
// GET /v1/models for the model list, POST /v1/chat/completions with stream=true, reading the
// server-sent events as they arrive. No dependencies, so the page works without internet access.
"use strict";

const $ = (id) => document.getElementById(id);

// The conversation as sent to the model (without the system prompt), oldest first.
const history = [];
// The AbortController of the answer being streamed, or null when idle.
let running = null;
// Counts "New conversation" clicks, so that an answer cut short by one stays out of the next conversation.
let conversationId = 0;

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

// An API error as {status, message, type, param, code}, from OpenAI's envelope when the body has one.
async function apiError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON: fall back to the status line
  }
  const error = body && body.error ? body.error : { message: response.statusText || "Request failed" };
  return { status: response.status, ...error };
}

// One line naming everything the envelope says, e.g. "400 invalid_request_error · param temperature".
function errorDetails(error) {
  return [
    error.status ? String(error.status) : null,
    error.type || null,
    error.param ? "param " + error.param : null,
    error.code !== undefined && error.code !== null && String(error.code) !== String(error.status)
      ? "code " + error.code : null,
  ].filter(Boolean).join(" \u00b7 ");
}

async function loadModels() {
  const select = $("model");
  const status = $("model-status");
  const previous = select.value;
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) throw await apiError(response);
    const models = (await response.json()).data;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === previous)) select.value = previous;
    const chosen = models.find((m) => m.id === select.value);
    status.textContent = chosen ? `context ${chosen.max_model_len} tokens` : "no model is ready";
    status.classList.toggle("error", !chosen);
  } catch (error) {
    status.textContent = `Could not list models: ${error.message} ${errorDetails(error)}`.trim();
    status.classList.add("error");
    if (error.status === 503) setTimeout(loadModels, 2000); // still loading: try again shortly
  }
}

// Yields the data of each server-sent event of `body` (a ReadableStream of bytes) as it arrives.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop(); // an incomplete last line waits for more bytes
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } // other fields (event:, id:) and comments (":...") are not used by this API
    }
  }
  if (data.length) yield data.join("\n");
}

function requestBody() {
  const system = $("system-prompt").value.trim();
  const body = {
    messages: system ? [{ role: "system", content: system }, ...history] : [...history],
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("model").value) body.model = $("model").value;
  // Fields left empty are left to the server's defaults; bad values come back as 400s naming them.
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
  return body;
}

// Appends a message to the page; returns its parts so that a streamed answer can fill them in.
function addMessage(role, text) {
  const conversation = $("conversation");
  conversation.querySelector(".empty")?.remove();
  const root = document.createElement("div");
  root.className = "message " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  root.append(label, body);
  conversation.append(root);
  conversation.scrollTop = conversation.scrollHeight;
  return { root, body };
}

function showError(view, error) {
  const box = document.createElement("div");
  box.className = "error";
  const message = document.createElement("strong");
  message.textContent = error.message || String(error);
  box.append(message);
  const details = errorDetails(error);
  if (details) {
    const code = document.createElement("code");
    code.textContent = details;
    box.append(document.createElement("br"), code);
  }
  view.root.append(box);
}

// Time to first token, and decode speed: the tokens after the first over the time after the first.
function showStats(view, { started, firstAt, lastAt, tokens, finish }) {
  const stats = document.createElement("div");
  stats.className = "stats";
  const add = (cls, text, title) => {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    if (title) span.title = title;
    stats.append(span);
  };
  const span = (lastAt - firstAt) / 1000;
  add("ttft", `TTFT ${((firstAt - started) / 1000).toFixed(2)} s`, "time from sending to the first token");
  add("tokens", `${tokens} tokens`);
  add("speed", tokens > 1 && span > 0 ? `${((tokens - 1) / span).toFixed(1)} tok/s` : "\u2014 tok/s",
      "tokens after the first / time after the first token");
  if (finish) add("finish", `finish: ${finish}`);
  view.root.append(stats);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  const conversation = conversationId;
  history.push({ role: "user", content: text });
  const question = addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.root.classList.add("streaming");
  running = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstAt = null;
  let lastAt = null;
  let content = "";
  let pieces = 0;
  let usage = null;
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: running.signal,
    });
    if (!response.ok) throw await apiError(response);
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw chunk.error; // errors after the stream began come in-band
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        lastAt = performance.now();
        if (firstAt === null) firstAt = lastAt;
        content += choice.delta.content;
        pieces += 1;
        answer.body.textContent = content;
        $("conversation").scrollTop = $("conversation").scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
    } else {
      showError(answer, error);
      finish = null;
      content = ""; // a failed answer is not part of the conversation
    }
  } finally {
    answer.root.classList.remove("streaming");
    running = null;
    setBusy(false);
  }
  if (conversation !== conversationId) return; // cleared meanwhile
  if (content) {
    history.push({ role: "assistant", content });
    showStats(answer, { started, firstAt, lastAt, tokens: usage ? usage.completion_tokens : pieces, finish });
  } else {
    // Nothing came back: take the question out of the conversation and give its text back to edit.
    history.pop();
    question.root.classList.add("dropped");
    answer.root.classList.add("dropped");
    if (!answer.root.querySelector(".error")) answer.body.textContent = finish ? `(${finish})` : "(empty answer)";
    if (!$("prompt").value) $("prompt").value = text;
  }
}

function clearConversation() {
  if (running) running.abort();
  conversationId += 1;
  history.length = 0;
  const empty = document.createElement("p");
  empty.className = "empty";
  empty.textContent = "New conversation.";
  $("conversation").replaceChildren(empty);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", clearConversation);
$("api-key").addEventListener("change", loadModels);
$("settings").addEventListener("submit", (event) => event.preventDefault());
loadModels();
