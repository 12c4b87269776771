// #/jobs: the job list, live over GET /v1/jobs as server-sent events (the page, then every change).
import { follow } from "../api.js";
import { age, clear, errorBox, field, h, jobLink, keepFocus, progressBar, routeParams, showError, sortableTable, statusBadge } from "../ui.js";

export const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
export const METHODS = ["sft", "reward_model", "dpo", "ppo", "grpo", "rloo", "rlhf", "generate", "evaluate", "chat"];
const LIMIT = 100;

function select(labelText, options, value, onChange) {
  const control = h(
    "select",
    { onchange: () => onChange(control.value) },
    h("option", { value: "", text: "all" }),
    options.map((option) => h("option", { value: option, text: option, selected: option === value })),
  );
  return field(labelText, control);
}

function setFilter(name, value) {
  const params = routeParams();
  if (value) params.set(name, value);
  else params.delete(name);
  const query = params.toString();
  location.hash = "#/jobs" + (query ? "?" + query : "");
}

export function renderJobs(root, signal) {
  const params = routeParams();
  const status = params.get("status") || "";
  const method = params.get("method") || "";
  const jobs = new Map();
  let sort = { key: "created", dir: "desc" };
  const error = errorBox(null);
  const live = h("span", { class: "muted small", role: "status", text: "connecting…" });
  const tableBox = h("div");

  const draw = () => keepFocus(() => {
    const rows = [...jobs.values()].filter((job) => !method || job.method === method);
    clear(
      tableBox,
      sortableTable({
        label: "Jobs" + (status ? " (" + status + ")" : "") + (method ? " · " + method : ""),
        rows,
        sort,
        onSort: (next) => {
          sort = next;
          draw();
        },
        rowKey: (job) => job.id,
        empty: "No jobs yet: submit one with POST /v1/jobs, the SDK or the CLI.",
        columns: [
          { key: "id", label: "Job", value: (j) => j.name || j.id, render: (j) => [jobLink(j), j.name ? h("div", { class: "muted small mono", text: j.id }) : null] },
          { key: "status", label: "Status", value: (j) => j.status, render: (j) => statusBadge(j.status) },
          { key: "method", label: "Method", value: (j) => j.method },
          { key: "stage", label: "Stage", value: (j) => j.stage },
          { key: "progress", label: "Progress", value: (j) => j.progress, render: (j) => progressBar(j.progress, "progress of " + j.id) },
          { key: "round", label: "Round", value: (j) => j.round, numeric: true },
          { key: "created", label: "Age", value: (j) => j.created_at, render: (j) => h("span", { title: new Date(j.created_at * 1000).toLocaleString(), text: age(j.created_at) }) },
        ],
      }),
    );
  });

  root.append(
    h("div", { class: "page-head" }, h("h1", { text: "Jobs" }), live),
    h(
      "div",
      { class: "panel" },
      h(
        "div",
        { class: "row", role: "group", "aria-label": "Filters" },
        select("Status", STATUSES, status, (value) => setFilter("status", value)),
        select("Method", METHODS, method, (value) => setFilter("method", value)),
      ),
      error,
      tableBox,
    ),
  );
  draw();

  let pending = false;
  const query = new URLSearchParams({ limit: String(LIMIT) });
  if (status) query.set("status", status);
  follow("/v1/jobs?" + query, {
    signal,
    onOpen: () => {
      live.textContent = "live";
      showError(error, null);
    },
    onEvent: (event, job) => {
      if (event !== "job") return;
      // A job that left the status filter is sent once more with its new status: drop it from the view.
      if (status && job.status !== status) jobs.delete(job.id);
      else jobs.set(job.id, job);
      if (!pending) {
        pending = true;
        requestAnimationFrame(() => {
          pending = false;
          draw();
        });
      }
    },
    onError: (failure) => {
      live.textContent = "reconnecting…";
      showError(error, failure);
    },
  });
  // Ages move on even when nothing else does.
  const timer = setInterval(draw, 15000);
  signal.addEventListener("abort", () => clearInterval(timer));
}
