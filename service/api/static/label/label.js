// The labeling page: ranks one item at a time through the public REST API with the annotator's key
// (sessionStorage: gone when the tab closes; sent as a bearer token, never in a URL).
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
  for (const line of markdown.split("\n")) {
    const heading = /^(#{1,6})\s+(.*)$/.exec(line), bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const node = document.createElement(heading ? "h" + Math.min(heading[1].length + 2, 6) : bullet ? "li" : "p");
    node.textContent = (heading ? heading[2] : bullet ? bullet[1] : line).replace(/\*\*|__|`/g, "");
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
