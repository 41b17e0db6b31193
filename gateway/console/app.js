// The operator console: a hash-routed single page over the REST API.
// Views: sign-in, group, devices (and one device), commands, jobs (and one
// job), live (events and charts). Every view polls or streams while it is
// shown and stops when the operator leaves it.

import {
  ApiProblem, call, clearToken, followEvents, get, p, setToken, token, whenUnauthorized, withQuery,
} from "./api.js";
import { Sparkline, figures, parseMetrics } from "./charts.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");

// ---- small DOM helpers ----------------------------------------------------

/** An element: `el("div.card#x", {attr: v, onclick: f}, children...)`. */
function el(spec, attrs = {}, ...children) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/);
  const e = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") e.classList.add(part.slice(1));
    else e.id = part.slice(1);
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else if (k === "value") e.value = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/**
 * Makes `e`, a box whose content may scroll, a named region reachable with
 * the keyboard (so it can be scrolled without a mouse).
 */
function scrollable(e, name) {
  e.tabIndex = 0;
  e.setAttribute("role", "region");
  e.setAttribute("aria-label", name);
  return e;
}

const badge = (text, cls = text) => el(`span.badge.${cls}`, { "data-badge": text }, text);
const json = (v) => JSON.stringify(v, null, 2);
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "–");

/** A problem box showing the API's title and detail. */
function problemBox(err) {
  const pr = err instanceof ApiProblem ? err.problem : { title: "Error", detail: String(err) };
  const status = err instanceof ApiProblem ? err.status : 0;
  return el("div.problem", { role: "alert", "data-status": String(status) },
    el("strong", { text: pr.title || `HTTP ${status}` }),
    pr.detail ? el("span.detail", { text: pr.detail }) : null);
}

/** Replaces the children of `slot` with `nodes`. */
function fill(slot, ...nodes) {
  slot.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined));
}

/** Shows `err` in `slot` (or clears it with null). */
function showError(slot, err) {
  if (err && err.name === "AbortError") return;
  fill(slot, err ? problemBox(err) : null);
}

/** Parses `k=v, k2=v2` into an object (null if empty). */
function parseLabels(s) {
  const out = {};
  for (const part of s.split(",").map((x) => x.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i <= 0) throw new ApiProblem(0, { title: "Not a label", detail: `write labels as key=value: "${part}"` });
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return Object.keys(out).length ? out : null;
}

/** Parses a JSON text field, naming it in the error. */
function parseJson(name, s, fallback) {
  if (!s.trim()) return fallback;
  try {
    return JSON.parse(s);
  } catch (e) {
    throw new ApiProblem(0, { title: `${name} is not JSON`, detail: e.message });
  }
}

const num = (s) => (s.trim() === "" ? undefined : Number(s));

// ---- the view's lifetime ----------------------------------------------------

let current = null;

/** What a view runs while shown: its abort signal and bounded pollers. */
class ViewCtx {
  constructor() {
    this.ctrl = new AbortController();
    this.signal = this.ctrl.signal;
    this.timers = [];
  }

  /** Runs `f` now and then every `ms` until the view is left (never twice at once). */
  every(ms, f) {
    let running = false;
    const tick = async () => {
      if (running || this.signal.aborted) return;
      running = true;
      try { await f(); } finally { running = false; }
    };
    tick();
    this.timers.push(setInterval(tick, ms));
  }

  stop() {
    this.ctrl.abort();
    this.timers.forEach(clearInterval);
  }
}

// ---- sign-in ------------------------------------------------------------------

let signinProblem = null;

whenUnauthorized((err) => {
  clearToken();
  signinProblem = err;
  if (location.hash !== "#/signin") location.hash = "#/signin";
  else render();
});

function signinView() {
  nav.hidden = true;
  const input = el("input#token", { type: "password", autocomplete: "off", placeholder: "API token", required: true });
  const msg = el("div#signin-problem");
  if (signinProblem) fill(msg, problemBox(signinProblem));
  const form = el("form.card.signin#signin", {
    onsubmit: async (e) => {
      e.preventDefault();
      setToken(input.value.trim());
      signinProblem = null;
      try {
        await get("/v1/cluster?consistency=local");
        // Back to the page asked for (a link followed before signing in), or the group.
        const asked = location.hash && location.hash !== "#/signin" ? location.hash : "#/group";
        if (location.hash === asked) render();
        else location.hash = asked;
      } catch (err) {
        if (err.status !== 401) showError(msg, err);
      }
    },
  },
  el("h1", { text: "Sign in" }),
  el("p.muted", { text: "Paste an API token (an admin hands them out with POST /v1/tokens). It is kept in this tab only, until you sign out or close it." }),
  el("label", {}, "Token", input),
  el("p", {}, el("button", { type: "submit", text: "Sign in" })),
  msg);
  fill(main, form);
  input.focus();
}

// ---- group --------------------------------------------------------------------

function groupView(ctx) {
  const summary = el("div.card#group-summary");
  const members = scrollable(el("div.card.scroll#group-members"), "Members");
  const warnings = el("div#group-warnings");
  const err = el("div");
  const health = el("div.card#group-health");
  fill(main, el("h1", { text: "Group" }), err, warnings, el("div.grid", {}, summary, health), members);
  ctx.every(2000, async () => {
    try {
      const c = await get("/v1/cluster?consistency=local", { signal: ctx.signal });
      showError(err, null);
      fill(summary,
        el("h2", { text: `Gateway ${c.node_id}` }),
        el("table", {}, el("tbody", {},
          el("tr", {}, el("th", { text: "Role" }), el("td", {}, badge(c.role))),
          el("tr", {}, el("th", { text: "Leader" }), el("td#group-leader", { text: c.leader ?? "none known" })),
          el("tr", {}, el("th", { text: "Term" }), el("td.num", { text: c.term })),
          el("tr", {}, el("th", { text: "Commit index" }), el("td.num", { text: c.commit })),
          el("tr", {}, el("th", { text: "Applied index" }), el("td.num", { text: c.applied })))));
      const onLeader = c.role === "leader";
      const shown = (v) => (v === null || v === undefined ? el("span.muted", { text: "unknown" }) : String(v));
      const HEALTH = { ok: "ok", lagging: "warn", unreachable: "bad", unknown: "muted" };
      // How long ago a member reported its own indexes: "now" for this gateway's row.
      const age = (ms) => (ms === null || ms === undefined ? el("span.muted", { text: "unknown" })
        : ms === 0 ? "now" : ms < 1000 ? `${ms} ms ago` : `${(ms / 1000).toFixed(1)} s ago`);
      const rows = c.members.map((m) => el("tr", { "data-member": m.id, "data-health": m.health },
        el("td.num", { text: m.id }),
        el("td", { text: m.suffrage }),
        el("td", {}, m.role ? badge(m.role) : el("span.muted", { text: "–" })),
        el("td.num", { "data-field": "commit" }, shown(m.commit)),
        el("td.num", { "data-field": "applied" }, shown(m.applied)),
        el("td.num", { "data-field": "term" }, shown(m.term)),
        el("td.num", { "data-field": "reported" }, age(m.reported_ms_ago)),
        el("td.num", {}, shown(m.matched)),
        el("td.num", {}, shown(m.lag)),
        el("td", {}, badge(m.health, HEALTH[m.health] || "muted"))));
      fill(members,
        el("h2", { text: "Members" }),
        el("p.muted", {
          text: (onLeader
            ? "Matched index and lag: this leader's replication progress for each member. "
            : `Matched index and lag are known on the leader (gateway ${c.leader ?? "?"}); open its console for them. `) +
            `Commit index, applied index and term: each member's own, as it last reported them (every member reports to the others every 250 ms; "reported" says how long ago). ` +
            `A member more than ${c.lag_warning} entries behind is lagging; one silent for more than ${c.unreachable_after_ms / 1000} s is unreachable.`,
        }),
        el("table", {}, el("thead", {}, el("tr", {},
          el("th.num", { text: "Id" }), el("th", { text: "Suffrage" }), el("th", { text: "Role" }),
          el("th.num", { text: "Commit index" }), el("th.num", { text: "Applied index" }),
          el("th.num", { text: "Term" }), el("th.num", { text: "Reported" }),
          el("th.num", { text: "Matched index" }), el("th.num", { text: "Lag" }), el("th", { text: "Health" }))),
        el("tbody", {}, rows)));
      fill(warnings, c.warnings.map((w) => el("div.notice", { text: w })));
    } catch (e) {
      showError(err, e);
    }
    const checks = [];
    for (const path of ["/healthz", "/readyz"]) {
      try {
        const h = await get(path, { signal: ctx.signal });
        checks.push(el("tr", {}, el("th", { text: path }), el("td", {}, badge(h.status, "ok"))));
      } catch (e) {
        if (e.name === "AbortError") return;
        checks.push(el("tr", {}, el("th", { text: path }), el("td", {}, badge("failing", "bad"), " ", e.problem?.detail ?? "")));
      }
    }
    fill(health, el("h2", { text: "Health" }), el("table", {}, el("tbody", {}, checks)));
  });
}

// ---- devices ------------------------------------------------------------------

// Device ids use these characters, in the order the registry sorts them.
const ID_CHARS = "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";

/** The `after` cursor just below every id starting with `prefix`. */
function cursorBefore(prefix) {
  const head = prefix.slice(0, -1);
  const i = ID_CHARS.indexOf(prefix[prefix.length - 1]);
  if (i <= 0) return head || undefined;
  return (head + ID_CHARS[i - 1]).padEnd(64, "z");
}

/**
 * Devices whose id starts with `prefix`, that have all `labels` and the
 * presence asked (at most `max`, from at most 10 pages). The API filters by
 * one label; the others are checked here.
 */
async function searchDevices({ prefix, labels, online }, signal, max = 100) {
  const found = [];
  const pairs = Object.entries(labels || {});
  let after = prefix ? cursorBefore(prefix) : undefined;
  for (let page = 0; page < 10 && found.length < max; page++) {
    const q = { after, limit: 100, online, label: pairs.length ? `${pairs[0][0]}=${pairs[0][1]}` : undefined };
    const r = await get(withQuery("/v1/devices", q), { signal });
    for (const d of r.items) {
      if (prefix && !d.id.startsWith(prefix)) return found;
      if (pairs.every(([k, v]) => (d.labels || {})[k] === v)) found.push(d);
    }
    if (!r.next) break;
    after = r.next;
  }
  return found.slice(0, max);
}

function devicesView(ctx, query) {
  const prefix = el("input#device-prefix", { value: query.get("prefix") || "", placeholder: "pump-" });
  const labels = el("input#device-labels", { value: query.get("labels") || "", placeholder: "site=north" });
  const online = el("select#device-online", {},
    el("option", { value: "", text: "any" }), el("option", { value: "true", text: "online" }),
    el("option", { value: "false", text: "offline" }));
  online.value = query.get("online") || "";
  const err = el("div");
  const list = scrollable(el("div.card.scroll#device-list"), "Devices found");
  const form = el("form.inline.card", {
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams({ prefix: prefix.value.trim(), labels: labels.value.trim(), online: online.value });
      location.hash = `#/devices?${q}`;
    },
  }, el("label", {}, "Id starts with", prefix), el("label", {}, "Labels", labels),
  el("label", {}, "Presence", online), el("button", { type: "submit", text: "Search" }));
  fill(main, el("h1", { text: "Devices" }), form, err, list);
  ctx.every(3000, async () => {
    try {
      const found = await searchDevices({
        prefix: (query.get("prefix") || "").trim(),
        labels: parseLabels(query.get("labels") || ""),
        online: query.get("online") || undefined,
      }, ctx.signal);
      showError(err, null);
      fill(list, el("table", {},
        el("thead", {}, el("tr", {}, el("th", { text: "Id" }), el("th", { text: "Presence" }),
          el("th", { text: "Gateway" }), el("th", { text: "Labels" }))),
        el("tbody", {}, found.map((d) => el("tr", { "data-device": d.id },
          el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.id)}`, text: d.id })),
          el("td", {}, badge(d.online ? "online" : "offline")),
          el("td", { text: d.gateway ?? "–" }),
          el("td", { text: Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") }))))),
      found.length ? null : el("p.muted", { text: "No device matches." }));
    } catch (e) {
      showError(err, e);
    }
  });
}

const TERMINAL = new Set(["succeeded", "failed", "expired", "canceled"]);
/**
 * The newest `n` items of a listing ordered by id (command and job ids
 * start with their creation time), newest first. `tail` keeps, between
 * calls, the cursor just before the last window, so a poll reads from
 * there instead of from the start; the first walks at most 20 pages.
 */
async function newest(path, query, n, tail, signal) {
  const items = [];
  let after = tail.after;
  for (let page = 0; page < 20; page++) {
    const r = await get(withQuery(path, { ...query, after, limit: 100 }), { signal });
    items.push(...r.items);
    if (!r.next) break;
    after = r.next;
  }
  if (items.length > n) tail.after = items[items.length - n - 1].id;
  return items.slice(-n).reverse();
}

/** A command's statuses in the order it can go through them. */
const LIFECYCLE = ["queued", "sent", "accepted", "succeeded", "failed", "expired", "canceled"];

function commandRow(c, ctx, onChange) {
  const cancel = TERMINAL.has(c.status) ? null : el("button.secondary", {
    type: "button", text: "Cancel",
    onclick: async () => {
      try {
        await call("POST", p`/v1/commands/${c.id}/cancel`);
        onChange(null);
      } catch (e) { onChange(e); }
    },
  });
  return el("tr", { "data-command": c.id },
    el("td", { text: c.id }), el("td", { text: c.device }), el("td", { text: c.name }),
    el("td", {}, badge(c.status)), el("td", { text: when(c.updated_at) }),
    el("td", {}, c.output === null || c.output === undefined ? "" : el("code", { text: JSON.stringify(c.output) })),
    el("td", {}, cancel));
}

const commandHead = () => el("thead", {}, el("tr", {}, ...["Id", "Device", "Name", "Status", "Updated", "Output"]
  .map((t) => el("th", { text: t })), el("th", {}, el("span.visually-hidden", { text: "Action" }))));

function deviceView(ctx, id) {
  const err = el("div");
  const presence = el("div.card#device-presence");
  const shadow = el("div.card#device-shadow");
  const recent = scrollable(el("div.card.scroll#device-commands"), "Recent commands");
  let version = null;
  const recentTail = {};

  // Desired state, edited as a JSON merge patch with the version read.
  const patch = el("textarea#desired-patch", { spellcheck: "false" }, "{}");
  const ifMatch = el("input#desired-version", { inputmode: "numeric", size: "6" });
  const shadowMsg = el("div#desired-result");
  const editor = el("form.card#desired-form", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const body = { desired: parseJson("The patch", patch.value, {}) };
        const headers = ifMatch.value.trim() ? { "If-Match": ifMatch.value.trim() } : {};
        const r = await call("PATCH", p`/v1/devices/${id}/shadow`, { body, headers });
        fill(shadowMsg, el("div.notice", { text: `Saved: version ${r.body.version}.` }));
        showShadow(r.body);
      } catch (e2) {
        showError(shadowMsg, e2);
      }
    },
  }, el("h2", { text: "Edit desired state" }),
  el("p.muted", { text: "A JSON merge patch of desired (null removes a key). The version is the one you read: if the shadow changed since, the gateway refuses (412)." }),
  el("label", {}, "Patch (JSON)", patch), el("div.inline", {}, el("label", {}, "If-Match version", ifMatch), " ",
    el("button", { type: "submit", text: "Save desired" })), shadowMsg);

  // A command, followed until it is over.
  const name = el("input#command-name", { placeholder: "reboot", required: true });
  const params = el("textarea#command-params", { spellcheck: "false" }, "{}");
  const followed = el("div#command-followed");
  const sender = el("form.card#command-form", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const body = { name: name.value.trim(), params: parseJson("Params", params.value, {}) };
        const r = await call("POST", p`/v1/devices/${id}/commands`, { body });
        follow(r.body.id, Number(r.headers.get("Entente-Index") || 0));
      } catch (e2) {
        showError(followed, e2);
      }
    },
  }, el("h2", { text: "Send a command" }), el("label", {}, "Name", name), el("label", {}, "Params (JSON)", params),
  el("p", {}, el("button", { type: "submit", text: "Send" })), followed);

  // The followed command: every status it goes through, from the event
  // stream replayed from the write that issued it (nothing is missed), and
  // a read every 2 s in case the stream is refused or cut.
  let following = null;
  function follow(cid, index) {
    if (following) following.abort();
    const ctrl = new AbortController();
    following = ctrl;
    ctx.signal.addEventListener("abort", () => ctrl.abort(), { once: true });
    const seen = [];
    let last = null;
    const started = Date.now();
    let over = false;
    const show = (c, fromStream = false) => {
      // Statuses only move forward, so the history is their lifecycle order
      // whichever source told of each first.
      if (!seen.includes(c.status)) seen.push(c.status);
      seen.sort((a, b) => LIFECYCLE.indexOf(a) - LIFECYCLE.indexOf(b));
      if (!last || LIFECYCLE.indexOf(c.status) >= LIFECYCLE.indexOf(last.status)) last = c;
      fill(followed, el("div", { "data-followed": cid, "data-status": last.status },
        el("p", {}, "Command ", el("code", { text: cid }), " ", badge(last.status)),
        el("p.muted#command-lifecycle", { text: seen.join(" → ") }),
        last.output !== null && last.output !== undefined ? el("pre", { tabindex: "0", text: json(last.output) }) : null));
      if (fromStream && TERMINAL.has(c.status)) ctrl.abort();
      if ((TERMINAL.has(last.status) || Date.now() - started > 10 * 60 * 1000) && !over) {
        // Over: the stream has 5 s more to tell the statuses before it.
        over = true;
        setTimeout(() => ctrl.abort(), 5000);
      }
    };
    followEvents({
      signal: ctrl.signal,
      after: index > 0 ? index - 1 : undefined,
      onState: () => {},
      onEvent: (ev) => {
        if (ev.event.startsWith("command.") && ev.data && ev.data.id === cid) show(ev.data, true);
      },
    });
    const poll = async () => {
      while (!ctrl.signal.aborted && !over) {
        try {
          show(await get(p`/v1/commands/${cid}`, { signal: ctrl.signal }));
        } catch (e) {
          if (e.name === "AbortError") return;
          showError(followed, e);
        }
        await new Promise((r) => {
          const t = setTimeout(r, 2000);
          ctrl.signal.addEventListener("abort", () => { clearTimeout(t); r(); }, { once: true });
        });
      }
    };
    poll();
  }

  function showShadow(s) {
    version = s.version;
    if (document.activeElement !== ifMatch) ifMatch.value = String(version);
    fill(shadow, el("h2", {}, "Shadow ", el("span.muted", { text: `version ${s.version}` })),
      el("div.grid.three", {},
        el("div", {}, el("h2", { text: "Desired" }), el("pre#shadow-desired", { tabindex: "0", text: json(s.desired) })),
        el("div", {}, el("h2", { text: "Reported" }), el("pre#shadow-reported", { tabindex: "0", text: json(s.reported) })),
        el("div", {}, el("h2", { text: "Delta" }), el("pre#shadow-delta", { tabindex: "0", text: json(s.delta) }))));
  }

  fill(main, el("h1", {}, "Device ", el("code", { text: id })), err,
    el("div.grid", {}, presence, sender), shadow, editor, recent);
  ctx.every(2000, async () => {
    try {
      const [d, s, cmds] = await Promise.all([
        get(p`/v1/devices/${id}`, { signal: ctx.signal }),
        get(p`/v1/devices/${id}/shadow`, { signal: ctx.signal }),
        newest(p`/v1/devices/${id}/commands`, {}, 20, recentTail, ctx.signal),
      ]);
      showError(err, null);
      fill(presence, el("h2", { text: "Presence" }),
        el("p", {}, badge(d.online ? "online" : "offline"), " ",
          d.online ? `on gateway ${d.gateway}` : "not connected to any gateway"),
        el("table", {}, el("tbody", {},
          el("tr", {}, el("th", { text: "Labels" }), el("td", { text: Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–" })),
          el("tr", {}, el("th", { text: "Attributes" }), el("td", {}, el("code", { text: JSON.stringify(d.attributes || {}) }))),
          el("tr", {}, el("th", { text: "Registered" }), el("td", { text: when(d.created_at) })))));
      showShadow(s);
      const refresh = (e2) => showError(err, e2);
      fill(recent, el("h2", { text: "Recent commands" }),
        el("table", {}, commandHead(), el("tbody", {}, cmds.map((c) => commandRow(c, ctx, refresh)))));
    } catch (e) {
      showError(err, e);
    }
  });
}

// ---- commands -------------------------------------------------------------------

function commandsView(ctx, query) {
  const device = el("input#commands-device", { value: query.get("device") || "", placeholder: "any device" });
  const status = el("select#commands-status", {}, el("option", { value: "", text: "any" }),
    ...LIFECYCLE.map((s) => el("option", { value: s, text: s })));
  status.value = query.get("status") || "";
  const job = el("input#commands-job", { value: query.get("job") || "", placeholder: "any job" });
  const since = el("input#commands-since", { type: "datetime-local", value: query.get("since") || "" });
  const err = el("div");
  const list = scrollable(el("div.card.scroll#commands-list"), "Commands found");
  const form = el("form.inline.card", {
    onsubmit: (e) => {
      e.preventDefault();
      const q = { device: device.value.trim(), status: status.value, job: job.value.trim(), since: since.value };
      location.hash = `#/commands?${new URLSearchParams(Object.entries(q).filter(([, v]) => v))}`;
    },
  }, el("label", {}, "Device", device), el("label", {}, "Status", status), el("label", {}, "Job", job),
  el("label", {}, "Issued after", since), el("button", { type: "submit", text: "Show" }));
  fill(main, el("h1", { text: "Commands" }), form, err, list);
  const sinceMs = query.get("since") ? new Date(query.get("since")).getTime() : NaN;
  const filters = {
    device: query.get("device") || undefined,
    status: query.get("status") || undefined,
    job: query.get("job") || undefined,
    created_after: Number.isFinite(sinceMs) ? sinceMs : undefined,
  };
  const tail = {};
  ctx.every(2000, async () => {
    try {
      const items = await newest("/v1/commands", filters, 100, tail, ctx.signal);
      showError(err, null);
      fill(list, el("table", {}, commandHead(), el("tbody", {}, items.map((c) => commandRow(c, ctx, (e) => showError(err, e))))),
        items.length ? null : el("p.muted", { text: "No command." }));
    } catch (e) {
      showError(err, e);
    }
  });
}

// ---- jobs -------------------------------------------------------------------------

const EXEC_STATES = ["succeeded", "failed", "timed_out", "canceled", "in_progress", "queued"];

/** Finished executions as a share of all (0..1; 0 for a job without any yet). */
function doneShare(job) {
  const c = job.counts;
  const done = c.succeeded + c.failed + c.timed_out + c.canceled;
  const all = done + c.in_progress + c.queued;
  return all ? done / all : 0;
}

/** A job's progress bar, with a legend of counts per execution status. */
function progress(job, withLegend = true) {
  const c = job.counts;
  const all = EXEC_STATES.reduce((a, s) => a + c[s], 0);
  const bar = el("div.bar", { role: "progressbar", "aria-label": "Executions finished", "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-valuenow": String(Math.round(doneShare(job) * 100)) });
  for (const s of EXEC_STATES) {
    if (!c[s] || s === "queued") continue;
    const seg = el(`span.${s}`, { title: `${s}: ${c[s]}` });
    seg.style.width = `${(100 * c[s]) / all}%`;
    bar.append(seg);
  }
  const pct = el("span.pct", { text: `${Math.round(doneShare(job) * 100)} %` });
  if (!withLegend) return el("div", {}, bar, pct);
  return el("div", { "data-progress": String(Math.round(doneShare(job) * 100)) }, bar,
    el("div.legend", {}, pct, ...EXEC_STATES.map((s) => el("span", { "data-count": s }, badge(s), ` ${c[s]}`))));
}

function jobForm(err) {
  const name = el("input#job-name", { placeholder: "update-firmware", required: true });
  const params = el("textarea#job-params", { spellcheck: "false" }, "{}");
  const mode = el("select#job-target-mode", {}, el("option", { value: "devices", text: "device ids" }),
    el("option", { value: "labels", text: "label selector" }));
  const target = el("input#job-target", { placeholder: "pump-1, pump-2  or  site=north", required: true });
  const perMinute = el("input#job-per-minute", { type: "number", min: "1", placeholder: "600" });
  const inFlight = el("input#job-in-flight", { type: "number", min: "1", placeholder: "100" });
  const failPct = el("input#job-abort-percent", { type: "number", min: "0", max: "100", placeholder: "none" });
  const minFinished = el("input#job-abort-min", { type: "number", min: "1", placeholder: "10" });
  const timeout = el("input#job-timeout", { type: "number", min: "1", placeholder: "60000" });
  return el("form.card#job-form", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const t = mode.value === "devices"
          ? { devices: target.value.split(",").map((s) => s.trim()).filter(Boolean) }
          : { labels: parseLabels(target.value) || {} };
        const body = {
          command: { name: name.value.trim(), params: parseJson("Params", params.value, {}) },
          target: t,
          rollout: { max_per_minute: num(perMinute.value), max_in_flight: num(inFlight.value) },
          timeout_ms: num(timeout.value),
        };
        if (failPct.value.trim() !== "") body.abort = { failure_percent: num(failPct.value), min_finished: num(minFinished.value) };
        const r = await call("POST", "/v1/jobs", { body });
        location.hash = `#/job/${encodeURIComponent(r.body.id)}`;
      } catch (e2) {
        showError(err, e2);
      }
    },
  }, el("h2", { text: "Create a job" }),
  el("div.grid", {},
    el("div", {}, el("label", {}, "Command", name), el("label", {}, "Params (JSON)", params)),
    el("div", {}, el("label", {}, "Target", mode), el("label", {}, "Devices or labels", target))),
  el("div.inline", {}, el("label", {}, "Launches a minute", perMinute), el("label", {}, "In flight", inFlight),
    el("label", {}, "Abort above failure %", failPct), el("label", {}, "…once finished", minFinished),
    el("label", {}, "Timeout (ms)", timeout)),
  el("p", {}, el("button", { type: "submit", text: "Create job" })));
}

function jobsView(ctx, query) {
  const state = el("select#jobs-state", {}, el("option", { value: "", text: "any" }),
    ...["scheduled", "in_progress", "completed", "canceled", "aborted"].map((s) => el("option", { value: s, text: s })));
  state.value = query.get("state") || "";
  state.addEventListener("change", () => { location.hash = `#/jobs?${new URLSearchParams({ state: state.value })}`; });
  const err = el("div");
  const list = scrollable(el("div.card.scroll#jobs-list"), "Jobs found");
  fill(main, el("h1", { text: "Jobs" }), err, jobForm(err), el("div.inline.card", {}, el("label", {}, "State", state)), list);
  const tail = {};
  ctx.every(2000, async () => {
    try {
      const items = await newest("/v1/jobs", { state: query.get("state") }, 100, tail, ctx.signal);
      showError(err, null);
      fill(list, el("table", {},
        el("thead", {}, el("tr", {}, ...["Id", "State", "Command", "Devices", "Progress"].map((t) => el("th", { text: t })))),
        el("tbody", {}, items.map((j) => el("tr", { "data-job": j.id },
          el("td", {}, el("a", { href: `#/job/${encodeURIComponent(j.id)}`, text: j.id })),
          el("td", {}, badge(j.state)), el("td", { text: j.command.name }), el("td.num", { text: j.devices }),
          el("td", {}, progress(j, false)))))),
      items.length ? null : el("p.muted", { text: "No job." }));
    } catch (e) {
      showError(err, e);
    }
  });
}

function jobView(ctx, id) {
  const err = el("div");
  const head = el("div.card#job-detail");
  const execs = scrollable(el("div.card.scroll#job-executions"), "Executions");
  fill(main, el("h1", {}, "Job ", el("code", { text: id })), err, head, execs);
  ctx.every(1000, async () => {
    try {
      const [j, ex] = await Promise.all([
        get(p`/v1/jobs/${id}`, { signal: ctx.signal }),
        get(p`/v1/jobs/${id}/executions` + "?limit=100", { signal: ctx.signal }),
      ]);
      const open = j.state === "scheduled" || j.state === "in_progress";
      fill(head, el("p", {}, badge(j.state), " ", el("code", { text: j.command.name }), " on ",
        j.selector ? `devices labelled ${Object.entries(j.selector).map(([k, v]) => `${k}=${v}`).join(", ")}` : "a list of devices",
        ` — ${j.devices} devices, ${j.launched} launched`),
      el("div#job-progress", { "data-state": j.state }, progress(j)),
      el("p.muted", { text: `Rollout: ${j.rollout.max_per_minute} a minute, ${j.rollout.max_in_flight} in flight; ` +
        (j.abort ? `aborts above ${j.abort.failure_percent} % failed once ${j.abort.min_finished} finished; ` : "no abort rule; ") +
        `timeout ${j.timeout_ms} ms.` + (j.reason ? ` Reason: ${j.reason}` : "") }),
      open ? el("button.danger#job-cancel", {
        type: "button", text: "Cancel job",
        onclick: async () => {
          try { await call("POST", p`/v1/jobs/${id}/cancel`); } catch (e) { showError(err, e); }
        },
      }) : null);
      fill(execs, el("h2", { text: "Executions" }), el("table", {},
        el("thead", {}, el("tr", {}, ...["Device", "Status", "Command", "Updated"].map((t) => el("th", { text: t })))),
        el("tbody", {}, ex.items.map((x) => el("tr", {},
          el("td", {}, el("a", { href: `#/device/${encodeURIComponent(x.device)}`, text: x.device })),
          el("td", {}, badge(x.status)), el("td", { text: x.command ?? "–" }), el("td", { text: when(x.updated_at) }))))),
      ex.next ? el("p.muted", { text: "The first 100 executions." }) : null);
    } catch (e) {
      showError(err, e);
    }
  });
}

// ---- live -------------------------------------------------------------------------

/** Events kept on screen. */
const MAX_EVENTS = 200;
/** Characters of an event's data shown (a device's attributes can be large). */
const MAX_EVENT_TEXT = 2000;
const clip = (t) => (t.length > MAX_EVENT_TEXT ? `${t.slice(0, MAX_EVENT_TEXT)} … (${t.length} characters)` : t);

function liveView(ctx) {
  const state = el("span#live-state.badge", { text: "connecting" });
  const err = el("div");
  const events = scrollable(el("div.card.events#live-events"), "Events");
  const charts = el("div.grid#live-charts");
  fill(main, el("h1", {}, "Live ", state), err, charts, el("h2", { text: "Events" }), events);
  const lines = [
    new Sparkline(charts, "Commands sent to devices", "/s", 2),
    new Sparkline(charts, "Device state reports", "/s", 2),
    new Sparkline(charts, "Device messages", "/s", 2),
    new Sparkline(charts, "Connected devices", "", 0),
    new Sparkline(charts, "REST write latency (mean)", "ms", 1),
  ];
  lines.forEach((l, i) => { l.card.id = `chart-${["commands", "reports", "messages", "sessions", "latency"][i]}`; });
  let prev = null;
  let prevAt = 0;
  ctx.every(2000, async () => {
    try {
      const text = await get("/metrics", { signal: ctx.signal, headers: { Accept: "text/plain" } });
      const now = performance.now();
      const cur = parseMetrics(text);
      const f = figures(prev, cur, (now - prevAt) / 1000);
      [f.commands, f.reports, f.messages, f.sessions, f.latency].forEach((v, i) => lines[i].push(v));
      prev = cur;
      prevAt = now;
    } catch (e) {
      showError(err, e);
    }
  });
  followEvents({
    signal: ctx.signal,
    onState: (s) => {
      if (s instanceof ApiProblem) {
        state.textContent = "disconnected";
        showError(err, s);
      } else {
        state.textContent = s === "open" ? "live" : "reconnecting";
        if (s === "open") showError(err, null);
      }
    },
    onEvent: (ev) => {
      const line = el("div", { "data-event": ev.event },
        el("span.muted", { text: `#${ev.id} ` }), el("span.kind", { text: ev.event }), " ",
        clip(typeof ev.data === "string" ? ev.data : JSON.stringify(ev.data)));
      events.prepend(line);
      while (events.childElementCount > MAX_EVENTS) events.lastElementChild.remove();
    },
  });
}

// ---- routing ------------------------------------------------------------------------

const VIEWS = {
  group: (ctx) => groupView(ctx),
  devices: (ctx, _arg, q) => devicesView(ctx, q),
  device: (ctx, arg) => deviceView(ctx, arg),
  commands: (ctx, _arg, q) => commandsView(ctx, q),
  jobs: (ctx, _arg, q) => jobsView(ctx, q),
  job: (ctx, arg) => jobView(ctx, arg),
  live: (ctx) => liveView(ctx),
};

function render() {
  if (current) current.stop();
  current = new ViewCtx();
  const [path, qs] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  if (!token() || name === "signin") {
    signinView();
    return;
  }
  signinProblem = null;
  const view = VIEWS[name] ? name : "group";
  nav.hidden = false;
  for (const a of nav.querySelectorAll("a")) {
    const v = a.dataset.view;
    a.classList.toggle("active", v === view || (v === "devices" && view === "device") || (v === "jobs" && view === "job"));
  }
  let arg = rest.join("/");
  try { arg = decodeURIComponent(arg); } catch (_) { /* shown as typed */ }
  VIEWS[view](current, arg, new URLSearchParams(qs || ""));
}

document.getElementById("signout").addEventListener("click", () => {
  clearToken();
  signinProblem = null;
  location.hash = "#/signin";
});
window.addEventListener("hashchange", render);
render();
