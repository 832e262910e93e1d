// The overview (#/): the node table, the phase counts and bar, the health lines.

import { getJSON, request } from "./api.js";
import { renderNodePicks } from "./launch.js";
import { $, NODES_EVERY_MS, PHASE_MARK, STYLED, fmtAge, phaseRank, phases, poller, row, setText, syncRows } from "./page.js";
import { loadVocabulary } from "./vocabulary.js";

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

export const nodesPoller = poller("nodes", NODES_EVERY_MS, async (signal) => {
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
