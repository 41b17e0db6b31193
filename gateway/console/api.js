// The console's API client: the token (kept in sessionStorage only, for this
// tab), JSON calls with the bearer token, problem+json errors, and the event
// stream read with fetch (EventSource cannot send an Authorization header).

const KEY = "entente.token";

/** The token of this tab's session, or null. */
export function token() {
  return sessionStorage.getItem(KEY);
}

/** Keeps `t` for this tab's session. */
export function setToken(t) {
  sessionStorage.setItem(KEY, t);
}

/** Forgets the token. */
export function clearToken() {
  sessionStorage.removeItem(KEY);
}

/** An error response of the API: its status and problem document. */
export class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

// Called with the problem of any 401: the console returns to sign-in.
let onUnauthorized = () => {};

/** Sets what a 401 does. */
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

async function problemOf(res) {
  const text = await res.text().catch(() => "");
  try {
    const p = JSON.parse(text);
    if (p && typeof p === "object") return p;
  } catch (_) {
    // Not JSON: a proxy's page, say.
  }
  return { title: res.statusText || `HTTP ${res.status}`, status: res.status, detail: text.slice(0, 300) };
}

/**
 * Calls the API: `method` on `path` (with its query), `body` as JSON if
 * given, extra `headers`. Resolves to `{status, headers, body}` (the body
 * parsed as JSON, or text); rejects with an ApiProblem on any error status.
 */
export async function call(method, path, { body, headers = {}, signal } = {}) {
  const h = { Accept: "application/json", ...headers };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  const init = { method, headers: h, signal, cache: "no-store" };
  if (body !== undefined) {
    h["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiProblem(0, { title: "The gateway did not answer", detail: String(e.message || e) });
  }
  if (!res.ok) {
    const p = await problemOf(res);
    const err = new ApiProblem(res.status, p);
    if (res.status === 401) onUnauthorized(err);
    throw err;
  }
  const type = res.headers.get("Content-Type") || "";
  const out = type.includes("json") ? await res.json() : await res.text();
  return { status: res.status, headers: res.headers, body: out };
}

/** GET `path`, resolving to its body. */
export async function get(path, opts) {
  return (await call("GET", path, opts)).body;
}

/** A path with a query made of the entries of `q` that are set. */
export function withQuery(path, q) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) {
    if (v !== undefined && v !== null && v !== "") u.append(k, v);
  }
  const s = u.toString();
  return s ? `${path}?${s}` : path;
}

/** `/v1/...` with each path segment escaped. */
export function p(strings, ...values) {
  return strings.reduce((acc, s, i) => acc + s + (i < values.length ? encodeURIComponent(values[i]) : ""), "");
}

/**
 * Follows `GET /v1/events`: calls `onEvent({id, event, data})` for each
 * event until `signal` aborts; reconnects from the last id after the
 * stream ends (a slow client is cut, a gateway restarts). `onState` hears
 * "open", "closed" and errors (ApiProblem). A 401 stops it.
 */
export async function followEvents({ onEvent, onState, signal, after }) {
  let last = after;
  while (!signal.aborted) {
    const h = { Accept: "text/event-stream" };
    const t = token();
    if (t) h.Authorization = `Bearer ${t}`;
    if (last !== undefined) h["Last-Event-ID"] = String(last);
    try {
      const res = await fetch("/v1/events", { headers: h, signal, cache: "no-store" });
      if (!res.ok) {
        const err = new ApiProblem(res.status, await problemOf(res));
        onState(err);
        if (res.status === 401) {
          onUnauthorized(err);
          return;
        }
      } else {
        onState("open");
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          // Bounded: an event bigger than this would be a broken stream.
          if (buf.length > 4 << 20) break;
          let end;
          while ((end = buf.search(/\r?\n\r?\n/)) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end).replace(/^\r?\n\r?\n/, "");
            const ev = { data: "" };
            for (const line of block.split(/\r?\n/)) {
              if (line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const k = i < 0 ? line : line.slice(0, i);
              const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (k === "data") ev.data += (ev.data ? "\n" : "") + v;
              else if (k === "id") ev.id = v;
              else if (k === "event") ev.event = v;
            }
            if (ev.id !== undefined) last = ev.id;
            if (ev.event) {
              let data = ev.data;
              try { data = JSON.parse(ev.data); } catch (_) { /* shown as text */ }
              onEvent({ id: ev.id, event: ev.event, data });
            }
          }
        }
        onState("closed");
      }
    } catch (e) {
      if (signal.aborted) return;
      onState(new ApiProblem(0, { title: "The event stream broke", detail: String(e.message || e) }));
    }
    // Before reconnecting: a bounded pause, cut short by leaving the view.
    await new Promise((resolve) => {
      const t = setTimeout(resolve, 2000);
      signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
    });
  }
}
