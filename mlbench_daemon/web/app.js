// The status page: hash-routed views (#/ overview, #/jobs, #/jobs/<id>, #/launch),
// each refreshed by chained timers while it is shown and the tab is visible.

import { ApiError, getJSON, request } from "./api.js";
import { LogView, download, follow, loadTail } from "./log.js";
import { loadVocabulary, vocabulary } from "./vocabulary.js";

const NODES_EVERY_MS = 2000;
const JOBS_EVERY_MS = 2000;
const BACKOFF_MAX_MS = 30000;
// A cancel answers after TERM, mpi.cancel_grace_s, KILL and a sweep of every host, each
// step bounded by the SSH timeouts (about two minutes with the defaults): wait longer.
const CANCEL_TIMEOUT_MS = 600000;
// The phase and state names come from /api/openapi.json (vocabulary.js); here only how
// the page shows the ones it knows: a phase it does not know gets "?" and sorts first,
// and every state but the active ones is final.
const PHASE_MARK = { Running: "\u25cf", Pending: "\u25cc", Unknown: "\u25b2", Failed: "\u2716" };
const PHASE_ORDER = ["Running", "Pending", "Unknown", "Failed"]; // the counts; the table reverses
const ACTIVE = ["pending", "running"];
const STYLED = { phases: PHASE_ORDER, states: [...ACTIVE, "failed", "cancelled"] };
const phaseRank = (p) => {
  const i = PHASE_ORDER.indexOf(p);
  return i < 0 ? PHASE_ORDER.length : i;
};
const phases = () => [...vocabulary.phases].sort((a, b) => phaseRank(a) - phaseRank(b));
const isFinal = (state) => vocabulary.states.includes(state) && !ACTIVE.includes(state);

const $ = (id) => document.getElementById(id);

// ---- freshness: "updated N s ago" and the connection banner -----------------------

let lastOk = 0;
const failing = new Set(); // pollers whose last round failed on the connection or a 5xx

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
function tickClock() {
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

function poller(name, every, fn) {
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

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do {
    n /= 1024;
    i++;
  } while (n >= 1024 && i < units.length - 1);
  return `${n.toFixed(1)} ${units[i]}`;
}

function fmtAge(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "\u2014";
}

function fmtDuration(job) {
  if (!job.started) return "\u2014";
  const end = job.finished ? Date.parse(job.finished) : Date.now();
  let s = Math.max(0, Math.round((end - Date.parse(job.started)) / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  s %= 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// The cause of a job's end: `failure` ({kind, node, host, rank, exit_code, signal,
// message, hint, checks}, parts null when unknown) when the daemon gives one, else
// the older `reason` and `error`.
const FAILURE_FIELDS = [
  ["kind", "Kind"],
  ["node", "Node"],
  ["host", "Host (as the launcher named it)"],
  ["rank", "Rank"],
  ["exit_code", "Exit code"],
  ["signal", "Signal"],
  ["message", "Message"],
  ["hint", "What to do"],
];

function cause(job) {
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
function syncRows(tbody, items, key, make, update) {
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

function row(cells, header = 0) {
  const tr = document.createElement("tr");
  for (let i = 0; i < cells; i++) {
    const c = document.createElement(i < header ? "th" : "td");
    if (i < header) c.scope = "row";
    tr.appendChild(c);
  }
  return tr;
}

// ---- overview -----------------------------------------------------------------------

let lastCounts = "";
let knownNodes = [];

// `staleReason`: why discovery is stale, from the node list's X-Discovery-Stale header
// (/healthz, open to all, gives only whether it is); null when it is not stale.
function renderNodes(nodes, health, staleReason) {
  knownNodes = nodes;
  const rank = (n) => -phaseRank(n.phase); // failing (and unknown) phases first
  const sorted = [...nodes].sort(
    (a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name, undefined, { numeric: true }),
  );
  syncRows(
    $("nodes").tBodies[0],
    sorted,
    (n) => n.name,
    () => {
      const tr = row(8, 1);
      const details = document.createElement("details");
      details.appendChild(document.createElement("summary"));
      details.appendChild(document.createElement("ul"));
      tr.cells[7].appendChild(details);
      return tr;
    },
    (tr, n) => {
      const c = tr.cells;
      setText(c[0], n.name);
      setText(c[1], `${PHASE_MARK[n.phase] || "?"} ${n.phase}`);
      if (tr.dataset.phase !== n.phase) {
        tr.dataset.phase = n.phase;
        c[1].className = `phase phase-${n.phase.toLowerCase()}`;
      }
      setText(c[2], n.reason);
      setText(c[3], n.message);
      setText(c[4], n.ip);
      setText(c[5], n.latency_ms === null ? "\u2014" : `${n.latency_ms.toFixed(1)} ms`);
      setText(c[6], fmtAge(n.last_probe));
      const labels = Object.entries(n.label_map).sort();
      const details = c[7].firstElementChild;
      setText(details.firstElementChild, `${labels.length} label${labels.length === 1 ? "" : "s"}`);
      const text = labels.map(([k, v]) => `${k}=${v}`).join("\n");
      if (details.dataset.text !== text) {
        details.dataset.text = text;
        details.lastElementChild.replaceChildren(
          ...labels.map(([k, v]) => {
            const li = document.createElement("li");
            li.textContent = `${k}=${v}`;
            return li;
          }),
        );
      }
    },
  );
  $("nodes-empty").hidden = nodes.length > 0;

  const order = phases();
  const counts = Object.fromEntries(order.map((p) => [p, 0]));
  for (const n of nodes) counts[n.phase] = (counts[n.phase] || 0) + 1;
  syncRows(
    $("phase-counts"),
    order,
    (p) => p,
    (p) => {
      const li = document.createElement("li");
      li.className = `phase phase-${p.toLowerCase()}`;
      return li;
    },
    (li, p) => setText(li, `${PHASE_MARK[p] || "?"} ${p}: ${counts[p]}`),
  );
  const bar = $("phase-bar");
  syncRows(
    bar,
    order,
    (p) => p,
    (p) => {
      const span = document.createElement("span");
      span.className = `seg phase-${p.toLowerCase()}`;
      return span;
    },
    (span, p) => {
      span.style.flexGrow = String(counts[p]); // CSSOM, allowed by the CSP
      setText(span, counts[p] ? PHASE_MARK[p] || "?" : "");
    },
  );
  const summary = `${nodes.length} node${nodes.length === 1 ? "" : "s"}: ${order
    .map((p) => `${counts[p]} ${p}`)
    .join(", ")}`;
  if (summary !== lastCounts) {
    lastCounts = summary;
    $("counts-live").textContent = summary; // the one polite live region
  }

  if (health) {
    setText(
      $("health-line"),
      `Daemon health: ${health.status}; ${health.running} of ${health.nodes} nodes Running`,
    );
    const stale = $("stale-line");
    stale.hidden = !health.discovery_stale;
    let why = staleReason && staleReason !== "stale" ? staleReason : "";
    if (!why && health.discovery_age_s != null)
      why = `the last good answer is ${Math.round(health.discovery_age_s)} s old`;
    setText(stale, health.discovery_stale ? `DNS discovery is stale${why ? `: ${why}` : ""}` : "");
  }
}

const nodesPoller = poller("nodes", NODES_EVERY_MS, async (signal) => {
  await loadVocabulary(STYLED);
  const [[nodes, staleReason], health] = await Promise.all([
    request("/api/nodes", {
      signal,
      read: async (r) => [await r.json(), r.headers.get("X-Discovery-Stale")],
    }),
    getJSON("/healthz", { signal }),
  ]);
  renderNodes(nodes, health, staleReason);
  renderNodePicks(nodes);
});

// ---- jobs -----------------------------------------------------------------------------

let jobsCache = [];

function renderJobs() {
  const want = $("state-filter").value;
  const jobs = jobsCache.filter((j) => !want || j.state === want);
  syncRows(
    $("jobs").tBodies[0],
    jobs,
    (j) => j.id,
    (j) => {
      const tr = row(9, 1);
      const a = document.createElement("a");
      a.href = `#/jobs/${j.id}`;
      a.textContent = j.id;
      tr.cells[0].appendChild(a);
      tr.cells[2].className = "command";
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "Cancel";
      b.setAttribute("aria-label", `Cancel job ${j.id}`);
      b.addEventListener("click", () => confirmCancel(tr.dataset.key, b));
      tr.cells[8].appendChild(b);
      return tr;
    },
    (tr, j) => {
      const c = tr.cells;
      setText(c[1], j.state);
      c[1].className = `state state-${j.state}`;
      setText(c[2], j.command);
      setText(c[3], j.master_name || "\u2014");
      setText(c[4], fmtTime(j.created));
      setText(c[5], fmtDuration(j));
      setText(c[6], j.exit_code === null ? "\u2014" : String(j.exit_code));
      setText(c[7], cause(j));
      c[8].firstElementChild.hidden = isFinal(j.state);
    },
  );
  $("jobs-empty").hidden = jobs.length > 0;
}

const jobsPoller = poller("jobs", JOBS_EVERY_MS, async (signal) => {
  await loadVocabulary(STYLED);
  showStates();
  jobsCache = await getJSON("/api/mpi_jobs?limit=200", { signal });
  renderJobs();
});
$("state-filter").addEventListener("change", renderJobs);

// The filter's choices: every state the document declares.
function showStates() {
  syncRows(
    $("state-filter"),
    ["", ...vocabulary.states],
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

function confirmCancel(jobId, button) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent =
    `Job ${jobId} gets TERM, then KILL after the grace period; every host is then checked for its processes.`;
  $("confirm-no").onclick = () => dialog.close();
  $("confirm-form").onsubmit = async (ev) => {
    ev.preventDefault();
    dialog.close();
    button.disabled = true;
    button.textContent = "Cancelling\u2026";
    try {
      await request(`/api/mpi_jobs/${encodeURIComponent(jobId)}`, {
        method: "DELETE",
        timeout: CANCEL_TIMEOUT_MS,
        read: (r) => r.json(),
      });
    } catch (e) {
      alertInline(button, e.message);
    } finally {
      button.disabled = false;
      button.textContent = button.id === "job-cancel" ? "Cancel job" : "Cancel";
      for (const p of pollers) if (p.on) p.kick();
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

// ---- job detail ---------------------------------------------------------------------

const detail = { id: null, job: null, view: null, ctrl: null };

// A <dl> of [term, value] pairs: values are updated in place while the terms stay
// the same (a selection survives a refresh); rebuilt when the terms change.
function dl(el, pairs) {
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

function showExtent() {
  const v = detail.view;
  const total = Math.max(detail.job ? detail.job.log_bytes : 0, v.end);
  const shown = v.end - v.shownFrom;
  let text;
  if (!total) text = "No output yet";
  else if (shown >= total) text = `Showing all ${fmtBytes(total)}`;
  else text = `Showing the last ${fmtBytes(shown)} of ${fmtBytes(total)}`;
  setText($("log-extent"), text);
}

function renderJob(job) {
  detail.job = job;
  setText($("h-job"), `Job ${job.id}: ${job.state}`);
  dl($("job-record"), [
    ["State", job.state],
    ["Command", job.command],
    ["Master", job.master_name || "\u2014"],
    ["Launcher", job.flavour || "\u2014"],
    ["Nodes", job.nodes.map((n) => n[2]).join(", ")],
    ["Ranks (np)", job.np === null ? "one per slot" : String(job.np)],
    ["Environment", Object.keys(job.env).join(", ") || "\u2014"],
    ["Timeout", job.timeout_s ? `${job.timeout_s} s` : "none"],
    ["Created", fmtTime(job.created)],
    ["Started", fmtTime(job.started)],
    ["Finished", fmtTime(job.finished)],
    ["Duration", fmtDuration(job)],
    ["Exit code", job.exit_code === null ? "\u2014" : String(job.exit_code)],
    ["Log", fmtBytes(job.log_bytes)],
  ]);
  const f = job.failure;
  const pairs = [];
  if (f && typeof f === "object") {
    const show = (v) => (typeof v === "object" ? JSON.stringify(v) : String(v));
    for (const [k, label] of FAILURE_FIELDS) if (f[k] != null && f[k] !== "") pairs.push([label, show(f[k])]);
    for (const c of Array.isArray(f.checks) ? f.checks : []) {
      const text = typeof c === "object" && c !== null
        ? [c.node, c.check || c.name, c.status || c.result, c.message].filter((x) => x != null).join(" \u2014 ")
        : show(c);
      pairs.push(["Failed check", text]);
    }
    const known = new Set([...FAILURE_FIELDS.map(([k]) => k), "checks"]);
    for (const [k, v] of Object.entries(f)) if (!known.has(k) && v != null) pairs.push([k, show(v)]);
    if (job.reason) pairs.push(["Reason", job.reason]);
    if (job.error && job.error !== f.message) pairs.push(["Daemon's note", job.error]);
  } else {
    if (job.reason) pairs.push(["Reason", job.reason]);
    if (job.error) pairs.push([job.state === "cancelled" ? "Result" : "Error", job.error]);
    if (job.state === "failed" && job.exit_code !== null && !job.reason)
      pairs.push(["Cause", `the program exited with code ${job.exit_code}; see the end of the log`]);
  }
  $("job-failure").hidden = pairs.length === 0;
  dl($("job-failure-fields"), pairs);
  $("job-cancel").hidden = isFinal(job.state);
  showExtent();
}

const jobPoller = poller("job", JOBS_EVERY_MS, async (signal) => {
  await loadVocabulary(STYLED);
  const job = await getJSON(`/api/mpi_jobs/${encodeURIComponent(detail.id)}`, { signal });
  renderJob(job);
  if (isFinal(job.state) && !detail.ctrl) jobPoller.on = false; // nothing will change
});

// One follow stream per tab: this is it.  Loads the tail, then follows from its end;
// after a dropped stream it goes on from what it has, with backoff.
async function startFollow() {
  stopFollow();
  const ctrl = (detail.ctrl = new AbortController());
  const id = detail.id;
  let failures = 0;
  try {
    let offset = await loadTail(id, detail.view, ctrl.signal);
    while (!ctrl.signal.aborted && $("log-follow").checked) {
      try {
        await follow(id, offset, detail.view, ctrl.signal);
        failures = 0;
      } catch (e) {
        if (ctrl.signal.aborted) return;
        if (e instanceof ApiError && e.timedOut) continue; // a silent job: ask again
        failures++;
        if (e instanceof ApiError && e.code === "too-many-streams") {
          setText($("log-extent"), "The daemon serves as many log streams as it may; retrying");
        } else if (!(e instanceof ApiError) || e.transient) failing.add(followState);
        if (e instanceof ApiError && !e.transient && e.code !== "too-many-streams") throw e;
        await new Promise((r) => setTimeout(r, Math.min(BACKOFF_MAX_MS, 1000 * 2 ** failures)));
        continue;
      } finally {
        offset = detail.view.end;
      }
      failing.delete(followState);
      const job = await getJSON(`/api/mpi_jobs/${encodeURIComponent(id)}`, { signal: ctrl.signal });
      renderJob(job);
      if (isFinal(job.state) && detail.view.end >= job.log_bytes) break;
      await new Promise((r) => setTimeout(r, 1000)); // the daemon ended the stream early
    }
  } catch (e) {
    if (!ctrl.signal.aborted) setText($("log-extent"), `Log not available: ${e.message}`);
  } finally {
    failing.delete(followState);
    if (detail.ctrl === ctrl) {
      detail.ctrl = null;
      $("log-follow").checked = false;
      if (detail.job && isFinal(detail.job.state)) $("log-follow").disabled = true;
    }
  }
}
const followState = {}; // the follow stream's entry in `failing`

function stopFollow() {
  if (detail.ctrl) detail.ctrl.abort();
  detail.ctrl = null;
  failing.delete(followState);
}

$("log-follow").addEventListener("change", () => {
  if ($("log-follow").checked) {
    jobPoller.start();
    startFollow();
  } else stopFollow();
});

$("job-cancel").addEventListener("click", () => confirmCancel(detail.id, $("job-cancel")));

$("log-download").addEventListener("click", async () => {
  const state = $("log-download-state");
  const button = $("log-download");
  button.disabled = true;
  try {
    const n = await download(detail.id, (got) => setText(state, `${fmtBytes(got)} fetched`));
    setText(state, `${fmtBytes(n)} saved`);
  } catch (e) {
    setText(state, `Download failed: ${e.message}`);
  } finally {
    button.disabled = false;
  }
});

async function openJob(id, followIt) {
  detail.id = id;
  detail.job = null;
  if (!detail.view) detail.view = new LogView($("log"), showExtent);
  detail.view.reset();
  $("job-record").replaceChildren();
  delete $("job-record").dataset.terms;
  $("job-failure").hidden = true;
  $("job-missing").hidden = true;
  setText($("h-job"), `Job ${id}`);
  setText($("log-download-state"), "");
  $("log-follow").disabled = false;
  jobPoller.start();
  try {
    await loadVocabulary(STYLED);
    const job = await getJSON(`/api/mpi_jobs/${encodeURIComponent(id)}`);
    if (detail.id !== id) return;
    renderJob(job);
    $("log-follow").checked = followIt || !isFinal(job.state);
    if ($("log-follow").checked) startFollow();
    else {
      $("log-follow").disabled = true;
      const ctrl = (detail.ctrl = new AbortController());
      try {
        await loadTail(id, detail.view, ctrl.signal);
      } finally {
        if (detail.ctrl === ctrl) detail.ctrl = null;
      }
    }
  } catch (e) {
    if (detail.id !== id || e.name === "AbortError") return;
    $("job-missing").hidden = false;
    setText($("job-missing"), e.message);
  }
}

// ---- launch ---------------------------------------------------------------------------

function renderNodePicks(nodes) {
  const box = $("launch-nodes");
  syncRows(
    box,
    [...nodes].sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true })),
    (n) => n.name,
    (n) => {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = n.name;
      label.append(input, document.createTextNode(""));
      return label;
    },
    (label, n) => {
      setText(label.lastChild, ` ${n.name} (${n.phase})`);
    },
  );
}

function lines(text) {
  return text.split("\n").map((s) => s.replace(/\r$/, "")).filter((s) => s !== "");
}

function launchBody() {
  const body = { wait: false };
  const program = lines($("launch-program").value);
  if (program.length) body.program = program;
  const np = $("launch-np").value.trim();
  if (np) body.np = Number(np);
  const env = {};
  for (const l of lines($("launch-env").value)) {
    const eq = l.indexOf("=");
    if (eq < 1) throw new Error(`environment: "${l}" is not NAME=value`);
    env[l.slice(0, eq)] = l.slice(eq + 1);
  }
  if (Object.keys(env).length) body.env = env;
  const nodes = [...$("launch-nodes").querySelectorAll("input:checked")].map((i) => i.value);
  if (nodes.length) body.nodes = nodes;
  const selector = $("launch-selector").value.trim();
  if (selector) body.selector = selector;
  const timeout = $("launch-timeout").value.trim();
  if (timeout) body.timeout_s = Number(timeout);
  return body;
}

// ---- preflight: the launch form's fields checked from the master -------------------

const PREFLIGHT_FIELDS = ["program", "np", "selector", "nodes", "master"];
const CHECK_MARK = { pass: "\u2714 pass", fail: "\u2716 fail", "not-checked": "\u2013 not checked" };
// a preflight is bounded by mpi.preflight_timeout_s (20 s by default): wait longer
const PREFLIGHT_TIMEOUT_MS = 120000;

function renderPreflight(result) {
  const order = { fail: 0, "not-checked": 1, pass: 2 };
  const checks = [...result.checks].sort((a, b) => order[a.status] - order[b.status]);
  const failed = checks.filter((c) => c.status === "fail").length;
  const unchecked = checks.filter((c) => c.status === "not-checked").length;
  setText(
    $("preflight-summary"),
    `${result.ok ? "\u2714 Nothing failed" : `\u2716 ${failed} check${failed === 1 ? "" : "s"} failed`}` +
      ` (${checks.length} run from ${result.master_name}, ${result.flavour}` +
      `${unchecked ? `; ${unchecked} not checked` : ""}).`,
  );
  $("preflight-summary").className = result.ok ? "ok-text" : "error";
  const body = $("preflight-checks").tBodies[0];
  body.replaceChildren(
    ...checks.map((c) => {
      const tr = row(5, 1);
      tr.cells[0].textContent = c.node || "all nodes";
      tr.cells[1].textContent = c.check;
      tr.cells[2].textContent = CHECK_MARK[c.status] || c.status;
      tr.cells[2].className = c.status === "fail" ? "error" : c.status === "pass" ? "ok-text" : "";
      tr.cells[3].textContent = c.message;
      tr.cells[4].textContent = c.status === "pass" ? "" : c.hint || "";
      return tr;
    }),
  );
  $("preflight").hidden = false;
}

$("preflight-run").addEventListener("click", async () => {
  const button = $("preflight-run");
  const state = $("preflight-state");
  const err = $("launch-error");
  err.hidden = true;
  button.disabled = true;
  setText(state, "Checking from the master\u2026");
  try {
    const full = launchBody();
    const body = Object.fromEntries(PREFLIGHT_FIELDS.filter((k) => k in full).map((k) => [k, full[k]]));
    renderPreflight(
      await getJSON("/api/preflight/", { method: "POST", body, timeout: PREFLIGHT_TIMEOUT_MS }),
    );
    setText(state, "");
    $("h-preflight").focus();
  } catch (e) {
    setText(state, "");
    err.textContent = `Preflight not run: ${e.message}`;
    err.hidden = false;
    err.focus();
  } finally {
    button.disabled = false;
  }
});

$("launch-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const err = $("launch-error");
  const submit = $("launch-submit");
  err.hidden = true;
  submit.disabled = true;
  try {
    const job = await getJSON("/api/mpi_jobs/", {
      method: "POST",
      body: launchBody(),
      timeout: 30000,
    });
    pendingFollow = job.id;
    location.hash = `#/jobs/${job.id}`;
  } catch (e) {
    err.textContent = `Not launched: ${e.message}`;
    err.hidden = false;
    err.focus();
  } finally {
    submit.disabled = false;
  }
});
let pendingFollow = null;

// ---- routing --------------------------------------------------------------------------

const VIEWS = ["overview", "jobs", "job", "launch"];

function route() {
  const hash = location.hash || "#/";
  let view = "overview";
  let jobId = null;
  let m;
  if (hash === "#/jobs") view = "jobs";
  else if ((m = /^#\/jobs\/([0-9A-Za-z]+)$/.exec(hash))) {
    view = "job";
    jobId = m[1];
  } else if (hash === "#/launch") view = "launch";
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === view || (view === "job" && a.dataset.view === "jobs"))
      a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  // only what is shown is polled; leaving the job view closes its follow stream
  nodesPoller.stop();
  jobsPoller.stop();
  jobPoller.stop();
  stopFollow();
  if (view === "overview" || view === "launch") nodesPoller.start();
  if (view === "jobs") jobsPoller.start();
  if (view === "job") {
    const followIt = pendingFollow === jobId;
    pendingFollow = null;
    openJob(jobId, followIt);
  }
  document.title = `${{ overview: "Overview", jobs: "Jobs", job: `Job ${jobId}`, launch: "Launch" }[view]} \u2013 mlbench-daemon`;
  return view;
}

let first = true;
window.addEventListener("hashchange", () => {
  const view = route();
  if (!first) $(`h-${view}`).focus(); // a screen reader hears where it went
});
route();
first = false;
tickClock();
