// DOM helpers and formatting shared by the views. Text always goes in as text nodes (never innerHTML), so a
// prompt, an answer or a job name is shown, never run.

export function h(tag, props, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") element.className = value;
    else if (key === "text") element.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") {
      element.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key.startsWith("aria-") || key.startsWith("data-") || key === "role" || key === "for") {
      element.setAttribute(key, value === true ? "true" : String(value));
    } else element[key] = value;
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

export function clear(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export function svg(tag, attributes, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "text") element.textContent = value;
    else element.setAttribute(key, String(value));
  }
  for (const child of children) if (child) element.append(child);
  return element;
}

export function panel(title, ...children) {
  const id = "h-" + Math.random().toString(36).slice(2, 9);
  return h("section", { class: "panel", "aria-labelledby": id }, h("h2", { id, text: title }), children);
}

export function errorBox(error) {
  const box = h("div", { class: "error", role: "alert" });
  box.textContent = error ? describe(error) : "";
  box.hidden = !error;
  return box;
}

export function describe(error) {
  if (!error) return "";
  if (error.name === "AbortError") return "";
  return (error.code ? error.code + ": " : "") + (error.message || String(error));
}

export function showError(box, error) {
  box.textContent = describe(error);
  box.hidden = !box.textContent;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusBadge(status) {
  return h("span", { class: "badge " + status, text: status });
}

export function levelBadge(level) {
  return h("span", { class: "badge " + level, text: level });
}

export function progressBar(fraction, label) {
  const value = Math.max(0, Math.min(1, Number(fraction) || 0));
  return h(
    "span",
    { class: "row" },
    h("progress", { max: 1, value, "aria-label": label || "progress" }),
    h("span", { class: "small", text: Math.round(value * 100) + "%" }),
  );
}

export function age(seconds) {
  if (!seconds) return "-";
  const delta = Math.max(0, Date.now() / 1000 - seconds);
  if (delta < 60) return Math.round(delta) + " s ago";
  if (delta < 3600) return Math.round(delta / 60) + " min ago";
  if (delta < 86400) return (delta / 3600).toFixed(1) + " h ago";
  return Math.round(delta / 86400) + " d ago";
}

export function when(seconds) {
  if (!seconds) return "-";
  return new Date(seconds * 1000).toLocaleString();
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

export function bytes(size) {
  if (size === null || size === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return (unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)) + " " + units[unit];
}

export function number(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e6) return value.toLocaleString();
  return Number(value.toPrecision(digits)).toString();
}

export function interval(low, high) {
  return "[" + number(low, 3) + ", " + number(high, 3) + "]";
}

export function jobLink(job) {
  return h("a", { href: "#/jobs/" + encodeURIComponent(job.id), text: job.name || job.id });
}

// Runs `redraw` (which replaces elements) and gives the focus back to the element that had it: the one with
// the same tag and text in the row or header with the same data-key, in the table with the same data-table.
// Live updates and sorting then never pull the keyboard focus out from under the user.
export function keepFocus(redraw) {
  const active = document.activeElement;
  const keyed = active?.closest?.("[data-key]");
  const table = active?.closest?.("[data-table]");
  const key = keyed?.dataset.key;
  const tableName = table?.dataset.table;
  const tag = active?.tagName;
  const text = active?.textContent;
  redraw();
  if (!key || active.isConnected) return;
  const scopes = tableName ? [...document.querySelectorAll("[data-table]")].filter((t) => t.dataset.table === tableName) : [document];
  for (const scope of scopes) {
    const row = [...scope.querySelectorAll("[data-key]")].find((element) => element.dataset.key === key);
    const target = row && [...row.querySelectorAll(tag)].find((element) => element.textContent === text);
    if (target) {
      target.focus();
      return;
    }
  }
}

// A table whose columns sort when their header buttons are clicked; `sort` is {key, dir} and `onSort` is
// told the new one (the view keeps it, so a live update does not lose it).
export function sortableTable({ label, columns, rows, sort, onSort, rowKey, empty }) {
  const head = h(
    "tr",
    null,
    columns.map((column) => {
      const active = sort && sort.key === column.key;
      const th = h("th", { scope: "col", class: column.numeric ? "num" : "", "data-key": "sort:" + column.key });
      if (column.sortable === false) {
        th.textContent = column.label;
        return th;
      }
      th.setAttribute("aria-sort", active ? (sort.dir === "asc" ? "ascending" : "descending") : "none");
      th.append(
        h("button", {
          type: "button",
          class: "sort",
          text: column.label,
          onclick: () => {
            const dir = active && sort.dir === "asc" ? "desc" : "asc";
            keepFocus(() => onSort({ key: column.key, dir }));
          },
        }),
      );
      return th;
    }),
  );
  const ordered = sortRows(rows, columns, sort);
  const body = h(
    "tbody",
    null,
    ordered.map((row) =>
      h(
        "tr",
        { "data-key": rowKey ? rowKey(row) : undefined },
        columns.map((column) => {
          const content = column.render ? column.render(row) : column.value(row);
          return h(
            "td",
            { class: (column.numeric ? "num " : "") + (column.cellClass || "") },
            content instanceof Node || Array.isArray(content) ? content : display(content),
          );
        }),
      ),
    ),
  );
  const table = h(
    "table",
    { "data-table": label },
    label ? h("caption", { text: label }) : null,
    h("thead", null, head),
    body,
  );
  return h(
    "div",
    { class: "table-wrap" },
    table,
    rows.length === 0 ? h("p", { class: "empty", text: empty || "Nothing here yet." }) : null,
  );
}

function display(value) {
  if (typeof value === "number") return number(value);
  if (value === null || value === undefined) return "-";
  return String(value);
}

function sortRows(rows, columns, sort) {
  if (!sort) return rows;
  const column = columns.find((c) => c.key === sort.key);
  if (!column) return rows;
  const sign = sort.dir === "asc" ? 1 : -1;
  const value = column.sortValue || column.value;
  return [...rows].sort((a, b) => {
    const x = value(a);
    const y = value(b);
    if (x === y) return 0;
    if (x === null || x === undefined) return 1; // missing values last, either way
    if (y === null || y === undefined) return -1;
    if (typeof x === "number" && typeof y === "number") return (x - y) * sign;
    return String(x).localeCompare(String(y)) * sign;
  });
}

// A plain two-column key/value table for nested settings: {"sft": {"lr": 1}} -> "sft.lr | 1".
export function settingsTable(label, object) {
  const rows = [];
  const walk = (value, path) => {
    if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
      for (const [key, inner] of Object.entries(value)) walk(inner, path ? path + "." + key : key);
    } else {
      rows.push([path, typeof value === "object" ? JSON.stringify(value) : String(value)]);
    }
  };
  walk(object || {}, "");
  if (rows.length === 0) return h("p", { class: "empty", text: "None." });
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      null,
      h("caption", { text: label }),
      h("thead", null, h("tr", null, h("th", { scope: "col", text: "setting" }), h("th", { scope: "col", text: "value" }))),
      h(
        "tbody",
        null,
        rows.map(([key, value]) => h("tr", null, h("td", null, h("code", { text: key })), h("td", { class: "mono", text: value }))),
      ),
    ),
  );
}

// A labelled form control: <div class="field"><label for=id>..</label>control</div>.
export function field(labelText, control, hint) {
  control.id = control.id || "f-" + Math.random().toString(36).slice(2, 9);
  return h(
    "div",
    { class: "field" },
    h("label", { for: control.id, text: labelText }),
    control,
    hint ? h("span", { class: "muted small", text: hint }) : null,
  );
}

// Runs `action` with the button disabled and marked busy; errors go to `errorBox`.
export async function busy(button, errorElement, action) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.classList.add("busy");
  if (errorElement) showError(errorElement, null);
  try {
    return await action();
  } catch (error) {
    if (errorElement) showError(errorElement, error);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.classList.remove("busy");
  }
}

// Runs `fn` every `ms` until the signal aborts (the view was left).
export function every(ms, signal, fn) {
  const timer = setInterval(fn, ms);
  signal.addEventListener("abort", () => clearInterval(timer));
}

// The query part of the hash route: #/compare?jobs=a,b -> URLSearchParams.
export function routeParams() {
  return new URLSearchParams(location.hash.split("?")[1] || "");
}
