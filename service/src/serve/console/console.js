// The console's only script: it keeps the overview's figures and a
// connection's recent events up to date. It never turns data into markup:
// figures go in as text; event rows come from the server already escaped.
"use strict";

function every(ms, f) {
  f();
  setInterval(f, ms);
}

function overview() {
  const table = document.getElementById("connections");
  if (!table) return;
  every(2000, async () => {
    const answer = await fetch("/console/live.json", { credentials: "same-origin" });
    if (!answer.ok) return;
    const live = (await answer.json()).connections;
    for (const row of table.querySelectorAll("tr[data-connection]")) {
      const figures = live[row.dataset.connection];
      if (!figures) continue;
      for (const cell of row.querySelectorAll("[data-live]")) {
        const value = figures[cell.dataset.live];
        const text = value === null || value === undefined
          ? "–"
          : cell.dataset.live.endsWith("_ms") ? value + " ms" : String(value);
        if (cell.textContent !== text) cell.textContent = text;
      }
    }
  });
}

function tail() {
  const table = document.getElementById("events");
  if (!table) return;
  const body = table.tBodies[0];
  every(2000, async () => {
    const newest = body.querySelector("tr[data-serial]");
    const after = newest ? newest.dataset.serial : "0";
    const query = new URLSearchParams({ after, q: table.dataset.q, outcome: table.dataset.outcome });
    const answer = await fetch(table.dataset.tail + "?" + query, { credentials: "same-origin" });
    if (!answer.ok) return;
    const rows = await answer.text();
    if (rows.trim() === "") return;
    // Rendered and escaped by the server, as the page itself was.
    body.insertAdjacentHTML("afterbegin", rows);
    while (body.rows.length > 500) body.deleteRow(-1);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  overview();
  tail();
});
