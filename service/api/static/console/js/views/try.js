// #/try: one prompt to two models through POST /openai/v1/chat/completions (a base model, and a fine-tuned
// ft:... model or another base), answers side by side. Each request runs as a small job: seconds.
import { getJSON, listAll, postJSON } from "../api.js";
import { errorBox, field, h, panel, showError } from "../ui.js";

function modelSelect(models, preferred) {
  const control = h(
    "select",
    null,
    models.map((m) => h("option", { value: m.id, text: m.label, selected: m.id === preferred })),
  );
  return control;
}

function side(title, models, preferred) {
  const select = modelSelect(models, preferred);
  const answer = h("div", { class: "answer-box", "aria-live": "polite", "aria-label": title + " answer" });
  const status = h("p", { class: "muted small", role: "status" });
  const error = errorBox(null);
  const element = h("section", { class: "panel", "aria-label": title }, h("h2", { text: title }), field(title + " model", select), error, status, answer);
  return { element, select, answer, status, error };
}

async function ask(target, body) {
  showError(target.error, null);
  target.answer.textContent = "";
  target.answer.setAttribute("aria-busy", "true");
  target.status.textContent = "Generating…";
  target.status.classList.add("busy");
  const started = performance.now();
  try {
    const completion = await postJSON("/openai/v1/chat/completions", { ...body, model: target.select.value });
    const choice = completion.choices[0];
    target.answer.textContent = choice.message.content;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    target.status.textContent = completion.usage.completion_tokens + " tokens, finish: " + choice.finish_reason + ", " + seconds + " s";
  } catch (failure) {
    target.status.textContent = "";
    showError(target.error, failure);
  } finally {
    target.answer.removeAttribute("aria-busy");
    target.status.classList.remove("busy");
  }
}

export async function renderTry(root, signal) {
  const error = errorBox(null);
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Try it" })), error);
  let models;
  try {
    const [listed, bases] = await Promise.all([getJSON("/openai/v1/models", { signal }), listAll("/v1/models", { signal })]);
    const names = new Map(bases.map((m) => [m.id, m.name]));
    models = listed.data.map((m) => ({ id: m.id, label: names.has(m.id) ? names.get(m.id) + " (" + m.id + ")" : m.id, fineTuned: m.id.startsWith("ft:") }));
  } catch (failure) {
    showError(error, failure);
    return;
  }
  if (models.length === 0) {
    root.append(panel("No models", h("p", { text: "Upload a base model first (#/models)." })));
    return;
  }
  const base = models.find((m) => !m.fineTuned) || models[0];
  const tuned = [...models].reverse().find((m) => m.fineTuned) || base;
  const left = side("Base", models, base.id);
  const right = side("Aligned", models, tuned.id);
  const system = h("input", { type: "text", placeholder: "optional" });
  const prompt = h("textarea", { required: true, rows: 4 });
  const maxTokens = h("input", { type: "number", min: "1", max: "4096", value: "64" });
  const temperature = h("input", { type: "number", min: "0", max: "2", step: "0.1", value: "0" });
  const send = h("button", { type: "submit", class: "primary", text: "Ask both" });
  const form = h(
    "form",
    null,
    field("System prompt", system),
    field("Prompt", prompt),
    h("div", { class: "row" }, field("Max tokens", maxTokens), field("Temperature", temperature)),
    send,
    h("p", { class: "muted small", text: "Each answer runs as a small chat job on a worker: expect seconds, more while it trains something else. Fine-tuned models are the ft:… names of jobs made through /openai/v1/fine_tuning." }),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!prompt.value.trim()) return;
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    messages.push({ role: "user", content: prompt.value });
    const body = { messages, max_completion_tokens: Number(maxTokens.value) || 64, temperature: Number(temperature.value) || 0 };
    send.disabled = true;
    send.setAttribute("aria-busy", "true");
    try {
      await Promise.all([ask(left, body), ask(right, body)]);
    } finally {
      send.disabled = false;
      send.removeAttribute("aria-busy");
    }
  });
  root.append(panel("Ask", form), h("div", { class: "side-by-side" }, left.element, right.element));
}
