// The koubou dashboard: everything it shows comes from /api with the bearer token (if the
// server has tokens), and it follows /api/events to stay live. EventSource cannot send an
// Authorization header, so the event stream is read with fetch.
"use strict";

const state = { token: sessionStorage.getItem("koubou.token") || "", selected: null,
                refreshTimer: null, detailTimer: null };
const $ = (id) => document.getElementById(id);

function takeTokenFromFragment() {
  // A link like http://host:8787/#token=... : the fragment never reaches the server or its logs.
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    state.token = decodeURIComponent(match[1]);
    sessionStorage.setItem("koubou.token", state.token);
    history.replaceState(null, "", location.pathname);
  }
}

function headers(extra) {
  const found = Object.assign({}, extra || {});
  if (state.token) found.Authorization = "Bearer " + state.token;
  return found;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers() }));
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("a token is needed");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error((body.error && body.error.message) || response.statusText);
  }
  return body;
}

function say(text) { $("message").textContent = text || ""; }

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell == null ? "" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function money(value) { return value == null ? "–" : "$" + Number(value).toFixed(4); }

// --- the overview: queues, workers, budget --------------------------------------------------

function showQueues(queues) {
  $("queues").replaceChildren(...Object.entries(queues).map(([name, count]) => {
    const card = el("div", null, "card");
    card.id = "queue-" + name;
    card.append(el("b", count), el("span", name.replace("_", " ")));
    return card;
  }));
}

function showWorkers(workers, inFlight, inCluster) {
  // In a cluster every host's workers are listed, with a host column.
  for (const th of document.querySelectorAll("#workers .host-column")) th.hidden = !inCluster;
  fill(document.querySelector("#workers tbody"), workers.map((w) => row((inCluster ? [w.host] : []).concat([
    w.id, w.liveness, w.heartbeat_age_s == null ? "–" : w.heartbeat_age_s.toFixed(1) + " s ago",
    (w.craftsmen || []).join(", "), w.done ?? "", w.failed ?? ""]))));
  const flying = Object.entries(inFlight || {}).map(([c, n]) => c + ": " + n).join(", ");
  $("in-flight").textContent = flying ? "in flight: " + flying : "nothing in flight";
}

function showHosts(cluster) {
  // observe.cluster_view.host_lines: each host's row as its bridge last wrote it
  $("hosts-section").hidden = !cluster;
  if (!cluster) return;
  $("cluster-error").hidden = !cluster.error;
  $("cluster-error").textContent = cluster.error || "";
  fill(document.querySelector("#hosts tbody"), (cluster.hosts || []).map((h) => {
    const q = h.queues || {};
    const line = row([h.host + (h.this_host ? " (this host)" : ""), h.age_s.toFixed(1) + " s",
                      h.stale ? "stale" : "fresh", q.pending ?? "–", q.in_progress ?? "–",
                      q.completed ?? "–", q.failed ?? "–", h.workers]);
    line.dataset.host = h.host;
    if (h.stale) line.className = "stale";
    return line;
  }));
}

function showEndpoints(endpoints) {
  // observe.gather.endpoint_figures: each endpoint of a craftsman, over the live workers
  $("endpoints-section").hidden = !endpoints.length;
  fill(document.querySelector("#endpoints tbody"), endpoints.map((e) => {
    const line = row([e.craftsman, e.endpoint, e.cooling ? "resting" : "ready", e.requests,
                      e.failures, e.in_flight]);
    line.dataset.endpoint = e.endpoint;
    return line;
  }));
}

function bar(spent, limit) {
  const outer = el("div", null, "bar");
  const inner = el("span");
  inner.style.width = Math.min(100, limit ? (100 * spent) / limit : 0) + "%";
  outer.appendChild(inner);
  return outer;
}

function showBudget(budget) {
  // observe.gather.today_budget: {configured, daily: {period, limit_usd, used_usd, left_usd}, monthly}
  const box = $("budget");
  box.replaceChildren();
  const lines = [["today", budget && budget.daily], ["this month", budget && budget.monthly]];
  if (!budget || !budget.configured) {
    const spent = budget && budget.daily ? budget.daily.used_usd : null;
    box.append(el("p", "no budget configured; spent today " + money(spent)));
    return;
  }
  for (const [label, line] of lines) {
    if (!line || line.limit_usd == null) continue;
    const text = label + ": " + money(line.used_usd) + " of " + money(line.limit_usd) +
      " (" + money(line.left_usd) + " left)";
    const item = el("div", text);
    item.className = "spend";
    box.append(item, bar(line.used_usd || 0, line.limit_usd));
  }
}

async function refreshOverview() {
  const facts = await api("/api/workers");
  showQueues(facts.queues || {});
  showWorkers(facts.workers || [], facts.in_flight, Boolean(facts.cluster));
  showHosts(facts.cluster);
  showEndpoints(facts.endpoints || []);
  showBudget(facts.budget);
}

// --- recent tasks ---------------------------------------------------------------------------

function actionButton(label, className, taskId, action) {
  const button = el("button", label, className);
  button.type = "button";
  button.dataset.task = taskId;
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    act(taskId, action);
  });
  return button;
}

function taskRow(task) {
  const actions = document.createElement("span");
  if (task.state === "pending" || task.state === "in_progress") {
    actions.append(actionButton("Cancel", "cancel", task.id, "cancel"));
  } else if (task.state === "failed") {
    actions.append(actionButton("Retry", "retry", task.id, "retry"));
  }
  const where = task.origin ? "from " + task.origin + (task.host ? ", on " + task.host : "") : "";
  const tr = row([task.id || task.file, el("span", task.state, "state " + task.state), task.time,
                  task.worker_id || where, actions]);
  tr.className = "task";
  tr.dataset.id = task.id || task.file;
  tr.dataset.state = task.state;
  tr.addEventListener("click", () => select(task.id || task.file).catch((e) => say(e.message)));
  return tr;
}

async function refreshTasks() {
  const filter = $("state-filter").value;
  const wanted = $("id-filter").value.trim().toLowerCase();
  const query = new URLSearchParams({ limit: $("limit").value });
  if (filter) query.set("state", filter);
  const listed = await api("/api/tasks?" + query);
  if (listed.cluster && listed.cluster.error) say(listed.cluster.error);
  const tasks = listed.tasks.filter((t) => !wanted || String(t.id || t.file).toLowerCase().includes(wanted));
  fill(document.querySelector("#tasks tbody"), tasks.map(taskRow));
}

// --- one task -------------------------------------------------------------------------------

function pretty(value) {
  if (value == null) return "–";
  return typeof value === "string" ? value : JSON.stringify(value, null, 1);
}

function promptOf(task) {
  if (!task) return "–";
  if (task.messages) return task.messages.map((m) => m.role + ": " + pretty(m.content)).join("\n\n");
  return (task.system ? "system: " + task.system + "\n\n" : "") + (task.content || "");
}

async function select(taskId) {
  state.selected = taskId;
  const found = await api("/api/tasks/" + encodeURIComponent(taskId));
  $("detail-section").hidden = false;
  $("detail-id").textContent = found.id || taskId;
  $("detail-state").textContent = found.state;
  $("detail-state").className = "state " + found.state;
  $("detail-prompt").textContent = promptOf(found.task);
  $("detail-result").textContent = found.result ? pretty(found.result.content) + "\n\n" +
    pretty(Object.fromEntries(Object.entries(found.result).filter(([k]) => k !== "content"))) : "–";
  $("detail-error").textContent = pretty(found.error);
  $("detail-patch").textContent = found.patch || "–";
  $("detail-cancel").hidden = !(found.state === "pending" || found.state === "in_progress");
  $("detail-retry").hidden = found.state !== "failed";
  fill(document.querySelector("#detail-attempts tbody"), (found.attempts || []).map((a) => row([
    a.attempt, a.worker_id, a.craftsman, a.model, a.outcome || "running",
    a.total_tokens ?? "", money(a.cost_usd)])));
}

async function act(taskId, action) {
  try {
    const answer = await api("/api/tasks/" + encodeURIComponent(taskId) + "/" + action,
                             { method: "POST" });
    say(action === "cancel" ? (answer.cancelled ? "cancelled " + taskId : answer.message)
                            : "queued " + taskId + " again");
  } catch (error) {
    say(action + " " + taskId + ": " + error.message);
  }
  scheduleRefresh();
}

// --- live updates -----------------------------------------------------------------------------

function scheduleRefresh() {
  // Events come in bursts (a batch of a thousand lines): one refresh per burst.
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    await refreshAll();
  }, 100);
}

async function refreshAll() {
  try {
    await Promise.all([refreshOverview(), refreshTasks()]);
    if (state.selected) await select(state.selected);
    say("");
  } catch (error) {
    say(error.message);
  }
}

async function follow() {
  // Read /api/events with fetch (so the token goes in a header); reconnect when it ends.
  for (;;) {
    try {
      const response = await fetch("/api/events", { headers: headers() });
      if (!response.ok) throw new Error("events: " + response.status);
      live(true);
      scheduleRefresh();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (/^(event|data):/m.test(block)) scheduleRefresh();
        }
      }
    } catch (error) {
      say(error.message);
    }
    live(false);
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function live(on) {
  $("live").textContent = on ? "live" : "offline";
  $("live").className = on ? "badge" : "badge off";
}

function start() {
  takeTokenFromFragment();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("koubou.token", state.token);
    $("token-form").hidden = true;
    refreshAll();
  });
  const retask = () => refreshTasks().catch((error) => say(error.message));
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  for (const id of ["state-filter", "limit"]) $(id).addEventListener("change", retask);
  $("id-filter").addEventListener("input", retask);
  $("detail-close").addEventListener("click", () => {
    state.selected = null;
    $("detail-section").hidden = true;
  });
  $("detail-cancel").addEventListener("click", () => act(state.selected, "cancel"));
  $("detail-retry").addEventListener("click", () => act(state.selected, "retry"));
  refreshAll();
  follow();
}

document.addEventListener("DOMContentLoaded", start);
