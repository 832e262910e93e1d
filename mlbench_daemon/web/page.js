// What every view shares: the freshness line and banner, chained-timer polling, the
// vocabulary from the served document, formatting, table rows, the cancel dialog.

import { ApiError, getJSON, request } from "./api.js";
import { vocabulary } from "./vocabulary.js";

export const NODES_EVERY_MS = 2000;
export const JOBS_EVERY_MS = 2000;
export const BACKOFF_MAX_MS = 30000;
// A cancel answers within server.cancel_answer_s (202 while TERM, mpi.cancel_grace_s,
// KILL and the sweep of every host go on in the daemon; the pollers then show the end).
const CANCEL_TIMEOUT_MS = 600000;
// The phase and state names come from /api/openapi.json (vocabulary.js); here only how
// the page shows the ones it knows: a phase it does not know gets "?" and sorts first,
// and every job or run state but the active ones is final.
export const PHASE_MARK = { Running: "\u25cf", Pending: "\u25cc", Unknown: "\u25b2", Failed: "\u2716" };
const PHASE_ORDER = ["Running", "Pending", "Unknown", "Failed"]; // the counts; the table reverses
const ACTIVE = ["pending", "running"];
const RUN_ACTIVE = ["initialized", "started"]; // an MLBench run's (RunState): the others are final
export const STYLED = {
  phases: PHASE_ORDER,
  states: [...ACTIVE, "failed", "cancelled"],
  runStates: [...RUN_ACTIVE, "finished", "failed"],
};
export const phaseRank = (p) => {
  const i = PHASE_ORDER.indexOf(p);
  return i < 0 ? PHASE_ORDER.length : i;
};
export const phases = () => [...vocabulary.phases].sort((a, b) => phaseRank(a) - phaseRank(b));
export const isFinal = (state) => vocabulary.states.includes(state) && !ACTIVE.includes(state);
export const isRunFinal = (state) => vocabulary.runStates.includes(state) && !RUN_ACTIVE.includes(state);

export const $ = (id) => document.getElementById(id);

// ---- who am I: the page hides what the token's role cannot do (the API refuses anyway) --

// Until /api/whoami answers, nothing may be launched or cancelled from the page.
export const me = { known: false, name: null, role: null, can_submit: false, can_cancel: "none" };

export async function loadMe() {
  Object.assign(me, await getJSON("/api/whoami"), { known: true });
  const who = $("whoami");
  who.textContent = me.auth ? `${me.name} (${me.role})` : "";
  who.hidden = !me.auth;
  $("nav-launch").hidden = !me.can_submit;
}

export const mayCancel = (job) =>
  me.can_cancel === "all" || (me.can_cancel === "own" && me.name !== null && job.submitted_by === me.name);

// ---- freshness: "updated N s ago" and the connection banner -----------------------

let lastOk = 0;
export const failing = new Set(); // pollers whose last round failed on the connection or a 5xx

function showFreshness() {
  const el = $("updated");
  if (!lastOk) el.textContent = "Not updated yet";
  else {
    const s = Math.max(0, Math.round((Date.now() - lastOk) / 1000));
    el.textContent = `Updated ${s} s ago`;
  }
  $("banner").hidden = failing.size === 0;
}

let clock = 0;
export function tickClock() {
  clearTimeout(clock);
  showFreshness();
  if (!document.hidden) clock = setTimeout(tickClock, 1000);
}

// ---- chained-timer polling ----------------------------------------------------------

// Runs `fn(signal)` now and then again `every` ms after each round ends (never
// setInterval), with exponential backoff after failures; paused while the tab is
// hidden; stop() aborts the round in flight.
class Poller {
  constructor(name, every, fn) {
    Object.assign(this, { name, every, fn, timer: 0, ctrl: null, failures: 0, on: false });
  }

  start() {
    this.on = true;
    this.kick();
  }

  stop() {
    this.on = false;
    this.pause();
    failing.delete(this);
  }

  pause() {
    clearTimeout(this.timer);
    this.timer = 0;
    if (this.ctrl) this.ctrl.abort();
    this.ctrl = null;
  }

  kick() {
    this.pause();
    if (this.on && !document.hidden) this.round();
  }

  async round() {
    const ctrl = (this.ctrl = new AbortController());
    try {
      await this.fn(ctrl.signal);
      this.failures = 0;
      failing.delete(this);
      lastOk = Date.now();
    } catch (e) {
      if (ctrl.signal.aborted) return; // stopped or paused: a new round is someone else's
      this.failures++;
      if (!(e instanceof ApiError) || e.transient) {
        failing.add(this);
        $("banner-detail").textContent = `(${e.message})`;
      } else {
        console.warn(`${this.name}: ${e.message}`);
      }
    } finally {
      if (this.ctrl === ctrl) this.ctrl = null;
    }
    showFreshness();
    if (!this.on || document.hidden) return;
    const backoff = Math.min(BACKOFF_MAX_MS, this.every * 2 ** Math.min(this.failures, 5));
    const delay = this.failures ? backoff * (0.75 + Math.random() / 2) : this.every;
    this.timer = setTimeout(() => this.round(), delay);
  }
}

const pollers = [];

export function poller(name, every, fn) {
  const p = new Poller(name, every, fn);
  pollers.push(p);
  return p;
}

function onVisibility() {
  if (document.hidden) {
    for (const p of pollers) p.pause();
  } else {
    for (const p of pollers) p.kick(); // an immediate refresh of what is shown
    tickClock();
  }
}
document.addEventListener("visibilitychange", onVisibility);
document.addEventListener("freeze", () => pollers.forEach((p) => p.pause()));
document.addEventListener("resume", onVisibility);

// ---- small helpers ----------------------------------------------------------------

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do {
    n /= 1024;
    i++;
  } while (n >= 1024 && i < units.length - 1);
  return `${n.toFixed(1)} ${units[i]}`;
}

export function fmtAge(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

export function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "\u2014";
}

export function fmtDuration(job) {
  return fmtSpan(job.started, job.finished);
}

// From `start` to `end` (ISO dates; no end: until now).
export function fmtSpan(start, end) {
  if (!start) return "\u2014";
  const until = end ? Date.parse(end) : Date.now();
  let s = Math.max(0, Math.round((until - Date.parse(start)) / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  s %= 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

// A <dl> of [term, value] pairs: values are updated in place while the terms stay
// the same (a selection survives a refresh); rebuilt when the terms change.
export function dl(el, pairs) {
  const terms = pairs.map((p) => p[0]).join("\u0000");
  if (el.dataset.terms !== terms) {
    el.dataset.terms = terms;
    const items = [];
    for (const [k] of pairs) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      items.push(dt, document.createElement("dd"));
    }
    el.replaceChildren(...items);
  }
  pairs.forEach(([, v], i) => setText(el.children[2 * i + 1], v));
}

export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// The cause of a job's end: `failure` ({kind, node, host, rank, exit_code, signal,
// message, hint, checks}, parts null when unknown) when the daemon gives one, else
// the older `reason` and `error`.
export const FAILURE_FIELDS = [
  ["kind", "Kind"],
  ["node", "Node"],
  ["host", "Host (as the launcher named it)"],
  ["rank", "Rank"],
  ["exit_code", "Exit code"],
  ["signal", "Signal"],
  ["message", "Message"],
  ["hint", "What to do"],
];

export function cause(job) {
  const f = job.failure;
  if (f && typeof f === "object") {
    const where = [f.node || f.host ? `on ${f.node || f.host}` : "", f.rank != null ? `rank ${f.rank}` : ""];
    const head = [f.kind, ...where].filter(Boolean).join(" ");
    return f.message ? `${head}: ${f.message}` : head;
  }
  if (job.reason || job.error) return [job.reason, job.error].filter(Boolean).join(": ");
  if (job.state === "failed" && job.exit_code !== null) return `exited with code ${job.exit_code}`;
  return "";
}

// Keep tbody's rows, one per key, in `keys` order: rows are updated in place (focus and
// text selections survive a refresh), created or removed only when their key comes or goes.
export function syncRows(tbody, items, key, make, update) {
  const have = new Map();
  for (const tr of tbody.children) have.set(tr.dataset.key, tr);
  const want = new Set(items.map(key));
  for (const [k, tr] of have) if (!want.has(k)) tr.remove();
  let prev = null;
  for (const item of items) {
    const k = key(item);
    let tr = have.get(k);
    if (!tr) {
      tr = make(item);
      tr.dataset.key = k;
    }
    update(tr, item);
    const next = prev ? prev.nextElementSibling : tbody.firstElementChild;
    if (next !== tr) tbody.insertBefore(tr, next);
    prev = tr;
  }
}

// A state filter's choices: "" (every state), then `states` as the document declares them.
export function stateOptions(select, states) {
  syncRows(
    select,
    ["", ...states],
    (s) => s,
    (s) => {
      const option = document.createElement("option");
      option.value = s;
      option.textContent = s || "all states";
      return option;
    },
    () => {},
  );
}

export function row(cells, header = 0) {
  const tr = document.createElement("tr");
  for (let i = 0; i < cells; i++) {
    const c = document.createElement(i < header ? "th" : "td");
    if (i < header) c.scope = "row";
    tr.appendChild(c);
  }
  return tr;
}

export function confirmCancel(jobId, button) {
  confirmAction(button, {
    title: "Cancel this job?",
    text: `Job ${jobId} gets TERM, then KILL after the grace period; every host is then checked for its processes.`,
    no: "Keep it running",
    yes: "Cancel the job",
    busy: "Cancelling\u2026",
    path: `/api/mpi_jobs/${encodeURIComponent(jobId)}`,
    read: (r) => r.json(),
  });
}

// The confirm dialog, then DELETE `path` with `button` disabled meanwhile; a failure is
// shown beside the button; every poller shown refreshes after.  `done(ok)` runs last.
export function confirmAction(button, { title, text, no, yes, busy, path, read, before, done }) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-no").textContent = no;
  $("confirm-yes").textContent = yes;
  $("confirm-no").onclick = () => dialog.close();
  $("confirm-form").onsubmit = async (ev) => {
    ev.preventDefault();
    dialog.close();
    const label = button.textContent;
    button.disabled = true;
    button.textContent = busy;
    if (before) before(); // e.g. stop polling what the DELETE removes
    let ok = false;
    try {
      await request(path, { method: "DELETE", timeout: CANCEL_TIMEOUT_MS, read });
      ok = true;
    } catch (e) {
      alertInline(button, e.message);
    } finally {
      button.disabled = false;
      button.textContent = label;
      for (const p of pollers) if (p.on) p.kick();
      if (done) done(ok);
    }
  };
  dialog.showModal();
  $("confirm-no").focus();
}

function alertInline(near, message) {
  let p = near.parentElement.querySelector(".error");
  if (!p) {
    p = document.createElement("span");
    p.className = "error";
    near.parentElement.appendChild(p);
  }
  p.textContent = ` ${message}`;
}
