// The job list (#/jobs).

import { getJSON } from "./api.js";
import { $, JOBS_EVERY_MS, STYLED, cause, confirmCancel, fmtDuration, fmtTime, isFinal, mayCancel, poller, row, setText, stateOptions, syncRows } from "./page.js";
import { loadVocabulary, vocabulary } from "./vocabulary.js";

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
      c[8].firstElementChild.hidden = isFinal(j.state) || !mayCancel(j);
    },
  );
  $("jobs-empty").hidden = jobs.length > 0;
}

export const jobsPoller = poller("jobs", JOBS_EVERY_MS, async (signal) => {
  await loadVocabulary(STYLED);
  stateOptions($("state-filter"), vocabulary.states);
  jobsCache = await getJSON("/api/mpi_jobs?limit=200", { signal });
  renderJobs();
});
$("state-filter").addEventListener("change", renderJobs);
