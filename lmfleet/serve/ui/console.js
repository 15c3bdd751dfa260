// lmfleet web console: a chat playground over /v1/chat/completions (streamed) and a live
// dashboard over /v1/stats. Plain browser JavaScript, no build step, nothing from another origin.
// Model output is only ever inserted as text (textContent), never as HTML.
"use strict";

const KEY_STORE = "lmfleet.apiKey"; // sessionStorage: gone when the tab closes
const POLL_MS = 2000;
const WINDOW_S = 30; // percentiles and rates over the last 30 s of polls
const HISTORY = 150; // polls kept for the charts (5 minutes)

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem(KEY_STORE), messages: [], controller: null, polls: [], timer: null,
                polling: false, authNeeded: false };

// ---- requests -------------------------------------------------------------------------------

function headers(extra, key) {
  const h = Object.assign({}, extra || {});
  const k = key === undefined ? state.key : key;
  if (k) h.Authorization = "Bearer " + k;
  return h;
}

async function api(path, options, key) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers, key);
  return fetch(path, opts);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error.message + (body.error.code ? " (" + body.error.code + ")" : "");
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

// ---- API key --------------------------------------------------------------------------------

function showAuth(message) {
  state.authNeeded = true;
  stopPolling();
  $("auth").hidden = false;
  document.querySelector(".tabs").hidden = true;
  document.querySelector("main").hidden = true;
  $("auth-message").textContent = message || "";
  $("server-state").textContent = "API key needed";
  $("key-input").focus();
}

function hideAuth() {
  state.authNeeded = false;
  $("auth").hidden = true;
  document.querySelector(".tabs").hidden = false;
  document.querySelector("main").hidden = false;
  $("change-key").hidden = !state.key;
}

async function submitKey(event) {
  event.preventDefault();
  const candidate = $("key-input").value.trim();
  if (!candidate) return;
  $("auth-message").textContent = "Checking…";
  let response;
  try {
    response = await api("/v1/models", {}, candidate);
  } catch (e) {
    $("auth-message").textContent = "The server did not answer: " + e.message;
    return;
  }
  if (response.status === 401) {
    $("auth-message").textContent = "That API key was not accepted by the server (401). Check it and try again.";
    $("key-input").select();
    return;
  }
  if (!response.ok) {
    $("auth-message").textContent = "The server answered: " + (await errorText(response));
    return;
  }
  state.key = candidate;
  sessionStorage.setItem(KEY_STORE, candidate);
  $("key-input").value = "";
  hideAuth();
  fillModels(await response.json());
  $("prompt").focus();
  startPolling();
}

// ---- models ---------------------------------------------------------------------------------

function fillModels(list) {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const card of list.data || []) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.id + (card.max_model_len ? " (context " + card.max_model_len + ")" : "");
    select.append(option);
  }
  if (previous) select.value = previous;
  $("server-state").textContent = (list.data || []).length ? "connected" : "no model";
}

async function loadModels() {
  let response;
  try {
    response = await api("/v1/models");
  } catch (e) {
    $("server-state").textContent = "server unreachable";
    return false;
  }
  if (response.status === 401) {
    if (state.key) sessionStorage.removeItem(KEY_STORE);
    showAuth(state.key ? "The saved key is no longer accepted (401)." : "");
    state.key = null;
    return false;
  }
  if (!response.ok) {
    $("server-state").textContent = await errorText(response);
    return false;
  }
  hideAuth();
  fillModels(await response.json());
  return true;
}

// ---- chat -----------------------------------------------------------------------------------

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = "message " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  item.append(label, content, meta);
  $("messages").append(item);
  follow(true);
  return { item, content, meta };
}

// Keep the newest text in view, unless the reader scrolled up to read something earlier.
function follow(always) {
  const list = $("messages");
  if (always || list.scrollHeight - list.scrollTop - list.clientHeight < 80) list.scrollTop = list.scrollHeight;
}

function number(id, fallback) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

function requestBody(history) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { model: $("model").value || undefined, messages, stream: true,
                 stream_options: { include_usage: true }, temperature: number("temperature", 0.7),
                 top_p: number("top-p", 1), max_tokens: Math.round(number("max-tokens", 256)) };
  if ($("ignore-eos").checked) body.ignore_eos = true;
  return body;
}

function setStreaming(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads a server-sent-event stream, calling onData with each `data:` payload; true when the
// stream ended with [DONE]. The body is released however reading ends (the server then stops).
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", done = false;
  try {
    for (;;) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data === "[DONE]") done = true;
        else if (data) onData(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  return done;
}

async function send(text) {
  const history = state.messages; // this conversation's, even if "New conversation" replaces it meanwhile
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.item.setAttribute("aria-busy", "true");
  const body = requestBody(history);
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const started = performance.now();
  let first = null, last = null, textSoFar = "", usage = null, finish = null, failure = null, chunks = 0;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal });
    if (!response.ok) {
      failure = await errorText(response);
      if (response.status === 401) showAuth("The server no longer accepts the key (401).");
    } else {
      const complete = await readEvents(response, (data) => {
        let event;
        try { event = JSON.parse(data); } catch (e) { failure = "an unreadable event from the server"; return; }
        if (event.error) { failure = event.error.message; return; }
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            chunks += 1;
            textSoFar += delta;
            answer.content.textContent = textSoFar;
            follow(false);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      if (!complete && !failure) failure = "the stream ended before the answer did";
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failure = e.message;
  } finally {
    controller.abort(); // nothing more of this request, whatever ended it
  }
  if (state.controller === controller) state.controller = null;
  setStreaming(state.controller !== null);
  answer.item.removeAttribute("aria-busy");
  if (failure && !textSoFar) history.pop(); // a turn that failed outright is not sent again as context
  else history.push({ role: "assistant", content: textSoFar });
  const parts = [];
  const tokens = usage ? usage.completion_tokens : chunks;
  if (first !== null) {
    const ttft = first - started;
    answer.item.dataset.ttftMs = ttft.toFixed(1);
    parts.push((usage ? "" : "~") + tokens + " tokens");
    parts.push("TTFT " + Math.round(ttft) + " ms");
    if (tokens > 1 && last > first) parts.push(((tokens - 1) / ((last - first) / 1000)).toFixed(1) + " tokens/s");
  }
  if (usage) parts.push(usage.prompt_tokens + " prompt tokens");
  if (finish) parts.push(finish === "stopped" ? "stopped" : "finish: " + finish);
  if (failure) {
    answer.meta.classList.add("error");
    parts.push("error: " + failure + (textSoFar ? "" : " (not kept in the conversation)"));
  }
  answer.item.dataset.finish = failure ? "error" : (finish || "none");
  answer.meta.textContent = parts.join(" · ");
  $("prompt").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---- dashboard ------------------------------------------------------------------------------

function startPolling() {
  stopPolling();
  state.polling = true;
  poll();
}

function stopPolling() {
  state.polling = false;
  if (state.timer !== null) clearTimeout(state.timer);
  state.timer = null;
}

// One poll at a time: the next is scheduled when this one has ended (a slow server gets fewer).
async function poll() {
  state.timer = null;
  if (!state.polling) return;
  if (!document.hidden) await pollOnce();
  if (state.polling) state.timer = setTimeout(poll, POLL_MS);
}

async function pollOnce() {
  let stats;
  try {
    const response = await api("/v1/stats", { signal: AbortSignal.timeout(10000) });
    if (response.status === 401) { showAuth("The server no longer accepts the key (401)."); return; }
    if (!response.ok) { $("dash-status").textContent = await errorText(response); return; }
    stats = await response.json();
  } catch (e) {
    $("dash-status").textContent = "The server did not answer (" + e.message + ")";
    return;
  }
  const last = state.polls[state.polls.length - 1];
  if (last && stats.time <= last.time) return; // an answer older than one already shown
  state.polls.push(stats);
  if (state.polls.length > HISTORY) state.polls.shift();
  render();
}

// The increase of a counter between two polls, as Prometheus's rate() takes it: a value that went
// down was reset (the replica restarted) and counts from zero; one with no earlier value (a replica
// that just appeared) adds nothing yet.
function increase(now, before) {
  if (before === undefined || before === null) return 0;
  return now >= before ? now - before : now;
}

function byId(stats) {
  return new Map(stats.replicas.map((r) => [r.id, r]));
}

// Per-replica increases of `key` between two polls, summed.
function replicasIncrease(now, base, key) {
  const earlier = byId(base);
  let sum = 0;
  for (const r of now.replicas) {
    const b = earlier.get(r.id);
    sum += increase(r[key] || 0, b ? (b[key] || 0) : undefined);
  }
  return sum;
}

// Summed per-replica increases of cumulative buckets [[bound, count], ...], bounds as numbers.
function bucketsIncrease(now, base, key) {
  const earlier = byId(base);
  const total = new Map();
  for (const r of now.replicas) {
    const b = earlier.get(r.id);
    if (!b || !r[key] || !b[key]) continue;
    const before = new Map(b[key].map(([le, count]) => [String(le), count]));
    const reset = r[key].some(([le, count]) => count < (before.get(String(le)) || 0));
    for (const [le, count] of r[key]) {
      const bound = le === "+Inf" ? Infinity : le;
      total.set(bound, (total.get(bound) || 0) + (reset ? count : count - (before.get(String(le)) || 0)));
    }
  }
  return [...total.entries()].sort((x, y) => x[0] - y[0]);
}

// Prometheus's histogram_quantile over cumulative buckets [[upper bound, count], ...].
function quantile(q, buckets) {
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lowerBound = 0, lowerCount = 0;
  for (const [bound, count] of buckets) {
    if (count >= rank) {
      if (bound === Infinity) return lowerBound;
      if (count === lowerCount) return bound;
      return lowerBound + (bound - lowerBound) * (rank - lowerCount) / (count - lowerCount);
    }
    lowerBound = bound;
    lowerCount = count;
  }
  return lowerBound;
}

// The point for poll i: rates against the previous poll, percentiles over the last WINDOW_S.
function point(i) {
  const polls = state.polls, now = polls[i], prev = polls[i - 1];
  let base = prev;
  for (let j = i - 1; j >= 0 && now.time - polls[j].time <= WINDOW_S; j--) base = polls[j];
  const out = { time: now.time, running: now.requests.running, waiting: now.requests.waiting,
                kv: now.kv_cache_usage == null ? null : 100 * now.kv_cache_usage };
  if (prev) {
    const dt = Math.max(1e-3, now.time - prev.time);
    const answered = replicasIncrease(now, prev, "success_total") + replicasIncrease(now, prev, "errors_total")
      + increase(now.ingress_errors_total || 0, prev.ingress_errors_total || 0);
    out.requests = answered / dt;
    out.tokens = replicasIncrease(now, prev, "generation_tokens_total") / dt;
  }
  if (base) {
    for (const [key, buckets] of [["ttft", "ttft_buckets"], ["itl", "itl_buckets"]]) {
      const delta = bucketsIncrease(now, base, buckets);
      out[key + "50"] = quantile(0.5, delta);
      out[key + "99"] = quantile(0.99, delta);
    }
    const queries = replicasIncrease(now, base, "prefix_queries_total");
    out.prefix = queries > 0 ? 100 * replicasIncrease(now, base, "prefix_hits_total") / queries : null;
  }
  return out;
}

function fmt(value, digits, unit) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toFixed(digits) + (unit || "");
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? (1000 * value).toFixed(value < 0.01 ? 1 : 0) + " ms" : value.toFixed(2) + " s";
}

function render() {
  const polls = state.polls, latest = polls[polls.length - 1];
  const points = polls.map((_, i) => point(i));
  const p = points[points.length - 1];
  const healthy = latest.replicas.filter((r) => r.healthy).length;
  const tiles = [
    ["Requests/s", fmt(p.requests, 2), "requests-per-second"],
    ["Output tokens/s", fmt(p.tokens, 1), "tokens-per-second"],
    ["Requests finished", String(latest.requests.success_total), "requests-total"],
    ["Tokens generated", String(latest.tokens.generation_total), "tokens-total"],
    ["TTFT p50 / p99 (30 s)", seconds(p.ttft50) + " / " + seconds(p.ttft99), "ttft"],
    ["Inter-token p50 / p99 (30 s)", seconds(p.itl50) + " / " + seconds(p.itl99), "itl"],
    ["Running / waiting", latest.requests.running + " / " + latest.requests.waiting, "queue"],
    ["KV cache", fmt(p.kv, 1, " %"), "kv-cache"],
    ["Prefix-cache hits (30 s)", fmt(p.prefix, 1, " %"), "prefix-hits"],
    ["Replicas healthy / running", healthy + " / " + latest.num_replicas + " (min " + latest.min_replicas + ")",
     "replicas"],
    ["Errors", String(latest.requests.errors_total), "errors"],
  ];
  const dl = $("tiles");
  dl.replaceChildren();
  for (const [label, value, id] of tiles) {
    const box = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.tile = id;
    box.append(dt, dd);
    dl.append(box);
  }
  const rows = $("replica-rows");
  rows.replaceChildren();
  for (const r of latest.replicas) {
    const tr = document.createElement("tr");
    const cells = [r.id, r.healthy ? "healthy" : "unhealthy", String(r.running), String(r.waiting),
                   r.kv_cache_usage == null ? "–" : (100 * r.kv_cache_usage).toFixed(1) + " %",
                   String(r.generation_tokens_total)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = r.healthy ? "healthy" : "unhealthy";
      tr.append(td);
    });
    tr.dataset.replica = r.id;
    rows.append(tr);
  }
  const when = new Date(latest.time * 1000).toLocaleTimeString();
  $("dash-status").textContent = "Model " + latest.model + " · updated " + when + " · every " + POLL_MS / 1000 + " s";
  if ($("dashboard").hidden) return; // charts are drawn when visible (a hidden canvas has no size)
  chart("chart-requests", points, [["requests", "req/s"]]);
  chart("chart-tokens", points, [["tokens", "tok/s"]]);
  chart("chart-ttft", points, [["ttft50", "p50"], ["ttft99", "p99"]]);
  chart("chart-itl", points, [["itl50", "p50"], ["itl99", "p99"]]);
  chart("chart-queue", points, [["running", "running"], ["waiting", "waiting"]]);
  chart("chart-kv", points, [["kv", "KV %"], ["prefix", "prefix hits %"]], 100);
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c"];

function chart(id, points, series, fixedMax) {
  const canvas = $(id);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const values = points.flatMap((p) => series.map(([key]) => p[key])).filter((v) => Number.isFinite(v));
  const highest = Math.max(0, ...values);
  const max = fixedMax || (highest > 0 ? highest * 1.15 : 1); // an idle chart keeps a readable scale
  const left = 4, top = 16, w = width - 8, h = height - top - 4;
  const style = getComputedStyle(document.body);
  g.strokeStyle = style.getPropertyValue("--line") || "#ccc";
  g.strokeRect(left, top, w, h);
  g.fillStyle = style.color;
  g.font = "11px system-ui, sans-serif";
  g.fillText("max " + (max < 1 ? max.toPrecision(2) : max.toFixed(1)), left + 4, 11);
  const n = Math.max(2, HISTORY);
  const summary = [];
  series.forEach(([key, label], s) => {
    g.strokeStyle = COLORS[s % COLORS.length];
    g.lineWidth = 1.5;
    g.beginPath();
    let drawing = false;
    points.forEach((p, i) => {
      const v = p[key];
      if (!Number.isFinite(v)) { drawing = false; return; }
      const x = left + w * (i + n - points.length) / (n - 1);
      const y = top + h - h * Math.min(v, max) / max;
      if (drawing) g.lineTo(x, y); else g.moveTo(x, y);
      drawing = true;
    });
    g.stroke();
    g.fillStyle = COLORS[s % COLORS.length];
    g.fillText(label, left + w - 90 + 45 * s, 11);
    const latest = points[points.length - 1][key];
    summary.push(label + " " + (Number.isFinite(latest) ? latest.toPrecision(3) : "none"));
  });
  canvas.setAttribute("aria-label", summary.join(", "));
}

// ---- tabs and start-up ------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["chat", "dashboard"]) {
    const on = tab === name;
    $("tab-" + tab).setAttribute("aria-selected", String(on));
    $("tab-" + tab).tabIndex = on ? 0 : -1;
    $(tab).hidden = !on;
  }
  if (name === "dashboard" && state.polls.length) render();
}

function wire() {
  $("tab-chat").addEventListener("click", () => selectTab("chat"));
  $("tab-dashboard").addEventListener("click", () => selectTab("dashboard"));
  document.querySelector(".tabs").addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: null, ArrowRight: null, Home: "chat", End: "dashboard" };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = moves[event.key] ||
      ($("tab-chat").getAttribute("aria-selected") === "true" ? "dashboard" : "chat");
    selectTab(next);
    $("tab-" + next).focus();
  });
  $("auth-form").addEventListener("submit", submitKey);
  $("change-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    state.key = null;
    showAuth("");
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    stop();
    state.messages = [];
    $("messages").replaceChildren();
    $("prompt").focus();
  });
  window.addEventListener("resize", () => { if (state.polls.length) render(); });
}

async function connect() {
  let needsKey = false;
  try {
    needsKey = (await (await fetch("/ui/console.json")).json()).api_key_required;
  } catch (e) { /* unreachable, or an older server: the API will tell */ }
  if (needsKey && !state.key) { showAuth(""); return; } // ask first: no request bound to fail
  if (await loadModels()) startPolling();
  else if (!state.authNeeded) setTimeout(connect, 5000); // the server may be starting: try again
}

function main() {
  wire();
  connect();
}

main();
