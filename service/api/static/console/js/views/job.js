// #/jobs/<id>: one job: its state, stage timeline, live metric charts, events, monitors, settings, artifacts
// (downloads checked against their sha256), pause, resume and cancel.
import { follow, getJSON, postJSON } from "../api.js";
import { LineChart, smoothingControl } from "../charts.js";
import { downloadArtifact } from "../download.js";
import {
  TERMINAL,
  busy,
  bytes,
  clear,
  duration,
  errorBox,
  every,
  field,
  h,
  jobStatusBadge,
  levelBadge,
  panel,
  progressBar,
  settingsTable,
  showError,
  sortableTable,
  when,
} from "../ui.js";

const POLL_MS = 1500;
const DEFAULT_CHARTS = 12; // series shown at first; the chooser shows the rest

export function seriesKey(point) {
  return point.stage ? point.stage + " · " + point.name : point.name;
}

// From its (first) start until it ended, or now, less the time it spent paused: from each pause to its
// resume, or to now while it is paused.
function ranFor(job, events) {
  if (!job.started_at) return "-";
  const end = job.finished_at || Date.now() / 1000;
  let paused = 0;
  let since = null;
  for (const event of events) {
    const marker = pauseMarker(event);
    if (marker === "paused" && since === null) since = Math.max(event.created_at, job.started_at);
    else if (marker === "resumed" && since !== null) {
      paused += Math.max(0, event.created_at - since); // a queued job's pause, before it started: none
      since = null;
    }
  }
  if (since !== null) paused += Math.max(0, end - since);
  return duration(Math.max(0, end - job.started_at - paused));
}

function facts(job, events) {
  const items = [
    ["Status", jobStatusBadge(job)],
    ["Method", job.method],
    ["Stage", job.stage || "-"],
    ["Progress", progressBar(job.progress, "job progress")],
    ["Round", job.round ?? "-"],
    ["Created", when(job.created_at)],
    ["Started", when(job.started_at)],
    ["Finished", when(job.finished_at)],
    ["Ran for", ranFor(job, events)],
    ["Seed", job.seed],
  ];
  if (job.status_reason) items.push(["Why", job.status_reason]);
  return h(
    "dl",
    { class: "facts" },
    items.map(([term, value]) => h("div", null, h("dt", { text: term }), h("dd", null, value))),
  );
}

// The job's pause and resume moments, from the events the server writes then (service/db/jobs.py
// request_pause and resume, workers/lease.py pause): an event has a message, not a kind.
function pauseMarker(event) {
  if (event.message.startsWith("Job paused")) return "paused";
  if (event.message.startsWith("Job resumed")) return "resumed";
  return null;
}

function stageState(job, stages, names, index) {
  if (!stages.get(names[index])) return "pending";
  const later = names.slice(index + 1).some((n) => stages.get(n));
  if (later || job.status === "succeeded") return "done";
  if (TERMINAL.has(job.status)) return job.status === "failed" || stages.get(names[index]).error ? "failed" : "done";
  return job.status === "paused" ? "paused" : "current";
}

// The stages in the order the events first name them, with each pause and resume where it happened; an rlhf
// job's stages still to come are listed as pending (sft -> reward_model -> its rl_method).
function timeline(job, events) {
  const stages = new Map();
  const markers = [];
  events.forEach((event, order) => {
    const marker = pauseMarker(event);
    if (marker) markers.push({ marker, order, at: event.created_at });
    if (!event.stage) return;
    const entry = stages.get(event.stage) || { first: event.created_at, order, error: false };
    entry.error = entry.error || event.level === "error";
    stages.set(event.stage, entry);
  });
  if (job.stage && !stages.has(job.stage)) stages.set(job.stage, { first: job.started_at, order: events.length, error: false });
  // Stored rlhf jobs name their rl_method; a row older than the key ran ppo.
  const planned = job.method === "rlhf" ? ["sft", "reward_model", job.hyperparameters?.rl_method || "ppo"] : [];
  for (const stage of planned) if (!stages.has(stage)) stages.set(stage, null);
  const names = [...stages.keys()];
  const steps = names.map((name, index) => {
    const entry = stages.get(name);
    const state = stageState(job, stages, names, index);
    const note = { current: " · running", paused: " · paused" }[state] || "";
    const item = h(
      "li",
      { class: state, "aria-current": state === "current" || state === "paused" ? "step" : undefined },
      h("strong", { text: name }),
      h("span", { class: "when", text: entry ? when(entry.first) + note : "pending" }),
    );
    return { item, order: entry ? entry.order : events.length + 1 + index };
  });
  for (const { marker, order, at } of markers) {
    steps.push({ item: h("li", { class: marker }, h("strong", { text: marker }), h("span", { class: "when", text: when(at) })), order });
  }
  steps.sort((a, b) => a.order - b.order);
  const items = [h("li", { class: "done" }, h("strong", { text: "queued" }), h("span", { class: "when", text: when(job.created_at) }))];
  items.push(...steps.map((step) => step.item));
  if (TERMINAL.has(job.status)) {
    items.push(h("li", { class: job.status === "succeeded" ? "done" : "failed" }, h("strong", { text: job.status }), h("span", { class: "when", text: when(job.finished_at) })));
  }
  return h("ol", { class: "timeline", "aria-label": "Stage timeline" }, items);
}

function monitorsTable(job) {
  if (!job.monitors?.length) return h("p", { class: "empty", text: "No monitor fired." });
  return sortableTable({
    label: "Monitor alerts",
    rows: job.monitors,
    sort: null,
    onSort: () => {},
    columns: [
      { key: "stage", label: "Stage", value: (m) => m.stage, sortable: false },
      { key: "name", label: "Monitor", value: (m) => m.name, sortable: false },
      { key: "step", label: "Update", value: (m) => m.step, numeric: true, sortable: false },
      { key: "value", label: "Value", value: (m) => m.value, numeric: true, sortable: false },
      { key: "threshold", label: "Threshold", value: (m) => m.threshold, numeric: true, sortable: false },
      { key: "stop", label: "Stopped the job", value: (m) => (m.stop ? "yes" : "no"), sortable: false },
      { key: "message", label: "Message", value: (m) => m.message, sortable: false },
    ],
  });
}

function specSection(job) {
  const spec = {
    base_model: job.base_model,
    datasets: job.datasets,
    init_adapter: job.init_adapter,
    reward_model: job.reward_model,
    init_reward_model: job.init_reward_model,
    lora: job.lora,
  };
  return panel(
    "Settings (resolved)",
    h(
      "div",
      { class: "grid2" },
      settingsTable("Job", spec),
      job.evaluation ? settingsTable("Evaluation", job.evaluation) : settingsTable("Hyperparameters", job.hyperparameters),
    ),
  );
}

// The cancel button and its confirm step (a modal <dialog>: focus moves into it, Escape closes it).
function cancelControl(job, onCancelled) {
  const error = errorBox(null);
  const confirmButton = h("button", { type: "button", class: "danger", text: "Yes, cancel the job" });
  // The safe choice has the focus when the dialog opens: Enter or Escape right away cancels nothing.
  const keep = h("button", { type: "button", text: "Keep it running", autofocus: true });
  const dialog = h(
    "dialog",
    { "aria-labelledby": "cancel-title" },
    h("h2", { id: "cancel-title", text: "Cancel " + (job.name || job.id) + "?" }),
    h("p", { text: "A running job stops within the grace period; what it has not published is lost. This cannot be undone." }),
    error,
    h("div", { class: "row" }, confirmButton, keep),
  );
  keep.addEventListener("click", () => dialog.close());
  confirmButton.addEventListener("click", async () => {
    confirmButton.disabled = true;
    try {
      onCancelled(await postJSON("/v1/jobs/" + encodeURIComponent(job.id) + "/cancel"));
      dialog.close();
    } catch (failure) {
      showError(error, failure);
    } finally {
      confirmButton.disabled = false;
    }
  });
  const open = h("button", { type: "button", class: "danger", text: "Cancel job", onclick: () => dialog.showModal() });
  return h("div", null, open, dialog);
}

// Pause (queued or running) and resume (paused, or a pause still pending), with a line saying what the job
// does meanwhile. No confirm step: either is undone by the other, nothing is lost but the step in flight.
// `onChanged` gets the job the API answered with; an error (409 job_cancelling, ...) goes to `error`.
function pauseControl(job, onChanged, error) {
  const pausing = job.status === "running" && job.pause_requested;
  const canResume = job.status === "paused" || pausing;
  const say = {
    paused: "Paused: it holds no worker; Resume continues from its newest checkpoint.",
    pausing: "Pausing: training stops after its next step, once a checkpoint is saved. Resume withdraws the pause.",
  }[pausing ? "pausing" : job.status];
  const button = h("button", {
    type: "button",
    text: canResume ? "Resume job" : "Pause job",
    title: canResume ? undefined : "Stops at the next step after saving a checkpoint, and frees its worker",
    "data-action": "pause",
  });
  button.addEventListener("click", () =>
    busy(button, error, async () => {
      const action = canResume ? "/resume" : "/pause";
      onChanged(await postJSON("/v1/jobs/" + encodeURIComponent(job.id) + action), true);
    }),
  );
  return [button, say ? h("span", { class: "muted small", role: "status", text: say }) : null];
}

// The page head's links and buttons, in three boxes redrawn apart and only when what they offer changes, not
// on every poll: neither the keyboard focus nor an open cancel dialog is thrown away, and a redrawn pause
// button takes the focus back (`refocus`: it was just used, and a disabled button may have lost the focus).
function jobActions() {
  const linksBox = h("div", { class: "row" });
  const pauseBox = h("div", { class: "row" });
  const cancelBox = h("div");
  const error = errorBox(null);
  let drawnStatus = null;
  let drawnPause = null;
  const draw = (job, update, refocus) => {
    const pauseState = TERMINAL.has(job.status) ? "none" : job.status + ":" + Boolean(job.pause_requested);
    if (pauseState !== drawnPause) {
      drawnPause = pauseState;
      const focused = refocus || pauseBox.contains(document.activeElement);
      clear(pauseBox, pauseState === "none" ? null : pauseControl(job, update, error));
      if (focused) pauseBox.querySelector("button")?.focus();
    }
    if (job.status === drawnStatus) return;
    drawnStatus = job.status;
    const links = [];
    if ((job.method === "evaluate" || job.method === "rlhf") && job.status === "succeeded") {
      links.push(h("a", { class: "button", href: "#/evals/" + encodeURIComponent(job.id), text: "Evaluation results" }));
    }
    links.push(h("a", { class: "button", href: "#/compare?jobs=" + encodeURIComponent(job.id), text: "Compare with…" }));
    clear(linksBox, links);
    if (TERMINAL.has(job.status)) clear(cancelBox);
    else if (!cancelBox.firstChild) clear(cancelBox, cancelControl(job, update));
  };
  return { element: h("div", { class: "row" }, linksBox, pauseBox, cancelBox), error, draw };
}

class MetricCharts {
  constructor(signal) {
    this.points = new Map(); // series key -> {x: [], y: []}
    this.charts = new Map(); // series key -> LineChart
    this.hidden = new Set();
    this.weight = 0;
    this.chooser = h("div", { class: "checks" });
    this.grid = h("div", { class: "charts" });
    this.note = h("p", { class: "empty", text: "No metrics yet." });
    this.pending = false;
    signal.addEventListener("abort", () => this.charts.forEach((chart) => chart.destroy()));
    const all = h("button", { type: "button", text: "Show all", onclick: () => this.showAll(true) });
    const none = h("button", { type: "button", text: "Hide all", onclick: () => this.showAll(false) });
    this.element = panel(
      "Metrics",
      h(
        "div",
        { class: "chart-tools" },
        smoothingControl((weight) => {
          this.weight = weight;
          this.charts.forEach((chart) => chart.setSmoothing(weight));
        }),
        all,
        none,
      ),
      h("fieldset", null, h("legend", { text: "Series" }), this.chooser),
      this.note,
      this.grid,
    );
  }

  add(points) {
    for (const point of points) {
      const key = seriesKey(point);
      let series = this.points.get(key);
      if (!series) {
        series = { x: [], y: [] };
        this.points.set(key, series);
        if (this.points.size > DEFAULT_CHARTS) this.hidden.add(key);
        this.addChoice(key);
      }
      series.x.push(point.step);
      series.y.push(point.value);
    }
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  addChoice(key) {
    const box = h("input", {
      type: "checkbox",
      checked: !this.hidden.has(key),
      onchange: () => {
        if (box.checked) this.hidden.delete(key);
        else this.hidden.add(key);
        this.draw();
      },
    });
    box.dataset.series = key;
    this.chooser.append(h("label", null, box, key));
  }

  showAll(show) {
    for (const key of this.points.keys()) {
      if (show) this.hidden.delete(key);
      else this.hidden.add(key);
    }
    for (const box of this.chooser.querySelectorAll("input")) box.checked = show;
    this.draw();
  }

  draw() {
    this.note.hidden = this.points.size > 0;
    for (const [key, series] of this.points) {
      let chart = this.charts.get(key);
      if (this.hidden.has(key)) {
        chart?.destroy();
        this.charts.delete(key);
        continue;
      }
      if (!chart) {
        chart = new LineChart(this.grid, { title: key, lines: [key] });
        chart.setSmoothing(this.weight);
        this.charts.set(key, chart);
      }
      chart.setData([series.x, series.y]);
    }
  }
}

function eventsLog(signal, jobId, onEvents) {
  const events = [];
  let level = "";
  const body = h("tbody");
  const box = h("div", { class: "log", role: "log", "aria-label": "Events log", tabindex: "0" });
  box.append(h("table", null, h("thead", null, h("tr", null, ["Time", "Level", "Stage", "Message"].map((t) => h("th", { scope: "col", text: t })))), body));
  const row = (event) =>
    h("tr", null, h("td", { class: "when", text: new Date(event.created_at * 1000).toLocaleTimeString() }), h("td", null, levelBadge(event.level)), h("td", { text: event.stage || "" }), h("td", { class: "msg", text: event.message }));
  const redraw = () => clear(body, events.filter((e) => !level || e.level === level).map(row));
  const filter = h(
    "select",
    { onchange: () => { level = filter.value; redraw(); } },
    ["", "info", "warning", "error"].map((value) => h("option", { value, text: value || "all levels" })),
  );
  const error = errorBox(null);
  follow("/v1/jobs/" + encodeURIComponent(jobId) + "/events", {
    signal,
    onEvent: (kind, event) => {
      if (kind !== "event") return;
      events.push(event);
      if (!level || event.level === level) {
        const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
        body.append(row(event));
        if (stick) box.scrollTop = box.scrollHeight;
      }
      onEvents(events);
    },
    onError: (failure) => showError(error, failure),
  });
  return panel("Events", h("div", { class: "row" }, field("Level", filter)), error, box);
}

function artifactsSection(jobId, signal) {
  const box = h("div");
  const error = errorBox(null);
  const status = h("p", { class: "muted small", role: "status" });
  let shown = null; // the artifact ids on screen
  const load = async () => {
    try {
      const page = await getJSON("/v1/jobs/" + encodeURIComponent(jobId) + "/artifacts?limit=100", { signal });
      const signature = page.data.map((a) => a.id).join();
      if (signature === shown) return;
      shown = signature;
      clear(
        box,
        sortableTable({
          label: "Artifacts",
          rows: page.data,
          sort: null,
          onSort: () => {},
          empty: "No artifacts yet.",
          columns: [
            { key: "kind", label: "Kind", value: (a) => a.kind, sortable: false },
            { key: "stage", label: "Stage", value: (a) => a.stage, sortable: false },
            { key: "size", label: "Size", value: (a) => bytes(a.size_bytes), numeric: true, sortable: false },
            { key: "sha256", label: "sha256", value: (a) => a.sha256, cellClass: "hash mono", sortable: false },
            { key: "id", label: "Id", value: (a) => a.id, cellClass: "mono", sortable: false },
            {
              key: "download",
              label: "Download",
              sortable: false,
              render: (a) => {
                const button = h("button", { type: "button", text: "Download", "aria-label": "Download " + a.kind + " " + a.id });
                button.addEventListener("click", () => downloadArtifact(a, button, error, status));
                return button;
              },
            },
          ],
        }),
      );
    } catch (failure) {
      showError(error, failure);
    }
  };
  return { element: panel("Artifacts", error, status, box), load };
}

export async function renderJob(root, signal, jobId) {
  const error = errorBox(null);
  root.append(error);
  let job;
  try {
    job = await getJSON("/v1/jobs/" + encodeURIComponent(jobId), { signal });
  } catch (failure) {
    showError(error, failure);
    return;
  }
  let events = [];
  const headFacts = h("div");
  const title = h("h1");
  const timelineBox = h("div");
  const monitorsBox = h("div");
  const artifacts = artifactsSection(jobId, signal);
  const charts = new MetricCharts(signal);

  const actions = jobActions();
  const update = (next, refocus = false) => {
    const changed = next.status !== job.status || next.stage !== job.stage;
    job = next;
    title.textContent = job.name || job.id;
    clear(headFacts, facts(job, events));
    clear(timelineBox, timeline(job, events));
    clear(monitorsBox, monitorsTable(job));
    if (changed) artifacts.load();
    actions.draw(job, update, refocus);
  };

  root.append(
    h("div", { class: "page-head" }, h("div", null, title, h("div", { class: "muted mono small", text: job.id })), actions.element),
    actions.error,
    h("section", { class: "panel", "aria-label": "Job state" }, headFacts),
    panel("Stages", timelineBox),
    charts.element,
    eventsLog(signal, jobId, (all) => {
      events = all;
      clear(headFacts, facts(job, events)); // "Ran for" leaves out the pauses the events tell of
      clear(timelineBox, timeline(job, events));
    }),
    panel("Monitors", monitorsBox),
    specSection(job),
    artifacts.element,
  );
  update(job);
  artifacts.load();

  follow("/v1/jobs/" + encodeURIComponent(jobId) + "/metrics", {
    signal,
    onEvent: (kind, data) => {
      if (kind === "metrics") charts.add(data.data);
    },
    onError: (failure) => showError(error, failure),
  });
  every(POLL_MS, signal, async () => {
    if (TERMINAL.has(job.status)) return;
    try {
      update(await getJSON("/v1/jobs/" + encodeURIComponent(jobId), { signal }));
    } catch (failure) {
      showError(error, failure);
    }
  });
  // Artifacts appear while a job runs (checkpoints, an rlhf job's stage outputs): look again now and then.
  every(5000, signal, () => {
    if (!TERMINAL.has(job.status)) artifacts.load();
  });
}

