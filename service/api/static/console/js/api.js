// The REST API as the console calls it: the key as a bearer token (from sessionStorage, never in a URL),
// JSON errors as ApiError, and server-sent events read with fetch() (EventSource cannot send a header).

// Shared with the labeling page (/label/<id>), so that a key typed in one is known to the other in this tab.
const KEY_ITEM = "alignd.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || [];
  }
}

let unauthorized = () => {};

// Called on every 401: the key is wrong or was revoked, so the console forgets it and asks again.
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function headers(extra) {
  const result = new Headers(extra || {});
  const key = apiKey();
  if (key) result.set("Authorization", "Bearer " + key);
  return result;
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  const error = body.error || {};
  if (response.status === 401) unauthorized(error.message || "Sign in again.");
  const code = error.code || "http_" + response.status;
  return new ApiError(response.status, code, error.message || response.statusText, error.details);
}

// One request; throws ApiError for a non-2xx answer. `cache: "no-store"`: nothing one key read is kept for
// the next, so another tenant signing in on this browser never sees it.
export async function request(path, { method = "GET", json, form, signal, accept, redirect = "follow" } = {}) {
  const sent = headers(accept ? { Accept: accept } : undefined);
  let body;
  if (json !== undefined) {
    sent.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const response = await fetch(path, { method, headers: sent, body, signal, cache: "no-store", redirect });
  if (response.type === "opaqueredirect") return response; // the caller asked to see redirects
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

export function postJSON(path, json, options) {
  return getJSON(path, { ...options, method: "POST", json });
}

// Every page of a list endpoint (cursor `after`), up to `max` items.
export async function listAll(path, { signal, max = 500, params = {} } = {}) {
  const items = [];
  let after = null;
  while (items.length < max) {
    const query = new URLSearchParams({ ...params, limit: "100" });
    if (after) query.set("after", after);
    const page = await getJSON(path + "?" + query, { signal });
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) break;
    after = page.data[page.data.length - 1].id;
  }
  return items;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// The text/event-stream wire format: yields {event, data, id} per dispatched event.
export async function* parseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (event.data.length) yield { event: event.event, data: event.data.join("\n"), id: event.id };
          event = { event: "message", data: [], id: null };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event.event = text;
          else if (field === "data") event.data.push(text);
          else if (field === "id") event.id = text;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Follows an SSE endpoint until `end`, the signal aborts, or a 4xx: reconnects after a dropped connection
// or a 5xx (the server restarted, a proxy timed out) and resumes with Last-Event-ID.
export function follow(path, { signal, onEvent, onError, onOpen, lastEventId = null, retryMs = 1500 }) {
  let last = lastEventId;
  (async () => {
    while (!signal.aborted) {
      try {
        const sent = headers({ Accept: "text/event-stream" });
        if (last) sent.set("Last-Event-ID", last);
        const response = await fetch(path, { headers: sent, signal, cache: "no-store" });
        if (!response.ok) {
          const error = await errorOf(response);
          if (response.status < 500 && response.status !== 429) {
            onError?.(error);
            return;
          }
          throw error;
        }
        onOpen?.();
        for await (const message of parseEvents(response.body)) {
          if (message.id) last = message.id;
          let data = null;
          try {
            data = JSON.parse(message.data);
          } catch {
            data = message.data;
          }
          onEvent(message.event, data, message.id);
          if (message.event === "end") return;
        }
      } catch (error) {
        if (signal.aborted) return;
        onError?.(error);
      }
      await sleep(retryMs, signal);
    }
  })();
}
