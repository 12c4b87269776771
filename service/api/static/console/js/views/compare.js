// #/compare?jobs=a,b,...: 2 to 5 jobs, one metric overlaid (x = step), live while any of them runs.
import { getJSON } from "../api.js";
import { LineChart, align, smoothingControl } from "../charts.js";
import { TERMINAL, age, clear, errorBox, field, h, jobLink, number, panel, routeParams, showError, sortableTable, statusBadge } from "../ui.js";
import { seriesKey } from "./job.js";

const MIN_JOBS = 2;
const MAX_JOBS = 5;
const REFRESH_MS = 3000;

function picker(root, signal, chosen) {
  const error = errorBox(null);
  const selected = new Set(chosen);
  const go = h("button", { type: "button", class: "primary", text: "Compare selected" });
  const count = h("span", { class: "muted small", role: "status" });
  const sync = () => {
    go.disabled = selected.size < MIN_JOBS || selected.size > MAX_JOBS;
    count.textContent = selected.size + " selected (" + MIN_JOBS + " to " + MAX_JOBS + ")";
  };
  go.addEventListener("click", () => {
    location.hash = "#/compare?jobs=" + [...selected].map(encodeURIComponent).join(",");
  });
  const box = h("div", null, h("p", { class: "muted", text: "Loading jobs…" }));
  const section = panel("Choose runs to compare", error, h("div", { class: "row" }, go, count), box);
  root.append(section);
  sync();
  getJSON("/v1/jobs?limit=100", { signal })
    .then((page) => {
      const jobs = page.data.filter((job) => job.method !== "chat");
      clear(
        box,
        sortableTable({
          label: "Recent jobs",
          rows: jobs,
          sort: null,
          onSort: () => {},
          empty: "No jobs yet.",
          columns: [
            {
              key: "pick",
              label: "Compare",
              sortable: false,
              render: (job) => {
                const box = h("input", {
                  type: "checkbox",
                  checked: selected.has(job.id),
                  "aria-label": "Compare " + (job.name || job.id),
                  onchange: () => {
                    if (box.checked) selected.add(job.id);
                    else selected.delete(job.id);
                    sync();
                  },
                });
                return box;
              },
            },
            { key: "id", label: "Job", sortable: false, render: (job) => jobLink(job) },
            { key: "method", label: "Method", sortable: false, value: (job) => job.method },
            { key: "status", label: "Status", sortable: false, render: (job) => statusBadge(job.status) },
            { key: "age", label: "Age", sortable: false, value: (job) => age(job.created_at) },
          ],
        }),
      );
    })
    .catch((failure) => showError(error, failure));
}

async function loadRun(id, signal) {
  const [job, metrics] = await Promise.all([
    getJSON("/v1/jobs/" + encodeURIComponent(id), { signal }),
    getJSON("/v1/jobs/" + encodeURIComponent(id) + "/metrics", { signal }),
  ]);
  return { job, points: metrics.data };
}

function seriesOf(run, key) {
  const points = run.points.filter((p) => seriesKey(p) === key);
  return { x: points.map((p) => p.step), y: points.map((p) => p.value) };
}

function summary(runs, key) {
  const rows = runs.map((run) => {
    const { y } = seriesOf(run, key);
    return { run, last: y.length ? y[y.length - 1] : null, min: y.length ? Math.min(...y) : null, max: y.length ? Math.max(...y) : null, n: y.length };
  });
  return sortableTable({
    label: "Summary of " + key,
    rows,
    sort: null,
    onSort: () => {},
    columns: [
      { key: "job", label: "Job", sortable: false, render: (r) => jobLink(r.run.job) },
      { key: "status", label: "Status", sortable: false, render: (r) => statusBadge(r.run.job.status) },
      { key: "n", label: "Points", numeric: true, sortable: false, value: (r) => r.n },
      { key: "last", label: "Last", numeric: true, sortable: false, value: (r) => number(r.last) },
      { key: "min", label: "Min", numeric: true, sortable: false, value: (r) => number(r.min) },
      { key: "max", label: "Max", numeric: true, sortable: false, value: (r) => number(r.max) },
    ],
  });
}

export async function renderCompare(root, signal) {
  const ids = (routeParams().get("jobs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Compare runs" })));
  if (ids.length < MIN_JOBS || ids.length > MAX_JOBS) {
    if (ids.length > MAX_JOBS) root.append(h("p", { class: "notice", text: "Pick at most " + MAX_JOBS + " runs." }));
    picker(root, signal, ids.slice(0, MAX_JOBS));
    return;
  }
  const error = errorBox(null);
  root.append(error);
  let runs;
  try {
    runs = await Promise.all(ids.map((id) => loadRun(id, signal)));
  } catch (failure) {
    showError(error, failure);
    return;
  }
  const keys = () => [...new Set(runs.flatMap((run) => run.points.map(seriesKey)))].sort();
  const common = () => keys().filter((key) => runs.every((run) => run.points.some((p) => seriesKey(p) === key)));
  const initial = common().find((key) => key.endsWith("loss")) || common()[0] || keys()[0] || "";
  let metric = initial;
  let weight = 0;
  const metricSelect = h("select", { onchange: () => { metric = metricSelect.value; draw(true); } });
  const fillOptions = () => {
    const shared = new Set(common());
    clear(metricSelect, keys().map((key) => h("option", { value: key, selected: key === metric, text: key + (shared.has(key) ? "" : " (not in every run)") })));
  };
  const chartBox = h("div");
  const summaryBox = h("div");
  let chart = null;
  const draw = (rebuild) => {
    if (rebuild || !chart) {
      chart?.destroy();
      chart = new LineChart(chartBox, { title: metric || "no metric", lines: runs.map((run) => run.job.name || run.job.id), height: 300 });
      chart.setSmoothing(weight);
    }
    chart.setData(align(runs.map((run) => seriesOf(run, metric))));
    clear(summaryBox, summary(runs, metric));
  };
  fillOptions();
  root.append(
    panel(
      "Overlay",
      h(
        "div",
        { class: "chart-tools" },
        field("Metric", metricSelect),
        smoothingControl((value) => {
          weight = value;
          chart?.setSmoothing(value);
        }),
        h("a", { href: "#/compare", text: "Choose other runs" }),
      ),
      chartBox,
    ),
    panel("Runs", summaryBox),
  );
  draw(true);
  signal.addEventListener("abort", () => chart?.destroy());

  // Running jobs grow: fetch what is new (after the last seq seen) every few seconds.
  const timer = setInterval(async () => {
    const open = runs.filter((run) => !TERMINAL.has(run.job.status));
    if (open.length === 0) return;
    try {
      for (const run of open) {
        const after = run.points.length ? run.points[run.points.length - 1].seq : 0;
        const [job, fresh] = await Promise.all([
          getJSON("/v1/jobs/" + encodeURIComponent(run.job.id), { signal }),
          getJSON("/v1/jobs/" + encodeURIComponent(run.job.id) + "/metrics?after=" + after, { signal }),
        ]);
        run.job = job;
        run.points.push(...fresh.data);
      }
      fillOptions();
      draw(false);
    } catch (failure) {
      showError(error, failure);
    }
  }, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}
