// The cmr-ai dashboard: reads the admin API with the bearer token, renders with textContent only
// (UIDs, AE titles and error texts come from the outside world: never parsed as HTML).
"use strict";

const REFRESH_MS = 5000;
const KEY = "cmr-ai-token";
let timer = null;

function token() { return sessionStorage.getItem(KEY); }

// a token given as #token=… is taken once and removed from the address bar (and the history)
function takeTokenFromHash() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

class Unauthorised extends Error {}

async function api(path, method = "GET") {
  const r = await fetch(path, {method, headers: {"Authorization": "Bearer " + token()}, cache: "no-store"});
  if (r.status === 401) throw new Unauthorised("the token was refused");
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || (method + " " + path + ": HTTP " + r.status));
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function cell(tr, text, cls, title) {
  const td = el("td", text, cls);
  if (title) td.title = title;
  tr.appendChild(td);
  return td;
}

function badge(state) { return el("span", state, "badge state-" + state); }

function shortUid(uid) { return uid && uid.length > 24 ? "…" + uid.slice(-22) : (uid || ""); }

function time(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function secs(a, b) {
  if (!a || !b) return "";
  const s = (new Date(b) - new Date(a)) / 1000;
  if (!(s >= 0)) return "";
  return s < 10 ? s.toFixed(2) + " s" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

function message(text, cls) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = cls || "";
}

function fill(tableId, rows, render) {
  const tbody = document.querySelector("#" + tableId + " tbody");
  tbody.replaceChildren(...rows.map(render));
}

function button(label, cls, onClick) {
  const b = el("button", label, cls);
  b.type = "button";
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onClick(); } finally { b.disabled = false; }
  });
  return b;
}

async function rerun(job) {
  if (!confirm("Run job " + job.id + " again? Its results will be replaced.")) return;
  try {
    const r = await api("/api/jobs/" + job.id + "/rerun", "POST");
    message("job " + job.id + " queued again" + (r.launched ? "" : " (" + r.note + ")"), "ok");
  } catch (e) { return failed(e); }
  refresh();
}

async function resend(exp) {
  try {
    await api("/api/exports/" + exp.id + "/retry", "POST");
    message("export " + exp.id + " queued again for " + exp.destination, "ok");
  } catch (e) { return failed(e); }
  refresh();
}

function failed(e) {
  if (e instanceof Unauthorised) return login("The token was refused: enter it again.");
  message(e.message, "error");
}

function render(health, studies, jobs, exports) {
  document.getElementById("rules-version").textContent = health.rules_version || "–";
  document.getElementById("rules-count").textContent = health.rules;
  document.getElementById("node-version").textContent = health.version;
  document.getElementById("dicom-port").textContent = health.dicom_port || "–";
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();

  const counts = document.getElementById("counts");
  counts.replaceChildren(...Object.entries(health.counts || {}).map(([what, byState]) => {
    const box = el("div", null, "count");
    box.appendChild(el("h3", what));
    const entries = Object.entries(byState);
    if (!entries.length) box.appendChild(el("span", "none", "empty"));
    for (const [state, n] of entries) {
      const s = el("span", null, "count-item");
      s.append(badge(state), " " + n);
      box.appendChild(s);
    }
    return box;
  }));

  const jobState = new Map(jobs.map(j => [j.id, j.state]));
  fill("studies", studies, st => {
    const tr = el("tr");
    tr.dataset.studyUid = st.study_instance_uid;
    cell(tr, time(st.last_received));
    cell(tr, shortUid(st.study_instance_uid), "uid", st.study_instance_uid);
    cell(tr, st.calling_ae + (st.source_ip ? " @ " + st.source_ip : ""));
    cell(tr, "").appendChild(badge(st.state));
    cell(tr, st.n_series, "num");
    cell(tr, st.n_instances, "num");
    cell(tr, st.rule || "");
    cell(tr, st.rules_version || "", "mono");
    const td = cell(tr, "");
    for (const id of st.jobs) {
      const s = el("span", null, "job-ref");
      s.append("#" + id + " ");
      if (jobState.has(id)) s.appendChild(badge(jobState.get(id)));
      td.appendChild(s);
    }
    return tr;
  });

  fill("jobs", jobs, j => {
    const tr = el("tr");
    tr.dataset.jobId = j.id;
    tr.dataset.state = j.state;
    cell(tr, "#" + j.id);
    cell(tr, shortUid(j.study_instance_uid), "uid", j.study_instance_uid);
    cell(tr, j.kind);
    cell(tr, j.rule);
    cell(tr, j.model || "");
    cell(tr, "").appendChild(badge(j.state));
    cell(tr, j.attempts, "num");
    cell(tr, j.attempts <= 1 ? secs(j.created_at, j.started_at) : "", "num");  // a re-run's wait is not kept
    cell(tr, secs(j.started_at, j.prepared_at), "num");
    cell(tr, secs(j.prepared_at, j.inferred_at), "num");
    cell(tr, secs(j.inferred_at, j.reported_at), "num");
    cell(tr, j.state === "done" ? secs(j.reported_at, j.finished_at) : "", "num");
    cell(tr, j.rules_version || "", "mono rules-version");
    cell(tr, j.error || "", "error-text");
    const act = cell(tr, "");
    if ((j.state === "done" || j.state === "failed") && j.kind !== "forward")
      act.appendChild(button("re-run", "rerun", () => rerun(j)));
    return tr;
  });

  const failures = jobs.filter(j => j.state === "failed");
  document.getElementById("failures-empty").hidden = failures.length > 0;
  fill("failures", failures, j => {
    const tr = el("tr");
    tr.dataset.jobId = j.id;
    cell(tr, "#" + j.id);
    cell(tr, shortUid(j.study_instance_uid), "uid", j.study_instance_uid);
    cell(tr, j.rule);
    cell(tr, j.attempts, "num");
    cell(tr, time(j.finished_at || j.updated_at));
    cell(tr, j.error || "(no reason recorded)", "error-text");
    const act = cell(tr, "");
    if (j.kind !== "forward") act.appendChild(button("re-run", "rerun", () => rerun(j)));
    return tr;
  });

  fill("exports", exports, x => {
    const tr = el("tr");
    tr.dataset.exportId = x.id;
    tr.dataset.state = x.state;
    cell(tr, "#" + x.id);
    cell(tr, "#" + x.job_id);
    cell(tr, x.destination);
    cell(tr, x.kind);
    cell(tr, shortUid(x.sop_instance_uid), "uid", x.sop_instance_uid);
    const st = cell(tr, "");
    st.appendChild(badge(x.state));
    if (x.duplicate_of) st.append(" (already there: #" + x.duplicate_of + ")");
    if (x.state === "sent" && x.verify && !x.confirmed_at) st.append(" awaiting " + x.verify);
    cell(tr, x.attempts, "num");
    cell(tr, x.status || "", "mono");
    cell(tr, time(x.sent_at));
    cell(tr, x.last_error || x.warning || "", "error-text");
    const act = cell(tr, "");
    if (x.state !== "pending") act.appendChild(button("re-send", "resend", () => resend(x)));
    return tr;
  });
}

async function refresh() {
  clearTimeout(timer);
  try {
    const health = await fetch("/health", {cache: "no-store"}).then(r => r.json());
    const [studies, jobs, exports] = await Promise.all([
      api("/api/studies?limit=50"), api("/api/jobs?limit=200"), api("/api/exports?limit=200")]);
    render(health, studies.items, jobs.items, exports.items);
    document.body.dataset.loaded = "1";
  } catch (e) {
    if (e instanceof Unauthorised) return login("The token was refused: enter it again.");
    message("refresh failed: " + e.message, "error");
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function login(why) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = why || "";
  document.getElementById("token").focus();
}

function start() {
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromHash();
  document.getElementById("login").addEventListener("submit", ev => {
    ev.preventDefault();
    const t = document.getElementById("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(KEY, t);
    document.getElementById("token").value = "";
    start();
  });
  document.getElementById("forget-token").addEventListener("click", () => login(""));
  window.addEventListener("hashchange", () => {  // a #token=… link opened in a tab already showing the page
    const before = token();
    takeTokenFromHash();
    if (token() && token() !== before) start();
  });
  if (token()) start(); else login("");
});
