// Small live charts drawn as inline SVG, and the /metrics (Prometheus text)
// reading they are fed from.

const SVG = "http://www.w3.org/2000/svg";

/** Samples of Prometheus text: [{name, labels: {..}, value}]. */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    }
    const value = Number(m[4]);
    if (Number.isFinite(value)) out.push({ name: m[1], labels, value });
  }
  return out;
}

/** The sum of the samples named `name` whose labels pass `keep`. */
export function total(samples, name, keep = () => true) {
  return samples.filter((s) => s.name === name && keep(s.labels)).reduce((a, s) => a + s.value, 0);
}

/**
 * What the Live view charts, from two readings of /metrics `dt` seconds
 * apart (`prev` may be null: rates are then unknown).
 */
export function figures(prev, cur, dt) {
  const rate = (name) => (prev && dt > 0 ? Math.max(0, total(cur, name) - total(prev, name)) / dt : null);
  const writes = (l) => l.method !== "GET" && l.method !== "HEAD";
  let latency = null;
  if (prev) {
    const n = total(cur, "entente_http_request_duration_seconds_count", writes) -
      total(prev, "entente_http_request_duration_seconds_count", writes);
    const s = total(cur, "entente_http_request_duration_seconds_sum", writes) -
      total(prev, "entente_http_request_duration_seconds_sum", writes);
    latency = n > 0 ? (s / n) * 1000 : null;
  }
  return {
    commands: rate("entente_mqtt_commands_published_total"),
    messages: rate("entente_mqtt_publishes_received_total"),
    reports: rate("entente_mqtt_reports_received_total"),
    sessions: total(cur, "entente_mqtt_sessions"),
    latency,
  };
}

/** A chart: a title, the last value and a line of the last `max` points. */
export class Sparkline {
  constructor(parent, title, unit, digits, max = 60) {
    this.points = [];
    this.digits = digits;
    this.max = max;
    this.unit = unit;
    const card = document.createElement("div");
    card.className = "card chart";
    const h = document.createElement("h2");
    h.textContent = title;
    this.value = document.createElement("div");
    this.value.className = "value";
    this.value.textContent = "–";
    this.scale = document.createElement("div");
    this.scale.className = "scale muted";
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("viewBox", "0 0 300 100");
    this.svg.setAttribute("preserveAspectRatio", "none");
    this.svg.setAttribute("role", "img");
    this.svg.setAttribute("aria-label", title);
    card.append(h, this.value, this.scale, this.svg);
    parent.append(card);
    this.card = card;
  }

  /** Adds a point (null: no reading) and redraws. */
  push(v) {
    this.points.push(v);
    if (this.points.length > this.max) this.points.shift();
    this.value.textContent = v === null ? "–" : `${v.toFixed(this.digits)} ${this.unit}`;
    this.card.dataset.last = v === null ? "" : String(v);
    this.draw();
  }

  draw() {
    const svg = this.svg;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const vals = this.points.filter((v) => v !== null);
    const top = Math.max(1, ...vals) * 1.1;
    for (const y of [0, 50, 100]) {
      const l = document.createElementNS(SVG, "line");
      l.setAttribute("x1", "0"); l.setAttribute("x2", "300");
      l.setAttribute("y1", String(y)); l.setAttribute("y2", String(y));
      svg.append(l);
    }
    this.scale.textContent = `scale 0 – ${top.toPrecision(3)}, last ${this.max} readings`;
    const step = 300 / Math.max(1, this.max - 1);
    const offset = this.max - this.points.length;
    const pts = [];
    this.points.forEach((v, i) => {
      if (v === null) return;
      pts.push(`${((offset + i) * step).toFixed(1)},${(100 - (v / top) * 100).toFixed(1)}`);
    });
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" "));
    svg.append(line);
    if (pts.length) {
      const [x, y] = pts[pts.length - 1].split(",");
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x); dot.setAttribute("cy", y); dot.setAttribute("r", "3");
      svg.append(dot);
    }
  }
}
