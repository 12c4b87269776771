"""``GET /label/{feedback_set_id}``: the labeling page. Plain HTML and JavaScript, no build step.

Kept as a string in a module (not a file under static/) so it ships in every install of the package, wheel or
editable, without package-data rules. The page talks to the public REST API only (``/next``, ``/labels``, the
set itself) with the annotator's API key, which it keeps in ``sessionStorage`` (gone when the tab closes).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>alignd · labeling</title>
<style>
  :root { --ink: #1d2330; --muted: #667085; --line: #d0d5dd; --accent: #2952cc; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
         background: var(--bg); }
  header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 24px; display: flex;
           gap: 16px; align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  #progress { color: var(--muted); font-size: 14px; }
  main { max-width: 920px; margin: 24px auto; padding: 0 16px; }
  .panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
           margin-bottom: 16px; }
  label { display: block; font-weight: 600; margin: 8px 0 4px; }
  input { font: inherit; padding: 8px 10px; width: 100%; border: 1px solid var(--line); border-radius: 6px; }
  button { font: inherit; padding: 8px 16px; border-radius: 6px; border: 1px solid var(--line);
           background: #fff; cursor: pointer; }
  button.primary { background: var(--accent); color: #fff; border-color: var(--accent); }
  button:disabled { opacity: .45; cursor: not-allowed; }
  .prompt { white-space: pre-wrap; }
  .prompt .role { color: var(--muted); font-size: 13px; text-transform: uppercase; }
  .responses { display: grid; gap: 12px; }
  .response { position: relative; background: #fff; border: 2px solid var(--line); border-radius: 8px;
              padding: 12px 16px 12px 56px; cursor: pointer; white-space: pre-wrap; text-align: left;
              width: 100%; }
  .response:hover { border-color: #98a2b3; }
  .response.ranked { border-color: var(--accent); background: #eef3ff; }
  .response .key { position: absolute; left: 12px; top: 12px; width: 30px; height: 30px; border-radius: 50%;
                   border: 1px solid var(--line); display: grid; place-items: center; font-weight: 700;
                   color: var(--muted); background: #fff; }
  .response .rank { position: absolute; right: 12px; top: 10px; font-weight: 700; color: var(--accent); }
  .actions { display: flex; gap: 8px; margin-top: 16px; flex-wrap: wrap; align-items: center; }
  .hint { color: var(--muted); font-size: 14px; }
  #error { color: #b42318; white-space: pre-wrap; }
  .hidden { display: none; }
</style>
</head>
<body>
<header>
  <h1>alignd labeling <span id="set-name" class="hint"></span></h1>
  <span id="progress" data-testid="progress"></span>
</header>
<main>
  <div id="error" role="alert" data-testid="error"></div>

  <form id="login" class="panel" data-testid="login">
    <p>Rank the answers to each prompt from best to worst. Your name is recorded with your labels.</p>
    <label for="annotator">Your name</label>
    <input id="annotator" name="annotator" autocomplete="username" required maxlength="128">
    <label for="apikey">API key <span class="hint">(kept in this tab only; leave empty if none)</span></label>
    <input id="apikey" name="apikey" type="password" autocomplete="off">
    <div class="actions"><button class="primary" type="submit" data-testid="start">Start</button></div>
  </form>

  <details id="guidelines" class="panel hidden" data-testid="guidelines" open><summary>Guidelines</summary><div id="guidelines-text"></div></details>
  <section id="work" class="hidden">
    <div class="panel">
      <div class="hint">Prompt</div>
      <div id="prompt" class="prompt" data-testid="prompt"></div>
    </div>
    <div id="responses" class="responses" data-testid="responses"></div>
    <div class="actions">
      <button id="submit" class="primary" type="button" disabled data-testid="submit">Submit (Enter)</button>
      <button id="reset" type="button" data-testid="reset">Reset (Backspace)</button>
      <button id="skip" type="button" data-testid="skip">Skip (S)</button>
      <span class="hint">Click the answers best first, or press their numbers.</span>
    </div>
  </section>

  <section id="done" class="panel hidden" data-testid="done">
    <strong>Nothing left for you in this set.</strong> Thank you!
  </section>
</main>
<script>
"use strict";
const SET_ID = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const API = "/v1/feedback-sets/" + encodeURIComponent(SET_ID);
const KEYS = "1234567890";  // key i picks the i-th answer shown; answers past the tenth are clicked
let annotator = sessionStorage.getItem("alignd.annotator") || "";
let apiKey = sessionStorage.getItem("alignd.apiKey") || "";
let item = null;
let order = [];  // response ids, best first
let busy = false;

const $ = (id) => document.getElementById(id);

function showError(message) { $("error").textContent = message || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    if (response.status === 401) {
      sessionStorage.removeItem("alignd.apiKey");
      $("login").classList.remove("hidden");
      $("work").classList.add("hidden");
    }
    throw new Error((error.code ? error.code + ": " : "") + (error.message || response.statusText));
  }
  return body;
}

async function refreshProgress() {
  const set = await api(API);
  $("set-name").textContent = "· " + set.name;
  renderGuidelines(set.guidelines || "");
  const p = set.progress;
  const mine = item ? item.labelled_by_you : null;
  $("progress").textContent =
    (mine !== null ? "You: " + mine + " labelled · " : "") +
    "Set: " + p.items_complete + " of " + p.items + " items complete, " + p.labels + " labels";
}

// Markdown as DOM nodes built with textContent only (headings, list items, paragraphs; **bold** shown plain):
// nothing in the guidelines is ever parsed as HTML, so they cannot inject markup or script.
function renderGuidelines(markdown) {
  const box = $("guidelines-text");
  box.textContent = "";
  $("guidelines").classList.toggle("hidden", !markdown.trim());
  for (const line of markdown.split("\\n")) {
    const heading = /^(#{1,6})\\s+(.*)$/.exec(line), bullet = /^\\s*[-*+]\\s+(.*)$/.exec(line);
    const node = document.createElement(heading ? "h" + Math.min(heading[1].length + 2, 6) : bullet ? "li" : "p");
    node.textContent = (heading ? heading[2] : bullet ? bullet[1] : line).replace(/\\*\\*|__|`/g, "");
    if (node.textContent.trim()) box.append(node);
  }
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.textContent = "";
  if (typeof prompt === "string") { box.textContent = prompt; return; }
  for (const message of prompt) {
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = message.role;
    const content = document.createElement("div");
    content.textContent = message.content;
    box.append(role, content);
  }
}

function render() {
  renderPrompt(item.prompt);
  const list = $("responses");
  list.textContent = "";
  item.responses.forEach((response, i) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "response";
    card.dataset.id = response.id;
    card.dataset.testid = "response";
    card.setAttribute("data-testid", "response");
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = i < KEYS.length ? KEYS[i] : "";
    const rank = document.createElement("span");
    rank.className = "rank";
    const text = document.createElement("span");
    text.textContent = response.text;
    card.append(key, rank, text);
    card.addEventListener("click", () => pick(response.id));
    list.append(card);
  });
  update();
}

function update() {
  for (const card of document.querySelectorAll(".response")) {
    const position = order.indexOf(card.dataset.id);
    card.classList.toggle("ranked", position >= 0);
    card.querySelector(".rank").textContent = position >= 0 ? "#" + (position + 1) : "";
  }
  $("submit").disabled = busy || !item || order.length !== item.responses.length;
}

function pick(id) {
  if (!item || busy) return;
  const at = order.indexOf(id);
  if (at >= 0) { order = order.slice(0, at); update(); return; }  // clicking a ranked answer re-ranks from it
  order.push(id);
  if (order.length === item.responses.length - 1) {  // the last one is implied
    order.push(item.responses.map((r) => r.id).find((r) => !order.includes(r)));
  }
  update();
}

async function loadNext() {
  showError("");
  order = [];
  item = await api(API + "/next?annotator=" + encodeURIComponent(annotator));
  if (item === null) {
    $("work").classList.add("hidden");
    $("done").classList.remove("hidden");
  } else {
    $("done").classList.add("hidden");
    $("work").classList.remove("hidden");
    render();
  }
  await refreshProgress();
}

async function send(body) {
  if (busy) return;
  busy = true;
  update();
  try {
    await api(API + "/labels", { method: "POST", body: JSON.stringify(body) });
    await loadNext();
  } catch (error) {
    showError(error.message);
  } finally {
    busy = false;
    update();
  }
}

function submit() {
  if (item && order.length === item.responses.length) {
    send({ item: item.id, annotator: annotator, ranking: order });
  }
}

function skip() { if (item) send({ item: item.id, annotator: annotator, skip: true }); }

$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", skip);
$("reset").addEventListener("click", () => { order = []; update(); });

document.addEventListener("keydown", (event) => {
  if (!item || event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const index = KEYS.indexOf(event.key);
  if (index >= 0 && index < item.responses.length) { pick(item.responses[index].id); event.preventDefault(); }
  else if (event.key === "Enter") { submit(); event.preventDefault(); }
  else if (event.key === "Backspace") { order = order.slice(0, -1); update(); event.preventDefault(); }
  else if (event.key === "s" || event.key === "S") { skip(); event.preventDefault(); }
});

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  annotator = $("annotator").value.trim();
  apiKey = $("apikey").value.trim();
  if (!annotator) return;
  sessionStorage.setItem("alignd.annotator", annotator);
  sessionStorage.setItem("alignd.apiKey", apiKey);
  $("login").classList.add("hidden");
  try { await loadNext(); } catch (error) { showError(error.message); }
});

if (annotator) {
  $("annotator").value = annotator;
  $("login").classList.add("hidden");
  loadNext().catch((error) => showError(error.message));
}
</script>
</body>
</html>
"""


@router.get("/label/{feedback_set_id}", response_class=HTMLResponse, include_in_schema=False)
def label_page(feedback_set_id: str) -> HTMLResponse:
    # The page is the same for every set: it reads the id from its URL and asks the API (with the key the
    # annotator types) for everything else, so serving it needs no key and reveals nothing.
    del feedback_set_id
    return HTMLResponse(
        PAGE,
        headers={
            "Cache-Control": "no-store",
            # Everything is inline; nothing may be loaded from elsewhere or framed.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )
