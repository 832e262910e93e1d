// One job (#/jobs/<id>): its record, its failure, its log (loaded, followed, downloaded).

import { ApiError, getJSON } from "./api.js";
import { LogView, download, follow, loadTail } from "./log.js";
import { $, BACKOFF_MAX_MS, FAILURE_FIELDS, JOBS_EVERY_MS, STYLED, confirmCancel, failing, fmtBytes, fmtDuration, fmtTime, isFinal, mayCancel, poller, setText } from "./page.js";
import { loadVocabulary } from "./vocabulary.js";

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
    ["Name", job.name || "\u2014"],
    ["Tags", (job.tags || []).join(", ") || "\u2014"],
    ["Submitted by", job.submitted_by || "\u2014"],
    ["Cancelled by", job.cancelled_by ? `${job.cancelled_by}, ${fmtTime(job.cancelled_at)}` : "\u2014"],
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
  $("job-cancel").hidden = isFinal(job.state) || !mayCancel(job);
  showExtent();
}

export const jobPoller = poller("job", JOBS_EVERY_MS, async (signal) => {
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

export function stopFollow() {
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

export async function openJob(id, followIt) {
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
