// The console's shell: sign-in, navigation and hash routing (#/jobs, #/jobs/<id>, #/compare?jobs=a,b, ...).
// Each view renders into <main> and gets an AbortSignal that fires when it is left: its fetches, streams
// and timers stop with it, so nothing of one view (or one key) outlives it.
import { apiKey, getJSON, onUnauthorized, setApiKey } from "./api.js";
import { clear, errorBox, field, h, showError } from "./ui.js";
import { renderJobs } from "./views/jobs.js";
import { renderJob } from "./views/job.js";
import { renderCompare } from "./views/compare.js";
import { renderEval, renderEvals } from "./views/evals.js";
import { renderFeedbackSet, renderFeedbackSets } from "./views/feedback.js";
import { renderDatasets, renderModels } from "./views/resources.js";
import { renderTry } from "./views/try.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
let config = { auth_required: true, version: "" };
let current = null; // the AbortController of the view on screen

const ROUTES = [
  [/^jobs$/, "jobs", () => renderJobs],
  [/^jobs\/([^/]+)$/, "jobs", (m) => (root, signal) => renderJob(root, signal, m[1])],
  [/^compare$/, "compare", () => renderCompare],
  [/^evals$/, "evals", () => renderEvals],
  [/^evals\/([^/]+)$/, "evals", (m) => (root, signal) => renderEval(root, signal, m[1])],
  [/^feedback$/, "feedback", () => renderFeedbackSets],
  [/^feedback\/([^/]+)$/, "feedback", (m) => (root, signal) => renderFeedbackSet(root, signal, m[1])],
  [/^models$/, "models", () => renderModels],
  [/^datasets$/, "datasets", () => renderDatasets],
  [/^try$/, "try", () => renderTry],
];

function parseRoute() {
  const path = (location.hash.replace(/^#\/?/, "").split("?")[0] || "jobs").replace(/\/$/, "");
  for (const [pattern, section, make] of ROUTES) {
    const match = path.match(pattern);
    if (match) {
      const decoded = match.map((part) => (part === undefined ? part : decodeURIComponent(part)));
      return { section, view: make(decoded) };
    }
  }
  return null;
}

function leaveView() {
  current?.abort();
  current = null;
}

function render() {
  leaveView();
  if (config.auth_required && !apiKey()) {
    renderSignIn();
    return;
  }
  nav.hidden = false;
  signOutButton.hidden = !config.auth_required;
  const route = parseRoute();
  for (const link of nav.querySelectorAll("a")) {
    if (route && link.dataset.section === route.section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  current = new AbortController();
  clear(main);
  if (!route) {
    main.append(h("div", { class: "panel" }, h("h1", { text: "Not found" }), h("p", null, "No page at ", h("code", { text: location.hash }), ". ", h("a", { href: "#/jobs", text: "Go to jobs" }))));
    return;
  }
  route.view(main, current.signal);
}

function renderSignIn(message) {
  leaveView();
  nav.hidden = true;
  signOutButton.hidden = true;
  const input = h("input", { type: "password", name: "apikey", autocomplete: "off", required: true });
  const error = errorBox(null);
  if (message) showError(error, { message });
  const form = h(
    "form",
    { class: "panel signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title", text: "Sign in to alignd" }),
    h("p", { class: "muted", text: "Your API key is kept in this browser tab only (sessionStorage) and sent as a bearer token." }),
    error,
    field("API key", input),
    h("button", { type: "submit", class: "primary", text: "Sign in" }),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setApiKey(key);
    try {
      await getJSON("/v1/jobs?limit=1"); // proves the key before any view uses it
    } catch (failure) {
      setApiKey("");
      showError(error, failure);
      input.focus();
      return;
    }
    render();
    main.focus();
  });
  clear(main, form);
  input.focus();
}

function signOut(message) {
  setApiKey("");
  renderSignIn(message);
}

async function start() {
  try {
    const response = await fetch("/ui/config.json", { cache: "no-store" });
    config = await response.json();
  } catch {
    config = { auth_required: true, version: "" };
  }
  document.getElementById("server-version").textContent = config.version ? "server " + config.version : "";
  onUnauthorized((message) => signOut(message));
  signOutButton.addEventListener("click", () => signOut());
  document.getElementById("skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    main.focus();
  });
  window.addEventListener("hashchange", render);
  render();
}

start();
