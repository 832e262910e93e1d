// The run form on #/runs: starts an MLBench run with the fields mlbench-core's
// ApiClient.create_run posts (its defaults for the two the daemon keeps but does not
// enforce), as JSON of strings, which POST /api/runs/ takes like the form.  The benchmark
// list is the daemon's catalogue (GET /api/runs/catalogue/), read when the view opens.
// Shown only to a role that may submit (the API refuses the others anyway).

import { getJSON } from "./api.js";
import { $, me, setText, syncRows } from "./page.js";
import { runsPoller } from "./runs.js";

const CUSTOM = "custom_image"; // image_name for a command of one's own (MLBench's word)
const commands = new Map(); // catalogue entry -> its command template

function showCommand() {
  const image = $("run-image").value;
  $("run-command-field").hidden = image !== CUSTOM;
  setText($("run-image-command"), commands.get(image) || "");
}

function renderCatalogue(entries) {
  commands.clear();
  for (const e of entries) commands.set(e.name, e.command);
  const select = $("run-image");
  const chosen = select.value;
  syncRows(
    select,
    [...entries.map((e) => e.name), CUSTOM],
    (name) => name,
    (name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name === CUSTOM ? "A command of my own" : name;
      return option;
    },
    () => {},
  );
  // the first entry, until one is chosen
  select.value = chosen !== CUSTOM && commands.has(chosen) ? chosen : entries.length ? entries[0].name : CUSTOM;
  showCommand();
}

function fail(message) {
  const err = $("run-launch-error");
  err.textContent = message;
  err.hidden = false;
  err.focus();
}

// The form, or the field that is missing (said in one message before anything is sent).
function runBody() {
  const name = $("run-name").value.trim();
  if (!name) throw new Error("give the run a name");
  const workers = $("run-workers").value.trim();
  if (!/^[1-9][0-9]*$/.test(workers)) throw new Error("workers: a whole number of nodes, 1 or more");
  const flag = (id) => ($(id).checked ? "true" : "false");
  const body = {
    name,
    num_workers: workers,
    num_cpus: "2.0", // mlbench-core's defaults; kept by the daemon, not enforced
    max_bandwidth: "1000",
    gpu_enabled: flag("run-gpu"),
    light_target: flag("run-light"),
    run_all_nodes: flag("run-all-nodes"),
    image_name: $("run-image").value,
    backend: $("run-backend").value,
  };
  if (body.image_name === CUSTOM) {
    const command = $("run-command").value.trim();
    if (!command) throw new Error("a command of your own: give the command template");
    body.custom_image_command = command;
  }
  return body;
}

// On opening #/runs: the form for a role that may submit, its catalogue read again.
export async function openRunForm() {
  $("run-form").hidden = !me.can_submit;
  if (!me.can_submit) return;
  try {
    renderCatalogue(await getJSON("/api/runs/catalogue/"));
  } catch (e) {
    fail(`The catalogue did not load (${e.message}); a command of your own can still be run.`);
  }
}

$("run-image").addEventListener("change", showCommand);

$("run-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const submit = $("run-submit");
  const state = $("run-launch-state");
  $("run-launch-error").hidden = true;
  setText(state, "");
  let body;
  try {
    body = runBody();
  } catch (e) {
    fail(`Not started: ${e.message}.`);
    return;
  }
  submit.disabled = true;
  try {
    const run = await getJSON("/api/runs/", { method: "POST", body, timeout: 30000 });
    const link = document.createElement("a");
    link.href = `#/runs/${run.id}`;
    link.textContent = `Run ${run.id}`;
    state.replaceChildren(link, ` (${run.name}): ${run.state}`);
    runsPoller.kick(); // the list shows it now, not at the next round
  } catch (e) {
    fail(`Not started: ${e.message}`);
  } finally {
    submit.disabled = false;
  }
});
