// MLBench runs (#/runs, #/runs/<id>): the list, and one run with its record and plots
// over time of what its ranks post (one chart per metric name) and of what the daemon
// samples on its nodes (cpu, memory, network in/out: one chart each, one series per
// node).  The plots are redrawn while the run is live and left as they are once it ends.
// Charts are uPlot (vendored, loaded on the first run shown: the other views never pay
// for it); it styles its elements through CSSOM properties, which the CSP allows.

import { ApiError, getJSON } from "./api.js";
import { $, JOBS_EVERY_MS, STYLED, confirmAction, dl, fmtSpan, fmtTime, isRunFinal, mayCancel, poller, row, setText, stateOptions, syncRows } from "./page.js";
import { loadVocabulary, vocabulary } from "./vocabulary.js";

export const RUN_EVERY_MS = 3000;
const SUMMARIZE = 500; // a run metric is averaged by the daemon down to this many points
const MAX_POINTS = 20000; // a node series keeps its newest points, the older are dropped
// What the daemon samples on each node of a live run (PRODUCT.md "Runs and metrics").
const NODE_METRICS = [
  ["cpu", "CPU, cores in use"],
  ["memory", "Memory, MiB"],
  ["network_in", "Network in, MiB since the run started"],
  ["network_out", "Network out, MiB since the run started"],
];
// Told apart by colour and by dash pattern (a reader who does not see the colours).
const COLOURS = ["#0a58ca", "#b3261e", "#116329", "#8a4600", "#6f42c1", "#0b7285", "#57606a", "#c2255c"];
const DASHES = [[], [6, 3], [2, 3], [8, 3, 2, 3]];

// A state the served document does not declare is not taken as final: the page keeps asking.
export const isLive = (run) => !isRunFinal(run.state);
const runPath = (id) => `/api/runs/${encodeURIComponent(id)}`;
const seconds = (iso) => Date.parse(iso) / 1000;

const fmtRunDuration = (run) => fmtSpan(run.created_at, run.finished_at);

// The names of the run's nodes: job_metadata.pods is MLBench's [ip, namespace, name, labels].
function podNames(run) {
  const pods = (run.job_metadata && run.job_metadata.pods) || [];
  return pods.map((p) => (Array.isArray(p) ? p[2] : p && p.name)).filter(Boolean);
}

function jobLink(cell, jobId) {
  if (!jobId) return setText(cell, "\u2014");
  const a = cell.firstElementChild;
  if (a && a.textContent === jobId) return;
  const link = document.createElement("a");
  link.href = `#/jobs/${encodeURIComponent(jobId)}`;
  link.textContent = jobId;
  cell.replaceChildren(link);
}

function confirmDelete(run, button, done, before) {
  confirmAction(button, {
    title: "Delete this run?",
    text: isLive(run)
      ? `Run ${run.id} (${run.name}) is ${run.state}: its job is cancelled first (TERM, then KILL, every host checked), then the run and its metrics are deleted.`
      : `Run ${run.id} (${run.name}) and its metrics are deleted.`,
    no: "Keep it",
    yes: "Delete the run",
    busy: "Deleting\u2026",
    path: runPath(run.id),
    before,
    done,
  });
}

// ---- the list ---------------------------------------------------------------------------

let runsCache = [];

function renderRuns() {
  const want = $("run-state-filter").value;
  const runs = runsCache.filter((r) => !want || r.state === want);
  const sorted = [...runs].sort((a, b) => b.id - a.id); // newest first
  syncRows(
    $("runs").tBodies[0],
    sorted,
    (r) => String(r.id),
    (r) => {
      const tr = row(8, 1);
      const a = document.createElement("a");
      a.href = `#/runs/${r.id}`;
      a.textContent = String(r.id);
      tr.cells[0].appendChild(a);
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "Delete";
      b.setAttribute("aria-label", `Delete run ${r.id}`);
      b.addEventListener("click", () => confirmDelete(tr.run, b));
      tr.cells[7].appendChild(b);
      return tr;
    },
    (tr, r) => {
      tr.run = r;
      const c = tr.cells;
      setText(c[1], r.name);
      setText(c[2], r.state);
      c[2].className = `state run-state-${r.state}`;
      setText(c[3], r.num_workers == null ? "\u2014" : String(r.num_workers));
      setText(c[4], fmtTime(r.created_at));
      const waiting = r.job_metadata && r.job_metadata.waiting;
      const since = waiting
        ? `waiting for its nodes (place ${waiting.position})`
        : r.job_id
          ? `running for ${fmtRunDuration(r)}`
          : "starting";
      setText(c[5], r.finished_at ? fmtTime(r.finished_at) : since);
      jobLink(c[6], r.job_id);
      c[7].firstElementChild.hidden = !mayCancel(r);
    },
  );
  $("runs-empty").hidden = runs.length > 0;
}

export const runsPoller = poller("runs", JOBS_EVERY_MS, async (signal) => {
  await loadVocabulary(STYLED);
  stateOptions($("run-state-filter"), vocabulary.runStates);
  runsCache = await getJSON("/api/runs/", { signal });
  renderRuns();
});
$("run-state-filter").addEventListener("change", renderRuns);

// ---- one run ----------------------------------------------------------------------------

const detail = { id: null, run: null, pods: new Map(), charts: new Map(), texts: new Map(), gen: 0 };

const KNOWN = new Set(["id", "name", "created_at", "finished_at", "state", "job_id", "job_metadata", "num_workers"]);
const KNOWN_META = new Set(["stdout", "stderr", "command", "master_name", "pods", "notes"]);
const show = (v) => (v === null || v === undefined ? "\u2014" : typeof v === "object" ? JSON.stringify(v) : String(v));

function renderRun(run) {
  detail.run = run;
  const meta = run.job_metadata || {};
  setText($("h-run"), `Run ${run.id} (${run.name}): ${run.state}`);
  $("h-run").className = `run-state-${run.state}`;
  const notes = Array.isArray(meta.notes) ? meta.notes : meta.notes ? [meta.notes] : [];
  const pairs = [
    ["State", run.state],
    ["Workers", show(run.num_workers)],
    ["Created", fmtTime(run.created_at)],
    ["Finished", fmtTime(run.finished_at)],
    ["Duration", fmtRunDuration(run)],
    ["Command", show(meta.command)],
    ["Master", show(meta.master_name)],
    ["Nodes", podNames(run).join(", ") || "\u2014"],
    ["Notes", notes.join("\n") || "\u2014"],
  ];
  // what else the daemon says of the run (its place in the queue, what it waits for...)
  for (const [k, v] of Object.entries(run)) if (!KNOWN.has(k) && v != null) pairs.push([k, show(v)]);
  for (const [k, v] of Object.entries(meta)) if (!KNOWN_META.has(k) && v != null) pairs.push([k, show(v)]);
  dl($("run-record"), pairs);
  jobLink($("run-job"), run.job_id);
  const out = (name) => (Array.isArray(meta[name]) ? meta[name] : []);
  setText($("run-stdout"), out("stdout").join("\n"));
  setText($("run-stderr"), out("stderr").join("\n"));
  $("run-output").hidden = !out("stdout").length && !out("stderr").length;
  $("run-delete").hidden = !mayCancel(run);
}

// ---- the charts -----------------------------------------------------------------------

let uplot = null;

// The chart library: one script element, added the first time a run is shown.
function loadUPlot() {
  if (!uplot) {
    uplot = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = "static/vendor/uPlot.iife.min.js";
      s.onload = () => resolve(window.uPlot);
      s.onerror = () => {
        uplot = null;
        s.remove();
        reject(new Error("the chart library (static/vendor/uPlot.iife.min.js) did not load"));
      };
      document.head.appendChild(s);
    });
  }
  return uplot;
}

const chartWidth = (box) => Math.max(280, Math.min(box.clientWidth || 640, 900));

// One chart in `box`, keyed: made when it first has data, redrawn in place after; its
// caption says what it shows and the last value of each series (also for a reader who
// does not see the canvas).  `data` is uPlot's [xs, ys1, ys2, ...], `labels` the series.
function plot(uPlot, box, key, title, labels, data) {
  let c = detail.charts.get(key);
  const shape = labels.join("\u0000");
  if (c && c.shape !== shape) {
    c.chart.destroy();
    c.figure.remove();
    c = null;
  }
  if (!c) {
    const figure = document.createElement("figure");
    figure.className = "chart";
    figure.dataset.key = key;
    const caption = document.createElement("figcaption");
    figure.appendChild(caption);
    box.appendChild(figure);
    const series = [{}, ...labels.map((label, i) => ({
      label,
      stroke: COLOURS[i % COLOURS.length],
      dash: DASHES[Math.floor(i / COLOURS.length) % DASHES.length],
      width: 1.5,
      spanGaps: true, // nodes sample at their own instants: a missing x is not a gap
      points: { show: false },
    }))];
    const chart = new uPlot(
      { width: chartWidth(box), height: 220, series, scales: { x: { time: true } }, axes: [{}, { size: 64 }] },
      data,
      figure,
    );
    c = { chart, figure, caption, shape, box };
    detail.charts.set(key, c);
  } else {
    c.chart.setData(data);
  }
  const points = data.slice(1).reduce((n, ys) => n + ys.filter((y) => y != null).length, 0);
  c.figure.dataset.points = String(points);
  const last = labels.map((label, i) => {
    const ys = data[i + 1];
    for (let j = ys.length - 1; j >= 0; j--) if (ys[j] != null) return `${label} ${fmtValue(ys[j])}`;
    return `${label} \u2014`;
  });
  setText(c.caption, `${title}: ${last.join(", ")} (${points} point${points === 1 ? "" : "s"})`);
}

const fmtValue = (v) => (Math.abs(v) >= 1000 || Number.isInteger(v) ? String(Math.round(v * 100) / 100) : v.toPrecision(4));

// Points ({date, value (a string), cumulative}) as [xs, ys]; a value that is not a number is null.
function series(points) {
  const xs = [];
  const ys = [];
  for (const p of points) {
    const x = seconds(p.date);
    if (Number.isNaN(x)) continue;
    const y = Number.parseFloat(p.value);
    xs.push(x);
    ys.push(Number.isFinite(y) ? y : null);
  }
  return [xs, ys];
}

function renderRunMetrics(uPlot, metrics) {
  const box = $("run-metrics");
  const texts = [];
  const names = Object.keys(metrics).sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  let charts = 0;
  for (const name of names) {
    const [xs, ys] = series(metrics[name]);
    if (ys.some((y) => y !== null)) {
      plot(uPlot, box, `run:${name}`, name, [name], [xs, ys]);
      charts++;
    } else if (metrics[name].length) {
      texts.push([name, metrics[name][metrics[name].length - 1].value]); // e.g. TaskResult @ 0
    }
  }
  dl($("run-results"), texts);
  $("run-results").hidden = texts.length === 0;
  $("run-metrics-empty").hidden = charts > 0 || texts.length > 0;
}

// Each node's sampled series, fetched since the last point held (the daemon answers
// points at or after `since`), up to the run's end.
async function loadNodeMetrics(run, signal) {
  const end = run.finished_at ? seconds(run.finished_at) : Infinity;
  await Promise.all(
    podNames(run).map(async (pod) => {
      let held = detail.pods.get(pod);
      if (!held) detail.pods.set(pod, (held = { since: run.created_at, last: -Infinity, series: {} }));
      const q = new URLSearchParams({ metric_type: "pod", since: held.since });
      // a node with no sample yet is a 404 ("no node ... has metrics"): nothing to add
      const got = await getJSON(`/api/metrics/${encodeURIComponent(pod)}?${q}`, { signal }).catch((e) => {
        if (e instanceof ApiError && e.status === 404) return {};
        throw e;
      });
      for (const [name, points] of Object.entries(got)) {
        const [xs, ys] = (held.series[name] ||= [[], []]);
        for (const p of points) {
          const x = seconds(p.date);
          // `since` is inclusive: what is held already comes again
          if (!(x > (xs.length ? xs[xs.length - 1] : -Infinity)) || x > end) continue;
          const y = Number.parseFloat(p.value);
          xs.push(x);
          ys.push(Number.isFinite(y) ? y : null);
          if (x > held.last) [held.last, held.since] = [x, p.date];
        }
        if (xs.length > MAX_POINTS) {
          xs.splice(0, xs.length - MAX_POINTS);
          ys.splice(0, ys.length - MAX_POINTS);
        }
      }
    }),
  );
}

function renderNodeMetrics(uPlot, run) {
  const pods = podNames(run);
  let charts = 0;
  for (const [name, title] of NODE_METRICS) {
    const tables = pods.map((pod) => (detail.pods.get(pod)?.series[name]) || [[], []]);
    if (!tables.some((t) => t[0].length)) continue;
    plot(uPlot, $("run-nodes"), `node:${name}`, title, pods, uPlot.join(tables.map(([xs, ys]) => [xs, ys])));
    charts++;
  }
  $("run-nodes-empty").hidden = charts > 0;
}

export const runPoller = poller("run", RUN_EVERY_MS, async (signal) => {
  const gen = detail.gen;
  await loadVocabulary(STYLED);
  const [run, uPlot] = await Promise.all([getJSON(runPath(detail.id), { signal }), loadUPlot()]);
  if (gen !== detail.gen) return;
  renderRun(run);
  const q = new URLSearchParams({ metric_type: "run", summarize: String(SUMMARIZE) });
  const [metrics] = await Promise.all([
    getJSON(`/api/metrics/${encodeURIComponent(run.id)}?${q}`, { signal }),
    loadNodeMetrics(run, signal),
  ]);
  if (gen !== detail.gen) return;
  renderRunMetrics(uPlot, metrics);
  renderNodeMetrics(uPlot, run);
  setText($("run-charts-state"), isLive(run) ? "Live: redrawn every few seconds" : "The run has ended: final");
  if (!isLive(run)) runPoller.on = false; // nothing will change: this round read the end
});

export function openRun(id) {
  detail.gen++;
  detail.id = id;
  detail.run = null;
  detail.pods.clear();
  for (const c of detail.charts.values()) c.chart.destroy();
  detail.charts.clear();
  for (const box of ["run-metrics", "run-nodes"]) $(box).replaceChildren();
  $("run-record").replaceChildren();
  delete $("run-record").dataset.terms;
  $("run-results").replaceChildren();
  delete $("run-results").dataset.terms;
  $("run-results").hidden = true;
  $("run-output").hidden = true;
  $("run-delete").hidden = true;
  $("run-metrics-empty").hidden = true;
  $("run-nodes-empty").hidden = true;
  setText($("run-charts-state"), "");
  setText($("h-run"), `Run ${id}`);
  runPoller.start();
}

$("run-delete").addEventListener("click", () => {
  if (detail.run)
    // the run's page stops polling before the DELETE: once it is gone, a round would
    // ask for the run (and its nodes' metrics) and get 404s
    confirmDelete(
      detail.run,
      $("run-delete"),
      (ok) => {
        if (ok) location.hash = "#/runs";
        else runPoller.start();
      },
      () => runPoller.stop(),
    );
});

// The charts follow the width of the page.
let resizing = 0;
window.addEventListener("resize", () => {
  cancelAnimationFrame(resizing);
  resizing = requestAnimationFrame(() => {
    for (const c of detail.charts.values()) c.chart.setSize({ width: chartWidth(c.box), height: 220 });
  });
});
