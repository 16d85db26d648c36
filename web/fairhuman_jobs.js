// Training jobs panel: lists the pack's training jobs (GET /fairhuman/jobs), follows them through the
// pushed "fairhuman.job" events, cancels them (POST /fairhuman/jobs/{id}/cancel) and refreshes
// ComfyUI's model lists when a job finishes, so a new LoRA or ControlNet shows up in the loaders' dropdowns.
// Plain JavaScript, no build step. A sidebar tab where the frontend offers one, else a floating panel.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "fairhuman.job";
const ROUTE = "/fairhuman/jobs";
const TAB_ID = "fairhuman-jobs";
const ACTIVE = new Set(["queued", "running"]);
const STATES = new Set(["queued", "running", "done", "error", "cancelled", "interrupted"]);
const POLL_MS = 5000; // only while a job is active: covers events missed while the socket was down
const MIN_REFRESH_MS = 500; // pushed events arrive once per step; coalesce the list requests

const store = {
  jobs: new Map(), // id -> summary, in the server's order
  status: "loading", // loading | ready | absent | failed
  message: "",
  finishedRefreshed: new Set(), // job ids whose completion already refreshed the model lists
  cancelling: new Set(),
  cancelErrors: new Map(), // id -> message of a failed cancel
  modelRefreshes: 0,
};
const views = new Set(); // mounted containers (the sidebar re-renders on every open)
let refreshTimer = null;
let refreshInFlight = null;
let refreshAgain = false;
let lastRefresh = 0;
let pollTimer = null;

// ---- data --------------------------------------------------------------------------------------
function isActive(job) {
  return ACTIVE.has(job.state);
}

// A job is "done" from its trainer's done event, but the server lists its LoRA only once the job's
// process has exited (then `finished` is set): refresh the model lists at that moment, once per
// job, and never for jobs that had finished before the page loaded.
function settled(job) {
  return !("finished" in job) || Boolean(job.finished); // servers without the field: done is enough
}

function noteFinished(job, initial) {
  if (job.state !== "done" || !settled(job) || store.finishedRefreshed.has(job.id)) return;
  store.finishedRefreshed.add(job.id);
  if (!initial) refreshModelLists();
}

// The latest validation (--validate-every) of a job: the summary's `validation` where the server
// keeps one, else taken from a pushed "validation" event (then it lasts until the page reloads).
function validationOf(event) {
  if (!event || event.event !== "validation") return null;
  const { step, metric, score, best_step, best_score } = event;
  return { step, metric, score, best_step, best_score };
}

function applyJob(job) {
  if (!job || typeof job.id !== "string") return;
  const merged = { ...store.jobs.get(job.id), ...job };
  const validation = validationOf(job.event);
  if (validation && !job.validation) merged.validation = validation;
  delete merged.event; // the raw trainer event that came with a pushed summary
  store.jobs.set(job.id, merged);
  if (!isActive(merged)) store.cancelling.delete(job.id);
  noteFinished(merged, false);
}

async function fetchJobs(initial) {
  let response;
  try {
    response = await api.fetchApi(ROUTE);
  } catch (err) {
    store.status = store.jobs.size ? "ready" : "failed";
    store.message = `ComfyUI is not answering (${err?.message || err}); the list refreshes when it is back.`;
    return;
  }
  if (response.status === 404) {
    store.status = "absent";
    store.message = "This server has no training-job routes (GET /api/fairhuman/jobs answered 404): "
      + "update the FairHuman & HG-DPO pack and restart ComfyUI.";
    return;
  }
  if (!response.ok) {
    store.status = store.jobs.size ? "ready" : "failed";
    store.message = `Could not list the training jobs: ${response.status} ${await errorText(response)}`;
    return;
  }
  let body;
  try {
    body = await response.json();
  } catch (err) {
    store.status = "failed";
    store.message = `The jobs route answered something that is not JSON (${err?.message || err}).`;
    return;
  }
  const listed = Array.isArray(body?.jobs) ? body.jobs : [];
  const seen = new Set();
  const fresh = new Map();
  for (const job of listed) {
    if (!job || typeof job.id !== "string" || seen.has(job.id)) continue;
    seen.add(job.id);
    const merged = { ...store.jobs.get(job.id), ...job };
    fresh.set(job.id, merged);
    if (!isActive(merged)) store.cancelling.delete(job.id);
    noteFinished(merged, initial);
  }
  store.jobs = fresh; // the server's list is the truth: jobs it no longer has disappear
  store.status = "ready";
  store.message = "";
}

async function errorText(response) {
  try {
    const text = await response.text();
    try {
      const parsed = JSON.parse(text);
      return String(parsed?.error ?? parsed?.message ?? text);
    } catch {
      return text.slice(0, 300);
    }
  } catch {
    return response.statusText || "";
  }
}

async function refresh(initial = false) {
  if (refreshInFlight) {
    refreshAgain = true; // the answer in flight may predate the event that asked for this one
    return refreshInFlight;
  }
  refreshAgain = false;
  lastRefresh = Date.now();
  refreshInFlight = fetchJobs(initial)
    .catch((err) => {
      store.status = "failed";
      store.message = `Could not list the training jobs: ${err?.message || err}`;
    })
    .finally(() => {
      refreshInFlight = null;
      renderAll();
      if (refreshAgain) scheduleRefresh();
      else schedulePoll();
    });
  return refreshInFlight;
}

function scheduleRefresh() {
  if (store.status === "absent" || refreshTimer) return;
  const wait = Math.max(0, MIN_REFRESH_MS - (Date.now() - lastRefresh));
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, wait);
}

function schedulePoll() {
  clearTimeout(pollTimer);
  pollTimer = null;
  if (store.status !== "ready" || ![...store.jobs.values()].some(isActive)) return;
  pollTimer = setTimeout(() => refresh(), POLL_MS);
}

async function cancelJob(id) {
  store.cancelling.add(id);
  store.cancelErrors.delete(id);
  renderAll();
  try {
    const response = await api.fetchApi(`${ROUTE}/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    if (!response.ok) {
      store.cancelErrors.set(id, `Cancel failed: ${response.status} ${await errorText(response)}`);
      store.cancelling.delete(id);
    }
  } catch (err) {
    store.cancelErrors.set(id, `Cancel failed: ${err?.message || err}`);
    store.cancelling.delete(id);
  }
  renderAll();
  scheduleRefresh();
}

// The same refresh as the "Refresh Node Definitions" command (key R): it re-reads /object_info and
// updates every combo widget, so the new LoRA appears in LoraLoader without a page reload.
async function refreshModelLists() {
  try {
    if (typeof app.refreshComboInNodes === "function") {
      await app.refreshComboInNodes();
    } else if (typeof app.extensionManager?.command?.execute === "function") {
      await app.extensionManager.command.execute("Comfy.RefreshNodeDefinitions");
    } else {
      console.warn("[fairhuman] this frontend cannot refresh node definitions; press R to see new models");
      return;
    }
    store.modelRefreshes += 1;
  } catch (err) {
    console.warn("[fairhuman] refreshing the model lists failed; press R to see new models:", err);
  }
}

// ---- rendering ---------------------------------------------------------------------------------
// Everything a job record holds is shown through textContent: route data is never parsed as HTML.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return ""; // not known yet (Number(null) is 0)
  const s = Number(seconds);
  if (!Number.isFinite(s) || s < 0) return "";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

function formatLoss(value) {
  const n = Number(value);
  if (typeof value === "number" && Number.isFinite(n)) return n.toPrecision(4);
  return String(value); // "nan"/"inf" arrive as strings (JSON has no NaN)
}

// A queued job waits for its device(s): its place among the jobs waiting for them, and the job
// right ahead of it (running, or queued earlier), named as the panel names jobs.
function queueText(job) {
  const position = Number(job.queue_position);
  const ahead = job.queued_behind ? store.jobs.get(job.queued_behind) : null;
  const name = ahead ? (ahead.output_name || ahead.id) : job.queued_behind;
  return [Number.isInteger(position) && position > 0 ? `#${position} in the queue` : "waiting in the queue",
    name ? `behind ${name}${ahead && ahead.output_name ? ` (job ${job.queued_behind})` : ""}` : ""]
    .filter(Boolean).join(" · ");
}

function renderJob(job) {
  const state = STATES.has(job.state) ? job.state : "unknown";
  const row = el("div", `fh-job fh-state-${state}`);
  row.dataset.jobId = job.id;
  row.dataset.state = state;

  const head = el("div", "fh-job-head");
  head.append(el("span", "fh-job-method", job.method || "job"));
  head.append(el("span", "fh-job-state", job.state || "unknown"));
  row.append(head);
  row.append(el("div", "fh-job-name", job.output_name || job.lora_name || job.id));
  if (job.lora_name && job.lora_name !== job.output_name) {
    const file = el("div", "fh-job-lora", job.lora_name);
    file.title = job.method === "fairhuman-controlnet"
      ? "The ControlNet's name in Load ControlNet and Load FairHuman ControlNet"
      : "The LoRA's name in LoraLoader and the pack's loaders";
    row.append(file);
  }

  const step = Number(job.step) || 0;
  const total = Number(job.total) || 0;
  const fraction = total > 0 ? Math.min(1, Math.max(0, step / total)) : 0;
  const bar = el("div", "fh-progress");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(step));
  const fill = el("div", "fh-progress-fill");
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  bar.append(fill);
  row.append(bar);

  if (job.state === "queued") row.append(el("div", "fh-job-queue", queueText(job)));
  const devices = Array.isArray(job.devices) ? job.devices.filter(Boolean) : [];
  if (devices.length > 1) {
    const line = el("div", "fh-job-devices", `${devices.length} processes: ${devices.join(", ")}`);
    line.title = "One job over several devices (one process each); the progress counts them all";
    row.append(line);
  }

  const eta = isActive(job) ? formatEta(job.eta_s) : "";
  // stage: annotate | build-pairs | train (each counts its own steps)
  const stage = isActive(job) && job.stage ? String(job.stage) : "";
  const info = [stage, total > 0 ? `step ${step} / ${total}` : "", eta ? `ETA ${eta}` : ""]
    .filter(Boolean).join(" · ");
  if (info) row.append(el("div", "fh-job-info", info));

  const losses = job.losses && typeof job.losses === "object" ? Object.entries(job.losses) : [];
  if (losses.length) {
    const list = el("div", "fh-job-losses");
    for (const [name, value] of losses) {
      const item = el("span", "fh-loss");
      item.append(el("span", "fh-loss-name", name), el("span", "fh-loss-value", formatLoss(value)));
      list.append(item);
    }
    row.append(list);
  }

  const validation = job.validation && typeof job.validation === "object" ? job.validation : null;
  if (validation && validation.score !== undefined && validation.score !== null) {
    const line = el("div", "fh-job-validation",
      `validation ${validation.metric || "score"} ${formatLoss(validation.score)} at step ${validation.step}`
      + (validation.best_step !== undefined ? ` · best ${formatLoss(validation.best_score)} at step ${validation.best_step}` : ""));
    line.title = "Scored on fixed prompts and seeds (--validate-every); the best LoRA is kept as <name>_best.safetensors";
    row.append(line);
  }

  if (job.state === "done" && job.best_lora_name && job.best_lora_name !== job.lora_name) {
    const best = el("div", "fh-job-lora fh-job-best", `best: ${job.best_lora_name}`);
    best.title = "The LoRA of the best validation step, beside the final one";
    row.append(best);
  }
  if (job.error) row.append(el("div", "fh-job-error", job.error));
  const warnings = Array.isArray(job.warnings) ? job.warnings.filter(Boolean) : [];
  if (warnings.length) row.append(el("div", "fh-job-warning", warnings[warnings.length - 1]));
  if (store.cancelErrors.has(job.id)) row.append(el("div", "fh-job-error", store.cancelErrors.get(job.id)));
  if (job.run_dir) {
    const dir = el("div", "fh-job-dir", job.run_dir);
    dir.title = job.run_dir;
    row.append(dir);
  }

  if (isActive(job)) {
    const busy = store.cancelling.has(job.id);
    const button = el("button", "fh-cancel", busy ? "Cancelling…" : "Cancel");
    button.type = "button";
    button.disabled = busy;
    button.title = job.state === "queued"
      ? "Take this job out of the queue (nothing of it has run)"
      : "Stop this job: the trainer saves a checkpoint, and queueing the same settings resumes it";
    button.addEventListener("click", () => cancelJob(job.id));
    row.append(button);
  }
  return row;
}

function renderInto(container) {
  const list = el("div", "fh-jobs-list");
  if (store.message) list.append(el("div", `fh-jobs-note fh-jobs-${store.status}`, store.message));
  const jobs = [...store.jobs.values()];
  const ordered = [...jobs.filter(isActive), ...jobs.filter((job) => !isActive(job))];
  if (store.status === "loading") {
    list.append(el("div", "fh-jobs-empty", "Loading…"));
  } else if (!ordered.length && store.status === "ready") {
    list.append(el("div", "fh-jobs-empty",
      "No training jobs yet. Queue a \"Train FairHuman LoRA\", \"Train FairHuman ControlNet\" or \"Train HG-DPO LoRA\" node to start one."));
  }
  for (const job of ordered) list.append(renderJob(job));
  const body = container.querySelector(".fh-jobs-body") || container;
  body.replaceChildren(list);
}

function renderAll() {
  for (const container of [...views]) {
    if (!container.isConnected) {
      views.delete(container);
      continue;
    }
    renderInto(container);
  }
}

function buildPanel(container) {
  container.classList.add("fh-jobs");
  container.dataset.fairhumanJobs = "";
  const header = el("div", "fh-jobs-header");
  header.append(el("span", "fh-jobs-title", "Training jobs"));
  const reload = el("button", "fh-jobs-reload", "↻");
  reload.type = "button";
  reload.title = "Reload the job list";
  reload.addEventListener("click", () => refresh());
  header.append(reload);
  container.replaceChildren(header, el("div", "fh-jobs-body"));
  views.add(container);
  renderInto(container);
  return header;
}

// Older frontends without sidebar tabs get a small collapsible panel in the bottom-right corner.
function mountFloatingPanel() {
  const panel = el("div", "fh-jobs-floating");
  const header = buildPanel(panel);
  const toggle = el("button", "fh-jobs-toggle", "–");
  toggle.type = "button";
  toggle.title = "Collapse or expand the jobs panel";
  toggle.addEventListener("click", () => {
    const collapsed = panel.classList.toggle("fh-collapsed");
    toggle.textContent = collapsed ? "+" : "–";
  });
  header.append(toggle);
  document.body.append(panel);
}

function registerView() {
  const tab = {
    id: TAB_ID,
    icon: "pi pi-chart-line",
    title: "Training jobs",
    tooltip: "FairHuman & HG-DPO training jobs",
    type: "custom",
    render: (container) => buildPanel(container),
    destroy: () => renderAll(), // prunes the container the sidebar just removed
  };
  const manager = app.extensionManager;
  if (typeof manager?.sidebarTab?.registerSidebarTab === "function") {
    manager.sidebarTab.registerSidebarTab(tab);
  } else if (typeof manager?.registerSidebarTab === "function") {
    manager.registerSidebarTab(tab);
  } else {
    mountFloatingPanel();
  }
}

function loadStyles() {
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./fairhuman_jobs.css", import.meta.url).href;
  document.head.append(link);
}

// Registered at import, before ComfyUI's socket delivers anything: an event type nobody listens
// to is reported by the frontend as an unknown message.
api.addEventListener(EVENT, (event) => {
  const job = event.detail;
  if (!job || typeof job !== "object") return;
  if (store.status === "absent" || store.status === "failed") {
    store.status = "ready"; // a server that pushes jobs has the routes
    store.message = "";
  }
  applyJob(job);
  renderAll();
  scheduleRefresh();
});
api.addEventListener("reconnected", () => refresh());

app.registerExtension({
  name: "fairhuman.jobs",
  async setup() {
    loadStyles();
    registerView();
    await refresh(true);
  },
});

// For tests and the curious (read-only in spirit): the state the panel shows.
window.fairhumanJobs = { store, refresh, refreshModelLists, mountFloatingPanel };
