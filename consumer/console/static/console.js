// The console's only script: local times, and the overview's live tail. Pages work without it.
"use strict";

function localTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (isNaN(when)) continue;
    el.title = when.toISOString().replace("T", " ").slice(0, 23) + " UTC";
    el.textContent = when.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }
}

function text(tag, value, className) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (className) el.className = className;
  return el;
}

function tailRow(record) {
  const li = document.createElement("li");
  li.className = "record machine-" + record.machine;
  const time = document.createElement("time");
  time.setAttribute("datetime", record.time);
  li.append(time, " ");
  const link = document.createElement("a");
  link.href = "/console/appointments/" + record.appointment_id;
  link.textContent = "appointment " + record.appointment_id;
  li.append(link, " ", text("span", record.machine, "machine"), " ",
            text("span", (record.from_state || "(new)") + " → "),
            text("strong", record.to_state, "to"), " ",
            text("code", record.trigger), " ",
            text("span", record.source, "badge source-" + record.source));
  localTimes(li);
  return li;
}

function liveTail() {
  const list = document.getElementById("tail");
  const status = document.getElementById("tail-status");
  if (!list || !window.EventSource) return;
  const source = new EventSource(list.dataset.source);
  source.onopen = () => { status.textContent = "Live: new records appear at the top."; };
  source.onerror = () => { status.textContent = "Live tail interrupted; reconnecting…"; };
  source.addEventListener("state", (event) => {
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    list.prepend(tailRow(JSON.parse(event.data)));
    while (list.children.length > 100) list.lastElementChild.remove();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  liveTail();
});
