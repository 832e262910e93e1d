// One job (#/jobs/<id>): its record, its stall, its ranks (a roll-call), its failure, its
// log (loaded, followed, downloaded).

import { ApiError, getJSON } from "./api.js";
import { LogView, download, follow, loadTail } from "./log.js";
import { $, BACKOFF_MAX_MS, FAILURE_FIELDS, dl, JOBS_EVERY_MS, STYLED, confirmCancel, failing, fmtBytes, fmtDuration, fmtTime, isFinal, mayCancel, poller, row, setText } from "./page.js";
import { loadVocabulary } from "./vocabulary.js";

// ---- job detail ---------------------------------------------------------------------

const detail = { id: null, job: null, view: null, ctrl: null, rollCall: null };
const RANKS_TIMEOUT_MS = 120000; // the daemon bounds a roll-call by mpi.roll_call_timeout_s

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
    if (Array.isArray(f.suspects))
      pairs.push(["Suspects (its last stall)", f.suspects.map(suspectText).join("; ") || "none: every rank was where the others were"]);
    const known = new Set([...FAILURE_FIELDS.map(([k]) => k), "checks", "suspects"]);
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
  renderStall(job);
  renderRanks(job);
  showExtent();
}

// ---- the stall banner and the roll-call table -----------------------------------------

const suspectText = (s) => `rank ${s.rank} on ${s.node || "?"}${s.top_frame ? ` in ${s.top_frame}` : ""}`;

function renderStall(job) {
  const s = job.stalled;
  $("job-stall").hidden = !s;
  if (!s) return;
  let text = `Stalled for ${Math.round(s.quiet_s)} s: no output since ${fmtTime(s.since)}. ` +
    "The job still runs: a stall is a signal, not a verdict.";
  if (s.roll_call && s.suspects.length) text += ` Suspects: ${s.suspects.map(suspectText).join("; ")}.`;
  else if (s.roll_call) text += " No suspect: every rank is where the others are.";
  else if (s.roll_call_error) text += ` No roll-call: ${s.roll_call_error}`;
  else text += " Taking a roll-call\u2026";
  setText($("job-stall"), text);
}

// The roll-call shown: the newer of the one asked for here and the job's stall's.
function shownRollCall(job) {
  const stalls = [...job.stalls, ...(job.stalled ? [job.stalled] : [])].reverse();
  const inStall = stalls.find((s) => s.roll_call);
  const asked = detail.rollCall && detail.rollCall.job_id === job.id ? detail.rollCall : null;
  if (inStall && (!asked || inStall.roll_call.taken > asked.taken))
    return [inStall.roll_call, inStall === job.stalled ? "taken when the job stalled" : "taken in its last stall"];
  return [asked, "taken on request"];
}

function renderRanks(job) {
  const [rc, how] = shownRollCall(job);
  const running = job.state === "running";
  $("job-ranks").hidden = !running && !rc;
  $("ranks-take").hidden = !running;
  const table = $("ranks");
  table.hidden = !rc;
  if (!rc || table.dataset.shown === `${rc.taken} ${how}`) return;
  table.dataset.shown = `${rc.taken} ${how}`;
  const failed = rc.nodes_failed.map((n) => `${n.node}: ${n.error}`).join("; ");
  setText($("ranks-caption"), `Roll-call ${how} at ${fmtTime(rc.taken)} (took ${rc.took_s} s): ` +
    `${rc.ranks.length} ranks, ${rc.groups.length} stack group(s), ${rc.suspects.length} suspect(s)` +
    (failed ? `; not read: ${failed}` : ""));
  const suspects = new Set(rc.suspects.map((x) => x.rank));
  const odd = (g) => g.ranks.some((r) => suspects.has(r));
  // suspects first, then the groups largest first, then the ranks with no stack
  const sections = [...rc.groups.filter(odd), ...rc.groups.filter((g) => !odd(g))].map((g) => [
    `${odd(g) ? "Suspect" : "Group"}: rank${g.ranks.length > 1 ? "s" : ""} ${g.ranks.join(", ")}` +
      ` \u2014 ${g.key.slice(0, 3).join(" \u2190 ") || "no frames"}`,
    g.ranks,
  ]);
  const grouped = new Set(rc.groups.flatMap((g) => g.ranks));
  const rest = rc.ranks.filter((r) => !grouped.has(r.rank)).map((r) => r.rank);
  if (rest.length) sections.push([`No stack: rank${rest.length > 1 ? "s" : ""} ${rest.join(", ")}`, rest]);
  const byRank = new Map(rc.ranks.map((r) => [r.rank, r]));
  for (const tbody of table.querySelectorAll("tbody")) tbody.remove();
  for (const [title, ranks] of sections) {
    const tbody = document.createElement("tbody");
    tbody.className = "stack-group";
    const head = row(1, 1);
    head.firstChild.colSpan = 8;
    head.firstChild.scope = "rowgroup";
    head.firstChild.className = "group";
    head.firstChild.textContent = title;
    tbody.appendChild(head);
    for (const r of ranks.map((n) => byRank.get(n)).filter(Boolean)) {
      const tr = row(8, 1);
      if (suspects.has(r.rank)) tr.className = "suspect";
      const stack = r.stack.slice(0, 8).join("\n") + (r.stack.length > 8 ? `\n\u2026 ${r.stack.length - 8} more` : "");
      const cells = [
        String(r.rank), r.node || "\u2014", r.pid === null ? "\u2014" : String(r.pid), r.state || "\u2014",
        r.cpu_percent === null ? "\u2014" : `${r.cpu_percent}`, r.rss_bytes === null ? "\u2014" : fmtBytes(r.rss_bytes),
        r.stack_error ? `${r.stack_source} (${r.stack_error})` : r.stack_source, stack || "\u2014",
      ];
      cells.forEach((text, i) => (tr.children[i].textContent = text));
      tr.children[7].className = "stack";
      tbody.appendChild(tr);
    }
    table.appendChild(tbody);
  }
}

$("ranks-take").addEventListener("click", async () => {
  const id = detail.id;
  const button = $("ranks-take");
  button.disabled = true;
  setText($("ranks-state"), "Taking a roll-call\u2026");
  try {
    const rc = await getJSON(`/api/mpi_jobs/${encodeURIComponent(id)}/ranks`, { timeout: RANKS_TIMEOUT_MS });
    if (detail.id !== id) return;
    detail.rollCall = rc;
    setText($("ranks-state"), "");
    if (detail.job) renderRanks(detail.job);
  } catch (e) {
    if (detail.id === id) setText($("ranks-state"), `Roll-call failed: ${e.message}`);
  } finally {
    button.disabled = false;
  }
});

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
  $("job-stall").hidden = true;
  $("job-ranks").hidden = true;
  detail.rollCall = null;
  delete $("ranks").dataset.shown;
  for (const tbody of $("ranks").querySelectorAll("tbody")) tbody.remove();
  setText($("ranks-state"), "");
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
