// The launch form (#/launch) and its preflight.

import { getJSON } from "./api.js";
import { $, row, setText, syncRows } from "./page.js";

let pendingFollow = null; // the job the form just launched: its view follows the log

// Whether the job view opening `jobId` should follow its log (once).
export function followsNext(jobId) {
  const yes = pendingFollow === jobId;
  pendingFollow = null;
  return yes;
}

// ---- launch ---------------------------------------------------------------------------

export function renderNodePicks(nodes) {
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
