// The status page: hash-routed views (#/ overview, #/jobs, #/jobs/<id>, #/launch,
// #/runs, #/runs/<id>), each refreshed by chained timers while it is shown and the tab
// is visible; one ES module per view.

import { jobPoller, openJob, stopFollow } from "./job.js";
import { jobsPoller } from "./jobs.js";
import { followsNext } from "./launch.js";
import { nodesPoller } from "./overview.js";
import { $, loadMe, me, tickClock } from "./page.js";
import { openRunForm } from "./runform.js";
import { openRun, runPoller, runsPoller } from "./runs.js";

// ---- routing --------------------------------------------------------------------------

const VIEWS = ["overview", "jobs", "job", "launch", "runs", "run"];

function route() {
  const hash = location.hash || "#/";
  let view = "overview";
  let jobId = null;
  let runId = null;
  let m;
  if (hash === "#/jobs") view = "jobs";
  else if ((m = /^#\/jobs\/([0-9A-Za-z]+)$/.exec(hash))) {
    view = "job";
    jobId = m[1];
  } else if (hash === "#/launch" && me.can_submit) view = "launch";
  else if (hash === "#/runs") view = "runs";
  else if ((m = /^#\/runs\/([0-9]+)$/.exec(hash))) {
    view = "run";
    runId = m[1];
  }
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) {
    const parent = { job: "jobs", run: "runs" }[view];
    if (a.dataset.view === view || a.dataset.view === parent)
      a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  // only what is shown is polled; leaving the job view closes its follow stream
  nodesPoller.stop();
  jobsPoller.stop();
  jobPoller.stop();
  runsPoller.stop();
  runPoller.stop();
  stopFollow();
  if (view === "overview" || view === "launch") nodesPoller.start();
  if (view === "jobs") jobsPoller.start();
  if (view === "job") {
    openJob(jobId, followsNext(jobId));
  }
  if (view === "runs") {
    runsPoller.start();
    openRunForm();
  }
  if (view === "run") openRun(runId);
  const titles = { overview: "Overview", jobs: "Jobs", job: `Job ${jobId}`, launch: "Launch", runs: "Runs", run: `Run ${runId}` };
  document.title = `${titles[view]} \u2013 mlbench-daemon`;
  return view;
}

let first = true;
window.addEventListener("hashchange", () => {
  const view = route();
  if (!first) $(`h-${view}`).focus(); // a screen reader hears where it went
});
// Another token was entered: what it may do decides the controls (and the launch view).
window.addEventListener("mlbench-token", () => {
  if (!first) loadMe().then(route, () => {});
});
// who am I first, so that no launch or cancel control shows for a role without them
loadMe()
  .catch(() => {}) // unknown: no controls; the views still show what can be read
  .then(() => {
    route();
    first = false;
    tickClock();
  });
