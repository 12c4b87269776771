// #/evals: evaluations (evaluate jobs, and rlhf jobs' final evaluations); #/evals/<id>: one of them: each
// grader's mean and win-rate vs the baseline with their 95% intervals, as charts and a table, and every
// prompt's answers side by side, sortable, worst first.
import { ApiError, getJSON, listAll } from "../api.js";
import { age, clear, errorBox, h, interval, jobLink, number, panel, showError, sortableTable, statusBadge, svg } from "../ui.js";

// Ticks at round values (1, 2 or 5 x 10^k apart), four to seven across [low, high].
function niceTicks(low, high) {
  const raw = (high - low) / 6;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    ticks.push(Math.abs(value) < step * 1e-9 ? 0 : Number(value.toPrecision(12)));
  }
  return ticks;
}

// A dot-and-whisker ("forest") plot: one row per candidate, its estimate and interval on a shared x axis.
export function forestPlot({ label, rows, reference, domain }) {
  const width = 640;
  const left = 150;
  const right = 24;
  const rowHeight = 30;
  const top = 10;
  const height = top + rows.length * rowHeight + 34;
  let [low, high] = domain || [Math.min(...rows.map((r) => r.low)), Math.max(...rows.map((r) => r.high))];
  if (reference !== undefined) [low, high] = [Math.min(low, reference), Math.max(high, reference)];
  if (!(high > low)) [low, high] = [low - 0.5, high + 0.5];
  const pad = (high - low) * 0.05;
  [low, high] = [low - pad, high + pad];
  const x = (value) => left + ((value - low) / (high - low)) * (width - left - right);
  const axisY = top + rows.length * rowHeight + 6;
  const parts = [svg("title", { text: label })];
  parts.push(svg("line", { class: "axis", x1: left, x2: width - right, y1: axisY, y2: axisY }));
  for (const value of niceTicks(low, high)) {
    parts.push(svg("line", { class: "axis", x1: x(value), x2: x(value), y1: axisY, y2: axisY + 5 }));
    parts.push(svg("text", { x: x(value), y: axisY + 18, "text-anchor": "middle", text: number(value, 3) }));
  }
  if (reference !== undefined) {
    parts.push(svg("line", { class: "ref", x1: x(reference), x2: x(reference), y1: top, y2: axisY }));
  }
  rows.forEach((row, i) => {
    const y = top + i * rowHeight + rowHeight / 2;
    const group = svg("g", { "data-candidate": row.name });
    group.append(svg("title", { text: row.name + ": " + number(row.value, 3) + " " + interval(row.low, row.high) }));
    group.append(svg("text", { x: left - 8, y: y + 4, "text-anchor": "end", text: row.name }));
    group.append(svg("line", { class: "ci", x1: x(row.low), x2: x(row.high), y1: y, y2: y }));
    group.append(svg("line", { class: "ci", x1: x(row.low), x2: x(row.low), y1: y - 6, y2: y + 6 }));
    group.append(svg("line", { class: "ci", x1: x(row.high), x2: x(row.high), y1: y - 6, y2: y + 6 }));
    group.append(svg("circle", { class: "dot" + (row.baseline ? " baseline" : ""), cx: x(row.value), cy: y, r: 5 }));
    parts.push(group);
  });
  const summary = rows.map((r) => r.name + " " + number(r.value, 3) + " " + interval(r.low, r.high)).join("; ");
  return h(
    "figure",
    { class: "chart" },
    h("figcaption", null, h("span", { text: label })),
    svg("svg", { class: "forest", viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": label + ": " + summary }, ...parts),
  );
}

function graderNames(result) {
  return [...new Set(result.candidates.flatMap((c) => Object.keys(c.graders)))];
}

function graderCharts(result, grader) {
  const means = result.candidates.map((c) => {
    const g = c.graders[grader];
    return { name: c.name, value: g.mean, low: g.ci_low, high: g.ci_high, baseline: c.name === result.baseline };
  });
  const wins = result.candidates
    .filter((c) => c.name !== result.baseline && c.graders[grader].win_rate !== undefined && c.graders[grader].win_rate !== null)
    .map((c) => {
      const g = c.graders[grader];
      return { name: c.name, value: g.win_rate, low: g.win_rate_ci_low, high: g.win_rate_ci_high };
    });
  const pct = Math.round(result.confidence * 100);
  return panel(
    "Grader " + grader,
    h(
      "div",
      { class: "grid2" },
      forestPlot({ label: grader + ": mean score per candidate, " + pct + "% interval", rows: means }),
      wins.length
        ? forestPlot({ label: grader + ": win-rate vs " + result.baseline + ", " + pct + "% interval", rows: wins, reference: 0.5, domain: [0, 1] })
        : h("p", { class: "empty", text: "Only the baseline: no win-rates." }),
    ),
  );
}

function summaryTable(result) {
  const graders = graderNames(result);
  const columns = [
    { key: "name", label: "Candidate", value: (c) => c.name + (c.name === result.baseline ? " (baseline)" : "") },
    { key: "adapter", label: "Adapter", value: (c) => c.adapter || "base model", cellClass: "mono" },
    { key: "eos", label: "EOS rate", value: (c) => c.eos_rate, numeric: true },
    { key: "length", label: "Mean length", value: (c) => c.mean_length, numeric: true },
    { key: "kl", label: "KL to base", value: (c) => c.kl_to_base, numeric: true },
  ];
  for (const grader of graders) {
    columns.push({ key: grader + ":mean", label: grader + " mean [CI]", numeric: true, sortValue: (c) => c.graders[grader]?.mean, render: (c) => { const g = c.graders[grader]; return g ? number(g.mean, 3) + " " + interval(g.ci_low, g.ci_high) : "-"; } });
    columns.push({ key: grader + ":win", label: grader + " win-rate [CI]", numeric: true, sortValue: (c) => c.graders[grader]?.win_rate, render: (c) => { const g = c.graders[grader]; return g && g.win_rate !== undefined && g.win_rate !== null ? number(g.win_rate, 3) + " " + interval(g.win_rate_ci_low, g.win_rate_ci_high) : "-"; } });
  }
  let sort = null;
  const box = h("div");
  const draw = () => clear(box, sortableTable({ label: "Per candidate", rows: result.candidates, columns, sort, onSort: (next) => { sort = next; draw(); } }));
  draw();
  return box;
}

// GET .../evaluation/prompts rows -> {index, line, prompt, references, answers: {candidate: {answer, scores}}}:
// with several samples per prompt, a candidate's answers are listed together and its scores averaged (as the
// evaluation's statistics average them per prompt).
function normalizeRows(data) {
  return data.map((row) => {
    const grouped = {};
    for (const answer of row.answers) {
      const entry = (grouped[answer.candidate] ||= { texts: [], scores: {}, counts: {}, errors: [] });
      entry.texts.push(answer.answer);
      entry.errors.push(...(answer.grader_errors || []));
      for (const [grader, score] of Object.entries(answer.scores)) {
        entry.scores[grader] = (entry.scores[grader] || 0) + score;
        entry.counts[grader] = (entry.counts[grader] || 0) + 1;
      }
    }
    const answers = {};
    for (const [name, entry] of Object.entries(grouped)) {
      const scores = {};
      for (const grader of Object.keys(entry.scores)) scores[grader] = entry.scores[grader] / entry.counts[grader];
      answers[name] = { answer: entry.texts.join("\n---\n"), scores, errors: entry.errors };
    }
    return { index: row.index, line: row.line, prompt: row.prompt, references: row.references || null, answers };
  });
}

async function allPrompts(jobId, signal) {
  const rows = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: "1000" });
    if (after !== null) query.set("after", String(after));
    const page = await getJSON("/v1/jobs/" + encodeURIComponent(jobId) + "/evaluation/prompts?" + query, { signal });
    rows.push(...page.data);
    if (!page.has_more || page.data.length === 0) return rows;
    after = page.data[page.data.length - 1].index;
  }
}

function promptText(prompt) {
  if (typeof prompt === "string") return prompt;
  if (Array.isArray(prompt)) return prompt.map((m) => m.role + ": " + m.content).join("\n");
  return JSON.stringify(prompt);
}

function answerOf(entry) {
  return entry ? entry.answer : "";
}

function scoreOf(entry, grader) {
  const value = entry?.scores?.[grader];
  return typeof value === "number" ? value : null;
}

function promptsTable(result, rows) {
  const graders = graderNames(result);
  const names = result.candidates.map((c) => c.name);
  const focus = names.find((n) => n !== result.baseline) || names[0];
  const columns = [
    { key: "index", label: "#", value: (r) => r.index + 1, sortValue: (r) => r.index, numeric: true },
    { key: "prompt", label: "Prompt", value: (r) => promptText(r.prompt), cellClass: "prompt" },
  ];
  if (rows.some((r) => r.references && Object.keys(r.references).length)) {
    const references = (r) => Object.entries(r.references || {}).map(([grader, text]) => grader + ": " + text).join("\n");
    columns.push({ key: "references", label: "References", value: references, cellClass: "prompt" });
  }
  for (const name of names) {
    columns.push({ key: name + ":answer", label: name + " answer", value: (r) => answerOf(r.answers[name]), cellClass: "answer" });
    for (const grader of graders) {
      columns.push({ key: name + ":" + grader, label: name + " · " + grader, value: (r) => scoreOf(r.answers[name], grader), numeric: true });
    }
  }
  // Worst first: the first candidate that is not the baseline, by its first grader, lowest score on top.
  let sort = { key: focus + ":" + graders[0], dir: "asc" };
  const box = h("div");
  const note = h("p", { class: "muted small", text: "Sorted worst first by " + focus + " · " + graders[0] + ". Click a column header to sort by it." });
  const draw = () =>
    clear(box, sortableTable({ label: "Per prompt (" + rows.length + " prompts)", rows, columns, sort, rowKey: (r) => String(r.index), onSort: (next) => { sort = next; draw(); } }));
  draw();
  return panel("Answers side by side", note, box);
}

export async function renderEval(root, signal, jobId) {
  const error = errorBox(null);
  root.append(error);
  let job;
  let result;
  try {
    job = await getJSON("/v1/jobs/" + encodeURIComponent(jobId), { signal });
    if (job.status !== "succeeded") {
      // Asking for the evaluation now would be a 409: say what the job is doing instead.
      root.append(h("div", { class: "panel" }, h("h1", { text: "Evaluation of " + (job.name || job.id) }), h("p", null, "The job is ", statusBadge(job.status), "; its evaluation exists once it has succeeded. ", jobLink(job))));
      return;
    }
    if (job.method === "rlhf") {
      // An rlhf job evaluates itself only with final_evaluation and an eval block: look for its eval
      // artifact first rather than ask for an evaluation that is a 404.
      const artifacts = await getJSON("/v1/jobs/" + encodeURIComponent(jobId) + "/artifacts?limit=100", { signal });
      if (!artifacts.data.some((a) => a.kind === "eval")) {
        root.append(h("div", { class: "panel" }, h("h1", { text: "Evaluation of " + (job.name || job.id) }), h("p", null, "This rlhf job ran no final evaluation (its events say why). ", jobLink(job))));
        return;
      }
    }
    result = await getJSON("/v1/jobs/" + encodeURIComponent(jobId) + "/evaluation", { signal });
  } catch (failure) {
    showError(error, failure);
    return;
  }
  root.append(
    h("div", { class: "page-head" }, h("div", null, h("h1", { text: "Evaluation of " + (job.name || job.id) }), h("div", { class: "muted small" }, jobLink(job)))),
    h(
      "section",
      { class: "panel", "aria-label": "Evaluation settings" },
      h(
        "dl",
        { class: "facts" },
        [
          ["Baseline", result.baseline],
          ["Prompts", result.num_prompts],
          ["Samples per prompt", result.num_samples],
          ["Confidence", Math.round(result.confidence * 100) + "%"],
          ["Bootstrap resamples", result.bootstrap_resamples],
          ["Per-prompt artifact", result.per_prompt_artifact || "-"],
        ].map(([term, value]) => h("div", null, h("dt", { text: term }), h("dd", { text: String(value) }))),
      ),
    ),
    ...graderNames(result).map((grader) => graderCharts(result, grader)),
    panel("Candidates", summaryTable(result)),
  );
  const promptsBox = h("div", null, h("p", { class: "muted", text: "Loading the per-prompt table…" }));
  root.append(promptsBox);
  try {
    clear(promptsBox, promptsTable(result, normalizeRows(await allPrompts(jobId, signal))));
  } catch (failure) {
    clear(promptsBox);
    showError(error, failure);
  }
}

export async function renderEvals(root, signal) {
  const error = errorBox(null);
  const box = h("div", null, h("p", { class: "muted", text: "Loading…" }));
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Evaluations" })), error, panel("Evaluate and rlhf jobs", box));
  try {
    const jobs = (await listAll("/v1/jobs", { signal, max: 300 })).filter((job) => job.method === "evaluate" || job.method === "rlhf");
    clear(
      box,
      sortableTable({
        label: "Evaluations",
        rows: jobs,
        sort: null,
        onSort: () => {},
        empty: "No evaluate or rlhf jobs yet.",
        columns: [
          { key: "id", label: "Job", sortable: false, render: (job) => (job.status === "succeeded" ? h("a", { href: "#/evals/" + encodeURIComponent(job.id), text: job.name || job.id }) : jobLink(job)) },
          { key: "method", label: "Method", sortable: false, value: (job) => job.method },
          { key: "status", label: "Status", sortable: false, render: (job) => statusBadge(job.status) },
          { key: "candidates", label: "Candidates", sortable: false, value: (job) => (job.evaluation?.candidates || []).map((c) => c.name).join(", ") || "-" },
          { key: "age", label: "Age", sortable: false, value: (job) => age(job.created_at) },
        ],
      }),
    );
  } catch (failure) {
    if (!(failure instanceof ApiError) || failure.status !== 401) showError(error, failure);
  }
}
