// #/models and #/datasets: what the tenant has uploaded; datasets can be uploaded here too, and a refused
// upload shows the server's report, line by line.
import { ApiError, getJSON, listAll } from "../api.js";
import { age, busy, bytes, clear, errorBox, field, h, number, panel, showError, sortableTable } from "../ui.js";

const KINDS = ["sft", "preference", "prompts", "ranking", "candidates"];

function listView(root, signal, { title, path, columns, empty, extra }) {
  const error = errorBox(null);
  const box = h("div", null, h("p", { class: "muted", text: "Loading…" }));
  let rows = [];
  let sort = { key: "created", dir: "desc" };
  const draw = () => clear(box, sortableTable({ label: title, rows, columns, sort, empty, onSort: (next) => { sort = next; draw(); } }));
  const load = async () => {
    try {
      rows = await listAll(path, { signal });
      draw();
    } catch (failure) {
      showError(error, failure);
    }
  };
  root.append(h("div", { class: "page-head" }, h("h1", { text: title })), ...(extra ? [extra(load)] : []), error, panel("All " + title.toLowerCase(), box));
  load();
}

export function renderModels(root, signal) {
  listView(root, signal, {
    title: "Models",
    path: "/v1/models",
    empty: "No models yet: upload a Hugging Face folder with POST /v1/models or `client.models.upload`.",
    columns: [
      { key: "name", label: "Name", value: (m) => m.name },
      { key: "id", label: "Id", value: (m) => m.id, cellClass: "mono" },
      { key: "architecture", label: "Architecture", value: (m) => m.architecture },
      { key: "params", label: "Parameters", value: (m) => m.num_parameters, render: (m) => number(m.num_parameters, 4), numeric: true },
      { key: "size", label: "Size", value: (m) => m.size_bytes, render: (m) => bytes(m.size_bytes), numeric: true },
      { key: "status", label: "Status", value: (m) => m.status },
      { key: "created", label: "Age", value: (m) => m.created_at, render: (m) => age(m.created_at) },
    ],
  });
}

function reportTable(details) {
  return sortableTable({
    label: "Problems found (line numbers in the file)",
    rows: details,
    sort: { key: "line", dir: "asc" },
    onSort: () => {},
    columns: [
      { key: "line", label: "Line", value: (d) => d.line, numeric: true, sortable: false },
      { key: "code", label: "Code", value: (d) => d.code, cellClass: "mono", sortable: false },
      { key: "message", label: "Message", value: (d) => d.message, sortable: false },
    ],
  });
}

function uploadForm(reload) {
  const file = h("input", { type: "file", accept: ".jsonl,application/jsonl,application/x-ndjson,text/plain", required: true });
  const kind = h("select", null, KINDS.map((k) => h("option", { value: k, text: k })));
  const name = h("input", { type: "text", maxLength: 256, placeholder: "the file's name" });
  const button = h("button", { type: "submit", class: "primary", text: "Upload and validate" });
  const error = errorBox(null);
  const report = h("div");
  const done = h("p", { role: "status" });
  const form = h(
    "form",
    null,
    h("div", { class: "row" }, field("JSONL file", file), field("Kind", kind), field("Name", name)),
    error,
    report,
    button,
    done,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!file.files.length) return;
    clear(report);
    done.textContent = "";
    busy(button, error, async () => {
      const body = new FormData();
      body.append("kind", kind.value);
      if (name.value.trim()) body.append("name", name.value.trim());
      body.append("file", file.files[0]);
      try {
        const dataset = await getJSON("/v1/datasets", { method: "POST", form: body });
        done.textContent = "Stored " + dataset.id + ": " + dataset.num_records + " records, sha256 " + dataset.sha256 + ".";
        form.reset();
        reload();
      } catch (failure) {
        if (failure instanceof ApiError && failure.details.some((d) => d.line !== undefined)) {
          clear(report, reportTable(failure.details));
        }
        throw failure;
      }
    });
  });
  return panel("Upload a dataset", h("p", { class: "muted small", text: "Validated line by line on the server; a file with any bad line is refused whole, with every bad line listed." }), form);
}

export function renderDatasets(root, signal) {
  listView(root, signal, {
    title: "Datasets",
    path: "/v1/datasets",
    empty: "No datasets yet.",
    extra: uploadForm,
    columns: [
      { key: "name", label: "Name", value: (d) => d.name },
      { key: "id", label: "Id", value: (d) => d.id, cellClass: "mono" },
      { key: "kind", label: "Kind", value: (d) => d.kind },
      { key: "records", label: "Records", value: (d) => d.num_records, numeric: true },
      { key: "size", label: "Size", value: (d) => d.size_bytes, render: (d) => bytes(d.size_bytes), numeric: true },
      { key: "from", label: "From", value: (d) => d.job || d.feedback_set || "upload", cellClass: "mono" },
      { key: "round", label: "Round", value: (d) => d.round, numeric: true },
      { key: "sha256", label: "sha256", value: (d) => d.sha256, cellClass: "hash mono", sortable: false },
      { key: "created", label: "Age", value: (d) => d.created_at, render: (d) => age(d.created_at) },
    ],
  });
}

