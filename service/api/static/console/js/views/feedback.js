// #/feedback: feedback sets and their progress; #/feedback/<id>: agreement, per-item ratings, the labeling
// page's link and the export to a ranking dataset.
import { getJSON, listAll, postJSON } from "../api.js";
import { age, busy, clear, errorBox, field, h, number, panel, progressBar, showError, sortableTable } from "../ui.js";

function completion(set) {
  return set.num_items ? set.progress.items_complete / set.num_items : 0;
}

export async function renderFeedbackSets(root, signal) {
  const error = errorBox(null);
  const box = h("div", null, h("p", { class: "muted", text: "Loading…" }));
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Feedback sets" })), error, panel("Sets", box));
  let sort = { key: "created", dir: "desc" };
  let sets = [];
  const draw = () =>
    clear(
      box,
      sortableTable({
        label: "Feedback sets",
        rows: sets,
        sort,
        onSort: (next) => {
          sort = next;
          draw();
        },
        empty: "No feedback sets yet: POST /v1/feedback-sets with a candidates dataset.",
        columns: [
          { key: "name", label: "Name", value: (s) => s.name, render: (s) => h("a", { href: "#/feedback/" + encodeURIComponent(s.id), text: s.name }) },
          { key: "progress", label: "Items complete", value: completion, render: (s) => [progressBar(completion(s), "items complete in " + s.name), h("span", { class: "small muted", text: " " + s.progress.items_complete + " of " + s.num_items })] },
          { key: "labels", label: "Labels", value: (s) => s.progress.labels, numeric: true },
          { key: "annotators", label: "Annotators", value: (s) => s.progress.annotators, numeric: true },
          { key: "per_item", label: "Per item", value: (s) => s.annotations_per_item, numeric: true },
          { key: "round", label: "Round", value: (s) => s.round, numeric: true },
          { key: "created", label: "Age", value: (s) => s.created_at, render: (s) => age(s.created_at) },
        ],
      }),
    );
  try {
    sets = await listAll("/v1/feedback-sets", { signal });
    draw();
  } catch (failure) {
    showError(error, failure);
  }
}

function ratingsTable(ratings) {
  let sort = { key: "agreement", dir: "asc" };
  const box = h("div");
  const columns = [
    { key: "item", label: "Item", value: (i) => i.item, cellClass: "mono" },
    { key: "labels", label: "Labels", value: (i) => i.num_labels, numeric: true },
    { key: "comparisons", label: "Comparisons", value: (i) => i.num_comparisons, numeric: true },
    { key: "agreement", label: "Agreement", value: (i) => i.agreement, numeric: true },
    { key: "w", label: "Kendall's W", value: (i) => i.kendalls_w, numeric: true },
    {
      key: "order",
      label: "Responses best first (Elo · Bradley-Terry)",
      sortable: false,
      render: (item) => {
        const byId = new Map(item.responses.map((r) => [r.id, r]));
        return h(
          "ol",
          null,
          item.order.map((id) => {
            const r = byId.get(id);
            return h("li", { text: "response " + (r.index + 1) + ": " + number(r.elo, 4) + " · " + number(r.bradley_terry, 3) + " (" + r.comparisons + " comparisons)" });
          }),
        );
      },
    },
  ];
  const draw = () => clear(box, sortableTable({ label: "Ratings per item", rows: ratings.items, columns, sort, onSort: (next) => { sort = next; draw(); } }));
  draw();
  return box;
}

function exportForm(set) {
  const name = h("input", { type: "text", value: set.name + " (ranking)", maxLength: 256 });
  const minLabels = h("input", { type: "number", min: "1", max: "100", value: "1" });
  const minAgreement = h("input", { type: "number", min: "0", max: "1", step: "0.05", placeholder: "none" });
  const button = h("button", { type: "submit", class: "primary", text: "Export ranking dataset" });
  const error = errorBox(null);
  const done = h("p", { role: "status" });
  const form = h(
    "form",
    null,
    h("div", { class: "row" }, field("Dataset name", name), field("Minimum labels per item", minLabels), field("Minimum agreement", minAgreement, "0 to 1; empty: no minimum")),
    error,
    button,
    done,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(button, error, async () => {
      const body = { name: name.value.trim() || undefined, min_labels: Number(minLabels.value) || 1 };
      if (minAgreement.value !== "") body.min_agreement = Number(minAgreement.value);
      const dataset = await postJSON("/v1/feedback-sets/" + encodeURIComponent(set.id) + "/export", body);
      clear(done, "Exported ", h("code", { text: dataset.id }), " (" + dataset.num_records + (dataset.num_records === 1 ? " item). " : " items). "), h("a", { href: "#/datasets", text: "See datasets" }));
    });
  });
  return form;
}

export async function renderFeedbackSet(root, signal, setId) {
  const error = errorBox(null);
  root.append(error);
  let set;
  let ratings;
  try {
    [set, ratings] = await Promise.all([
      getJSON("/v1/feedback-sets/" + encodeURIComponent(setId), { signal }),
      getJSON("/v1/feedback-sets/" + encodeURIComponent(setId) + "/ratings", { signal }),
    ]);
  } catch (failure) {
    showError(error, failure);
    return;
  }
  const p = set.progress;
  const agreement = ratings.agreement;
  root.append(
    h(
      "div",
      { class: "page-head" },
      h("div", null, h("h1", { text: set.name }), h("div", { class: "muted mono small", text: set.id })),
      h("a", { class: "button primary", href: "/label/" + encodeURIComponent(set.id), text: "Open the labeling page" }),
    ),
    h(
      "section",
      { class: "panel", "aria-label": "Progress" },
      h(
        "dl",
        { class: "facts" },
        [
          ["Items complete", [progressBar(completion(set), "items complete"), " " + p.items_complete + " of " + set.num_items]],
          ["Items labelled", p.items_labelled],
          ["Labels", p.labels],
          ["Skips", p.skips],
          ["Annotators", p.annotators],
          ["Per item", set.annotations_per_item],
          ["Pairwise agreement", number(agreement.pairwise, 3) + " (" + agreement.overlapping_judgements + " overlapping judgements)"],
          ["Kendall's W", number(agreement.kendalls_w, 3) + " (" + agreement.items_with_overlap + " items)"],
          ["Round", set.round ?? "-"],
        ].map(([term, value]) => h("div", null, h("dt", { text: term }), h("dd", null, value))),
      ),
    ),
    panel("Ratings", ratingsTable(ratings)),
    panel("Export", exportForm(set)),
  );
}
