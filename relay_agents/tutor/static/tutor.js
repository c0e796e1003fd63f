// The tutor page: conversations in the sidebar, answers streamed as NDJSON events
// (delta / budget / done / error), each span coloured by the model that wrote it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, current: null, busy: false, declined: false };

// ---- maths --------------------------------------------------------------------------------

// $$..$$, \[..\], \(..\), $..$ and a bare \boxed{..} (the relay prompt asks for one).
const MATH = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$([^$\n]+?)\$|(\\boxed\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\})/g;

function mathReady() {
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) return mj.startup.promise.then(() => true, () => false);
  return Promise.resolve(false);
}

function texNode(tex, display) {
  try {
    return window.MathJax.tex2chtml(tex, { display });
  } catch (err) {
    return null;
  }
}

// Render spans [{source, text}] into el: plain text split at span borders, formulas whole
// (a formula written by both models is marked "mixed").
function renderRich(el, spans, withMath) {
  let text = "";
  const bounds = [];
  for (const s of spans) {
    bounds.push([text.length, text.length + s.text.length, s.source]);
    text += s.text;
  }
  el.textContent = "";
  const plain = (a, b) => {
    for (const [start, end, source] of bounds) {
      const lo = Math.max(a, start), hi = Math.min(b, end);
      if (lo < hi) el.appendChild(spanOf(source, text.slice(lo, hi)));
    }
  };
  let pos = 0;
  if (withMath) {
    for (const m of text.matchAll(MATH)) {
      const a = m.index, b = m.index + m[0].length;
      const sources = new Set(bounds.filter(([s, e]) => s < b && e > a).map((x) => x[2]));
      const source = sources.size === 1 ? [...sources][0] : "mixed";
      const display = m[1] !== undefined || m[2] !== undefined;
      const tex = m[1] ?? m[2] ?? m[3] ?? m[4] ?? m[5];
      const node = texNode(tex, display);
      if (!node) continue;
      plain(pos, a);
      const wrap = document.createElement("span");
      wrap.className = `span math ${source}`;
      if (source === "mixed") wrap.title = "written by the student and the teacher";
      wrap.dataset.tex = m[0];
      wrap.appendChild(node);
      el.appendChild(wrap);
      pos = b;
    }
  }
  plain(pos, text.length);
}

async function renderWithMath(el, spans) {
  renderRich(el, spans, false);
  if (!(await mathReady())) return;
  renderRich(el, spans, true);
  const doc = window.MathJax.startup.document;
  doc.clear();
  doc.updateDocument();
}

function spanOf(source, text) {
  const span = document.createElement("span");
  span.className = `span ${source}`;
  span.textContent = text;
  return span;
}

// ---- the budget meter ---------------------------------------------------------------------

function money(v) {
  return v ? `$${v.toFixed(6).replace(/0+$/, "").replace(/\.$/, "")}` : "$0";
}

function renderBudget(b) {
  const part = (spent, max, unit, fmt = String) =>
    max === null || max === undefined ? `${fmt(spent)}${unit}` : `${fmt(spent)} / ${fmt(max)}${unit}`;
  const parts = [
    part(b.spent_teacher_tokens, b.max_teacher_tokens, " tokens"),
    part(b.spent_teacher_calls, b.max_teacher_calls, b.spent_teacher_calls === 1 && b.max_teacher_calls == null ? " call" : " calls"),
    part(b.spent_cost_usd, b.max_cost_usd, "", money),
  ];
  $("meter-text").textContent = `teacher budget: ${parts.join(" · ")}${b.exhausted ? " (spent)" : ""}`;
  const fractions = [
    [b.spent_teacher_tokens, b.max_teacher_tokens],
    [b.spent_teacher_calls, b.max_teacher_calls],
    [b.spent_cost_usd, b.max_cost_usd],
  ].filter(([, max]) => max !== null && max !== undefined).map(([s, max]) => (max > 0 ? s / max : 1));
  const fraction = Math.min(1, Math.max(0, ...fractions));
  $("meter-bar").style.width = `${(fraction * 100).toFixed(1)}%`;
  const meter = $("meter");
  meter.dataset.exhausted = String(b.exhausted);
  meter.dataset.spentTokens = String(b.spent_teacher_tokens);
  meter.dataset.spentCost = String(b.spent_cost_usd);
  $("budget-notice").hidden = !(b.exhausted || state.declined);
}

// ---- messages -----------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function addUser(text, answered = true) {
  const el = document.createElement("div");
  el.className = "msg user";
  el.textContent = text;
  if (!answered) markUnanswered(el);
  $("messages").appendChild(el);
  return el;
}

function markUnanswered(el, retry = false) {
  const note = document.createElement("div");
  note.className = "unanswered";
  note.textContent = "not answered yet";
  if (retry) {
    const button = document.createElement("button");
    button.className = "retry";
    button.type = "button";
    button.textContent = "Retry";
    button.addEventListener("click", () => answer(`/api/conversations/${state.current}/retry`, null, el));
    note.appendChild(button);
  }
  el.appendChild(note);
}

function addAssistant() {
  const el = document.createElement("div");
  el.className = "msg assistant";
  el.dataset.state = "streaming";
  const body = document.createElement("div");
  body.className = "body";
  el.appendChild(body);
  $("messages").appendChild(el);
  return el;
}

function usageLine(u) {
  const calls = u.teacher_calls === 1 ? "call" : "calls";
  let line = `student ${u.student_tokens} tokens, teacher ${u.teacher_tokens} tokens in ${u.teacher_calls} ${calls}` +
    ` (${(u.call_ratio * 100).toFixed(1)}% teacher)`;
  if (u.teacher_cost_usd) line += `, teacher cost ${money(u.teacher_cost_usd)}`;
  return line;
}

function finishAssistant(el, message) {
  el.dataset.state = "done";
  renderWithMath(el.querySelector(".body"), message.spans);
  if (message.usage) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = usageLine(message.usage);
    el.appendChild(meta);
  }
  for (const n of message.notices || []) {
    const note = document.createElement("div");
    note.className = `notice ${n.kind}`;
    note.textContent = n.text;
    el.appendChild(note);
  }
  state.declined = (message.notices || []).some((n) => n.kind === "budget" && n.text.startsWith("Teacher call declined"));
}

function appendDelta(el, source, text) {
  const body = el.querySelector(".body");
  const last = body.lastElementChild;
  if (last && last.classList.contains(source)) last.textContent += text;
  else body.appendChild(spanOf(source, text));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// ---- talking to the server ----------------------------------------------------------------

async function api(path, options) {
  const res = await fetch(path, options);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || `the server answered HTTP ${res.status}`);
  return data;
}

async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      if (line.trim()) yield JSON.parse(line);
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  document.querySelectorAll(".retry").forEach((b) => { b.disabled = busy; });
}

// POST a question (text) or a retry (text null); userEl is the question's element.
async function answer(url, text, userEl) {
  if (state.busy) return;
  showError("");
  setBusy(true);
  let res;
  try {
    res = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(text === null ? {} : { text }),
    });
  } catch (err) {
    setBusy(false);
    showError("The tutor server cannot be reached. Your message is still in the box: send it again when the server is back.");
    return false;
  }
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    setBusy(false);
    showError(data.error || `The tutor answered HTTP ${res.status}.`);
    return false;
  }
  if (text !== null) $("input").value = "";
  renderSuggestions(false);
  if (!userEl) userEl = addUser(text);
  userEl.querySelectorAll(".unanswered").forEach((n) => n.remove());
  const el = addAssistant();
  let finished = false;
  try {
    for await (const ev of events(res)) {
      if (ev.type === "delta") appendDelta(el, ev.source, ev.text);
      else if (ev.type === "budget") renderBudget(ev.budget);
      else if (ev.type === "done") {
        finished = true;
        finishAssistant(el, ev.message);
        renderBudget(ev.budget);
      } else if (ev.type === "error") {
        finished = true;
        failAnswer(el, userEl, ev.message);
        if (ev.budget) renderBudget(ev.budget);
      }
    }
  } catch (err) {
    // the connection broke mid-answer
  }
  if (!finished) failAnswer(el, userEl, "The answer was cut off (the connection to the tutor broke). Your question is kept: reload the page.");
  setBusy(false);
  loadConversations();
  return true;
}

function failAnswer(el, userEl, message) {
  if (!el.querySelector(".body").textContent) el.remove();
  else { el.dataset.state = "failed"; el.classList.add("failed"); }
  markUnanswered(userEl, true);
  showError(message);
}

async function send(event) {
  if (event) event.preventDefault();
  const text = $("input").value;
  if (!text.trim()) {
    showError("The message is empty: type a question first.");
    return;
  }
  await answer(`/api/conversations/${state.current}/messages`, text, null);
}

// ---- conversations ------------------------------------------------------------------------

async function loadConversations() {
  const { conversations } = await api("/api/conversations");
  const list = $("conversations");
  list.textContent = "";
  for (const c of conversations) {
    const li = document.createElement("li");
    li.textContent = c.title || "New conversation";
    li.dataset.id = c.id;
    li.className = c.id === state.current ? "active" : "";
    li.addEventListener("click", () => openConversation(c.id));
    list.appendChild(li);
  }
  return conversations;
}

async function openConversation(id) {
  if (state.busy) return;
  const conv = await api(`/api/conversations/${id}`);
  state.current = id;
  state.declined = false;
  history.replaceState(null, "", `#c=${id}`);
  showError("");
  $("messages").textContent = "";
  const messages = conv.messages;
  messages.forEach((m, i) => {
    if (m.role === "user") {
      const el = addUser(m.text, true);
      if (!m.answered) markUnanswered(el, conv.pending && i === messages.length - 1);
    } else {
      finishAssistant(addAssistant(), m);
    }
  });
  renderBudget(conv.budget);
  renderSuggestions(messages.length === 0);
  await loadConversations();
}

async function newConversation() {
  if (state.busy) return;
  const conv = await api("/api/conversations", { method: "POST" });
  await openConversation(conv.id);
  $("input").focus();
}

function renderSuggestions(show) {
  const box = $("suggestions");
  box.textContent = "";
  if (!show || !state.info) return;
  for (const q of state.info.suggestions) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = q;
    b.addEventListener("click", () => { $("input").value = q; $("input").focus(); });
    box.appendChild(b);
  }
}

async function start() {
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("new-conversation").addEventListener("click", newConversation);
  try {
    state.info = await api("/api/info");
    $("world").textContent = `${state.info.world ? state.info.world + ": " : ""}student ${state.info.student}, teacher ${state.info.teacher}`;
    const conversations = await loadConversations();
    const wanted = new URLSearchParams(location.hash.slice(1)).get("c");
    if (wanted && conversations.some((c) => c.id === wanted)) await openConversation(wanted);
    else if (conversations.length) await openConversation(conversations[0].id);
    else await newConversation();
  } catch (err) {
    showError(`The tutor server cannot be reached (${err.message}). Reload the page when it is back.`);
  }
  document.body.dataset.ready = "true";
}

start();
