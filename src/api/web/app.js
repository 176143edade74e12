// hpcforge's page. Plain JavaScript, no build step, no third-party code: it talks to
// the same API as any portal, with the token the user signs in with. Everything the
// server sends is put on the page as text (textContent), never as HTML.
'use strict';

const TOKEN_KEY = 'hpcforge-token';
const FINAL = new Set(['completed', 'failed', 'cancelled', 'unknown']);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  me: null,
  tasks: new Map(),      // id -> TaskSummary
  listStream: null,      // AbortController of the tasks stream
  nextCursor: null,      // where the list's next (older) page starts
  detail: null,          // { id, task, stream: AbortController, lastSeq }
  apps: [],
  clusters: [],
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function when(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function stateBadge(s) {
  return el('span', { class: `state ${s}`, text: s });
}

// --------------------------------------------------------------------------------
// The API
// --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, envelope) {
    super(envelope && envelope.message ? envelope.message : `HTTP ${status}`);
    this.status = status;
    this.envelope = envelope || {};
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const type = resp.headers.get('content-type') || '';
  if (type.startsWith('application/json')) {
    const envelope = await resp.json();
    if (!resp.ok) throw new ApiError(resp.status, envelope);
    return envelope;
  }
  const text = await resp.text();
  if (!resp.ok) throw new ApiError(resp.status, { message: text });
  return { data: text, message: '' };
}

// Server-Sent Events over fetch, so the token goes in a header (EventSource cannot
// send one, and a token in a URL ends up in logs). Calls onEvent({event, data, id})
// until the stream ends; resolves then, rejects on HTTP errors.
async function stream(path, { lastEventId, signal, onEvent }) {
  const headers = { Authorization: `Bearer ${state.token}`, Accept: 'text/event-stream' };
  if (lastEventId) headers['Last-Event-ID'] = String(lastEventId);
  const resp = await fetch(path, { headers, signal });
  if (!resp.ok) {
    let envelope = null;
    try { envelope = await resp.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(resp.status, envelope);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let ev = { event: 'message', data: '', id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, '');
      buf = buf.slice(nl + 1);
      if (line === '') {
        if (ev.data !== '' || ev.id !== null) onEvent(ev);
        ev = { event: 'message', data: '', id: null };
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? '' : line.slice(colon + 1);
        if (v.startsWith(' ')) v = v.slice(1);
        if (field === 'event') ev.event = v;
        else if (field === 'data') ev.data += (ev.data ? '\n' : '') + v;
        else if (field === 'id') ev.id = v;
      }
    }
  }
}

// Keeps a stream open: reconnects after a drop (not after an abort or a 4xx).
function keepStreaming(path, opts) {
  const ctrl = new AbortController();
  (async () => {
    let delay = 1000;
    while (!ctrl.signal.aborted) {
      try {
        opts.onOpen && opts.onOpen();
        await stream(path(), { ...opts, lastEventId: opts.lastEventId && opts.lastEventId(), signal: ctrl.signal });
        delay = 1000;
        if (opts.stopWhenEnded && opts.stopWhenEnded()) return;
      } catch (e) {
        if (ctrl.signal.aborted) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 429) {
          opts.onError && opts.onError(e);
          return;
        }
      }
      opts.onDrop && opts.onDrop();
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  })();
  return ctrl;
}

// --------------------------------------------------------------------------------
// Signing in
// --------------------------------------------------------------------------------

async function signIn(token) {
  state.token = token.trim();
  const me = await api('GET', '/api/v1/me');
  state.me = me.data;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $('#who').textContent = `${me.data.user} (${me.data.role})`;
  $('#signin-view').hidden = true;
  $('#nav').hidden = false;
  $('#account').hidden = false;
  $('#all-label').hidden = me.data.role !== 'admin';
  showTab('tasks');
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = '';
  state.me = null;
  if (state.listStream) state.listStream.abort();
  closeDetail();
  state.tasks.clear();
  $('#tasks tbody').replaceChildren();
  for (const id of ['#tasks-view', '#submit-view', '#nav', '#account']) $(id).hidden = true;
  $('#signin-view').hidden = false;
  $('#token').value = '';
}

function showTab(name) {
  $('#tab-tasks').classList.toggle('active', name === 'tasks');
  $('#tab-submit').classList.toggle('active', name === 'submit');
  $('#tasks-view').hidden = name !== 'tasks';
  $('#submit-view').hidden = name !== 'submit';
  if (name === 'tasks') startTasks();
  if (name === 'submit') loadSubmitForm();
}

// --------------------------------------------------------------------------------
// Tasks: the list, live
// --------------------------------------------------------------------------------

function everyone() {
  return state.me && state.me.role === 'admin' && $('#all').checked;
}

// The list query: the caller's own tasks, or everyone's for an admin who asks.
function listPath(cursor) {
  const q = ['limit=50'];
  if (!everyone()) q.push(`owner=${encodeURIComponent(state.me.user)}`);
  if (cursor) q.push(`cursor=${encodeURIComponent(cursor)}`);
  return `/api/v1/tasks?${q.join('&')}`;
}

function setOlder(cursor) {
  state.nextCursor = cursor || null;
  $('#older').hidden = !state.nextCursor;
}

async function startTasks() {
  if (state.listStream) state.listStream.abort();
  state.tasks.clear();
  $('#tasks tbody').replaceChildren();
  setOlder(null);
  try {
    const page = await api('GET', listPath());
    for (const t of page.data.tasks.slice().reverse()) upsertTask(t);
    setOlder(page.data.next_cursor);
  } catch (e) {
    $('#live').textContent = `could not list tasks: ${e.message}`;
  }
  renderEmpty();
  state.listStream = keepStreaming(() => `/api/v1/tasks/stream${everyone() ? '?all=true' : ''}`, {
    onOpen: () => { $('#live').textContent = 'live'; },
    onDrop: () => { $('#live').textContent = 'reconnecting…'; },
    onError: (e) => { $('#live').textContent = `not live: ${e.message}`; },
    onEvent: (ev) => {
      if (ev.event !== 'task') return;
      const t = JSON.parse(ev.data);
      upsertTask(t);
      if (state.detail && state.detail.id === t.id) renderSummary(t);
    },
  });
}

// The next page of older tasks, below the ones shown.
async function loadOlder() {
  if (!state.nextCursor) return;
  const button = $('#older');
  button.disabled = true;
  try {
    const page = await api('GET', listPath(state.nextCursor));
    for (const t of page.data.tasks) upsertTask(t, { older: true });
    setOlder(page.data.next_cursor);
  } catch (e) {
    $('#live').textContent = `could not list older tasks: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

function renderEmpty() {
  $('#no-tasks').hidden = state.tasks.size > 0;
}

function phaseCell(t) {
  return el('td', {}, ...t.phases.map((p) =>
    el('span', { class: 'phase', dataset: { phase: p.phase, state: p.state } },
      `${p.phase} `, stateBadge(p.state), p.job_id ? el('span', { class: 'mono', text: ` ${p.job_id}` }) : null)));
}

function taskRow(t) {
  const row = el('tr', { dataset: { task: t.id, state: t.state }, onclick: () => openDetail(t.id) },
    el('td', { class: 'mono', title: t.id, text: t.id.slice(0, 13) }),
    el('td', { text: `${t.application.name} v${t.application.version}` }),
    el('td', { text: `${t.cluster.name} v${t.cluster.version}` }),
    el('td', { text: t.owner }),
    el('td', { class: 'task-state' }, stateBadge(t.state)),
    phaseCell(t),
    el('td', { text: when(t.created_at) }),
    el('td', { text: when(t.updated_at) }));
  if (state.detail && state.detail.id === t.id) row.classList.add('selected');
  return row;
}

function upsertTask(t, { older = false } = {}) {
  const known = state.tasks.get(t.id);
  if (known && known.revision > t.revision) return; // an older snapshot, late
  state.tasks.set(t.id, t);
  const body = $('#tasks tbody');
  const row = taskRow(t);
  const old = body.querySelector(`tr[data-task="${CSS.escape(t.id)}"]`);
  if (old) old.replaceWith(row);
  else if (older) body.append(row); // a page of older tasks goes below
  else body.prepend(row); // newest first
  renderEmpty();
}

// --------------------------------------------------------------------------------
// One task: phases, events, scripts, output, cancel, restart
// --------------------------------------------------------------------------------

function closeDetail() {
  if (state.detail && state.detail.stream) state.detail.stream.abort();
  state.detail = null;
  $('#detail').hidden = true;
  for (const r of document.querySelectorAll('#tasks tbody tr.selected')) r.classList.remove('selected');
}

async function openDetail(id) {
  closeDetail();
  const row = document.querySelector(`#tasks tbody tr[data-task="${CSS.escape(id)}"]`);
  if (row) row.classList.add('selected');
  state.detail = { id, lastSeq: 0, stream: null, data: new Map() };
  $('#detail').hidden = false;
  $('#detail-error').textContent = '';
  $('#detail-events').replaceChildren();
  renderData();
  $('#viewer-title').textContent = 'Script or output';
  $('#viewer').textContent = 'Choose a script or an output above.';
  let task;
  try {
    task = (await api('GET', `/api/v1/tasks/${id}`)).data;
  } catch (e) {
    $('#detail-error').textContent = e.message;
    return;
  }
  if (!state.detail || state.detail.id !== id) return;
  state.detail.outputs = task.outputs || [];
  state.detail.workspace = task.workspace || null;
  state.detail.position = task.queue_position || null;
  renderSummary(task);
  for (const ev of task.events) addEvent(ev);
  const detail = state.detail;
  // Live while a job runs, or while what an ended job posted is still being read.
  let ended = FINAL.has(task.state)
    && !task.phases.some((p) => p.state === 'pending' || p.state === 'running' || (p.job_id && !(p.posts && p.posts.drained)));
  if (ended) return;
  detail.stream = keepStreaming(() => `/api/v1/tasks/${id}/events/stream`, {
    lastEventId: () => detail.lastSeq,
    stopWhenEnded: () => ended,
    onError: (e) => { $('#detail-error').textContent = e.message; },
    onEvent: (ev) => {
      if (state.detail !== detail) return;
      if (ev.event === 'event') addEvent(JSON.parse(ev.data));
      else if (ev.event === 'task') { const t = JSON.parse(ev.data); renderSummary(t); upsertTask(t); }
      else if (ev.event === 'end') ended = true;
    },
  });
}

function addEvent(ev) {
  if (!state.detail || ev.seq <= state.detail.lastSeq) return;
  state.detail.lastSeq = ev.seq;
  const parts = [el('time', { text: when(ev.at) })];
  // What the job itself posted is marked as the job's.
  if (ev.post) parts.push(el('span', { class: 'job-mark', text: `job ${ev.phase || ''}`.trim() }));
  parts.push(ev.message);
  $('#detail-events').append(el('li', { dataset: { seq: ev.seq }, class: ev.post ? 'from-job' : '' }, ...parts));
  if (ev.post && ev.post.key !== undefined) {
    const prev = state.detail.data.get(ev.post.key);
    state.detail.data.set(ev.post.key, {
      value: ev.post.value, phase: ev.phase, frame: ev.post.frame, at: ev.at, values: prev ? prev.values + 1 : 1,
    });
    renderData();
  }
}

// The data the jobs posted: each key's newest value (GET /api/v1/tasks/{id}/data
// says the same; built here from the events, so it follows the live stream).
function renderData() {
  const data = state.detail ? state.detail.data : new Map();
  $('#detail-data-box').hidden = data.size === 0;
  const rows = [...data.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([k, d]) => el('tr', {},
    el('td', { text: k }),
    el('td', { class: 'value', text: JSON.stringify(d.value) }),
    el('td', { text: d.frame !== undefined && d.frame !== null ? `${d.phase}/${d.frame}` : d.phase }),
    el('td', { text: String(d.values) }),
    el('td', { text: when(d.at) })));
  $('#detail-data tbody').replaceChildren(...rows);
}

function renderSummary(t) {
  if (!state.detail || state.detail.id !== t.id) return;
  state.detail.task = t;
  $('#detail-title').textContent = `${t.application.name} on ${t.cluster.name} — ${t.id}`;
  $('#detail-state').replaceChildren(stateBadge(t.state));
  $('#detail-state').dataset.state = t.state;
  // Queued: what it waits for, and its place (as of the last full read).
  const q = t.queue;
  $('#detail-queue').hidden = !q;
  if (q) {
    const pos = state.detail.position ? ` — number ${state.detail.position} in the queue` : '';
    $('#detail-queue').textContent = `waits for ${q.waiting_for || 'the queue\'s first look'}${pos}`;
  }
  // Where its run directory lives, and until when (workspaces expire).
  const ws = state.detail.workspace;
  $('#detail-workspace').hidden = !ws;
  if (ws) {
    const soon = new Date(ws.expires_at) - Date.now() < 3 * 86400 * 1000;
    $('#detail-workspace').textContent = `workspace ${ws.id}: expires ${when(ws.expires_at)}`;
    $('#detail-workspace').classList.toggle('error', soon);
  }
  // Outputs kept in the store when the task ended: they outlive the run directory.
  const a = t.archive;
  $('#detail-archive').hidden = !a || a.state === 'waiting';
  if (a && a.state === 'done') {
    const left = a.left_out_count ? `; ${a.left_out_count} left out` : '';
    $('#detail-archive').textContent = `${a.kept} output${a.kept === 1 ? '' : 's'} kept (${sizeShown(a.bytes)})${left}`;
  } else if (a && a.state === 'failed') {
    $('#detail-archive').textContent = `outputs not kept: ${a.error || 'no reason given'}`;
  } else if (a && a.state === 'skipped') {
    $('#detail-archive').textContent = 'outputs not kept (cancelled)';
  }
  $('#detail-archive').classList.toggle('error', !!a && a.state === 'failed');
  const submitted = t.phases.some((p) => p.job_id);
  $('#download-outputs').hidden = !(submitted && state.detail.outputs && state.detail.outputs.length);
  $('#show-files').hidden = !submitted;
  const live = !FINAL.has(t.state) || t.phases.some((p) => p.state === 'pending' || p.state === 'running');
  $('#cancel').hidden = !live;
  $('#restart-box').hidden = live;
  // Restart choices: what did not succeed, or from any phase (it and what waits for it).
  const from = $('#restart-from');
  const chosen = from.value;
  // Each with what it would rerun, or why it cannot be chosen (restart_choices).
  const choices = t.restart_choices || [];
  const option = (c) => el('option', {
    value: c.from || '',
    text: `${c.from ? `from ${c.from}` : 'what did not succeed'}${c.reruns && c.reruns.length ? ` (${c.reruns.join(', ')})` : ''}`,
    title: c.refused || '',
    disabled: Boolean(c.refused),
  });
  from.replaceChildren(...(choices.length ? choices.map(option)
    : [el('option', { value: '', text: 'what did not succeed' })]));
  const usable = [...from.options].filter((o) => !o.disabled);
  from.value = usable.some((o) => o.value === chosen) ? chosen : (usable[0] ? usable[0].value : '');
  const waits = (p) => (p.after || []).map((w) => `${w.phase} ${w.when}${w.per_frame ? ' per frame' : ''}`).join(', ');
  // Frames as progress: done, failed, and (while the phase is live) still to run or running.
  const frames = (p) => {
    const f = p.frames;
    const left = f.total - f.completed - f.failed;
    const rest = left > 0 ? `, ${left} ${['waiting', 'submitting', 'blocked', 'pending', 'running'].includes(p.state) ? 'to run or running' : 'did not run'}` : '';
    const rerun = f.selection ? ` (this run: frames ${f.selection})` : '';
    return ` ${f.completed}/${f.total} frames done, ${f.failed} failed${rest}${rerun}`;
  };
  // What the ended job used of what it asked for (sacct, or the job's own record).
  const used = (p) => {
    const u = p.usage;
    if (!u) return p.usage_due ? 'being read' : '';
    const pct = (x) => `${Math.round(x * 100)}%`;
    const mib = (b) => `${Math.round(b / 1048576)} MiB`;
    const cpu = u.cpu_efficiency != null ? `CPU ${pct(u.cpu_efficiency)} of ${u.cpus}` : `CPU ${u.cpu_seconds} s`;
    const mem = u.max_rss_bytes != null
      ? `, peak ${mib(u.max_rss_bytes)}${u.memory_efficiency != null ? ` (${pct(u.memory_efficiency)} of ${mib(u.requested_memory_bytes)})` : ''}`
      : '';
    return `${cpu}${mem}, ${Math.round(u.elapsed_seconds)} s${u.nodes && u.nodes.length ? ` on ${u.nodes.join(',')}` : ''}`;
  };
  const rows = t.phases.map((p) => el('tr', { dataset: { phase: p.phase, state: p.state } },
    el('td', { text: p.phase }),
    el('td', { class: 'muted', text: waits(p) }),
    el('td', {}, stateBadge(p.state),
      p.frames ? el('span', { class: 'muted frames', text: frames(p) }) : null),
    el('td', { class: 'mono job', text: p.job_id || '' }),
    el('td', { text: p.exit_code === undefined || p.exit_code === null ? '' : String(p.exit_code) }),
    el('td', { text: when(p.submitted_at) }),
    el('td', { text: when(p.started_at) }),
    el('td', { text: when(p.ended_at) }),
    el('td', { class: 'used', text: used(p), title: p.usage ? `from ${p.usage.source === 'job' ? "the job's own record" : p.usage.source}` : '' }),
    el('td', { text: [p.reason, p.explanation, p.scheduler_message].filter(Boolean).join(' — ') }),
    el('td', {},
      el('button', { type: 'button', text: 'script', onclick: () => showScript(t.id, p.phase) }),
      p.job_id ? el('button', { type: 'button', text: 'stdout', onclick: () => showOutput(t.id, p.phase, 'stdout') }) : null,
      p.job_id ? el('button', { type: 'button', text: 'stderr', onclick: () => showOutput(t.id, p.phase, 'stderr') }) : null,
      p.frames && p.frames.failed > 0 ? el('button', { type: 'button', text: 'failed frames', onclick: () => showFailedFrames(t.id, p.phase) }) : null)));
  $('#phases tbody').replaceChildren(...rows);
}

async function showScript(id, phase) {
  $('#viewer-title').textContent = `script_${phase}`;
  try {
    $('#viewer').textContent = (await api('GET', `/api/v1/tasks/${id}/scripts/${phase}`)).data;
  } catch (e) {
    $('#viewer').textContent = e.message;
  }
}

async function showOutput(id, phase, which) {
  $('#viewer-title').textContent = `${phase} ${which}`;
  try {
    const r = await api('GET', `/api/v1/tasks/${id}/output/${phase}?stream=${which}&lines=500`);
    $('#viewer-title').textContent = `${phase} ${which} — ${r.data.path}${r.data.truncated ? ' (last lines)' : ''}`;
    $('#viewer').textContent = r.data.text || '(empty)';
  } catch (e) {
    $('#viewer').textContent = e.message;
  }
}

// A file fetched with the token (a plain link would carry none), handed to the
// browser as a download.
async function download(path, name) {
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  if (!resp.ok) {
    let msg = `${resp.status} ${resp.statusText}`;
    try { msg = (await resp.json()).message || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  const url = URL.createObjectURL(await resp.blob());
  const a = el('a', { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function downloadOutputs() {
  const d = state.detail;
  if (!d) return;
  try {
    $('#detail-error').textContent = '';
    await download(`/api/v1/tasks/${d.id}/outputs.tar.gz`, `${d.id}-outputs.tar.gz`);
  } catch (e) {
    $('#detail-error').textContent = e.message;
  }
}

// A size in decimal units, as the server writes them ("12.5 MB").
function sizeShown(n) {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let v = n;
  let i = 0;
  while (v >= 1000 && i + 1 < units.length) {
    v /= 1000;
    i += 1;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1).replace(/\.0$/, '')} ${units[i]}`;
}

// The run directory, listed on the cluster as the task's owner (or, once it is gone,
// the outputs kept in the store); each file downloads.
async function showFiles() {
  const d = state.detail;
  if (!d) return;
  $('#viewer-title').textContent = 'Files';
  try {
    const r = await api('GET', `/api/v1/tasks/${d.id}/files`);
    const rows = r.data.files.filter((f) => f.kind === 'file').map((f) => el('li', { dataset: { path: f.path } },
      el('button', {
        type: 'button',
        text: 'download',
        onclick: async () => {
          try {
            const enc = f.path.split('/').map(encodeURIComponent).join('/');
            await download(`/api/v1/tasks/${d.id}/files/${enc}`, f.path.split('/').pop());
          } catch (e) {
            $('#detail-error').textContent = e.message;
          }
        },
      }),
      ` ${f.path} (${f.size} bytes)`));
    $('#viewer').replaceChildren(el('ul', { class: 'files' }, ...rows));
    $('#viewer-title').textContent = `Files — ${r.message}`;
  } catch (e) {
    $('#viewer').textContent = e.message;
  }
}

async function showFailedFrames(id, phase) {
  $('#viewer-title').textContent = `${phase}: failed frames`;
  try {
    const r = await api('GET', `/api/v1/tasks/${id}/frames/${phase}?state=failed&limit=1000`);
    const cpu = (f) => (f.cpu_seconds != null ? `, CPU ${f.cpu_seconds} s` : '') + (f.node ? ` on ${f.node}` : '');
    const lines = r.data.frames.map((f) => `frame ${f.frame}: exit status ${f.exit_code}, ${f.started_at || '?'} – ${f.ended_at || '?'}, job ${f.job || '?'}${cpu(f)}`);
    const more = r.data.next_offset ? `\n… and ${r.data.matched - r.data.frames.length} more` : '';
    $('#viewer-title').textContent = `${phase}: ${r.data.matched} failed frames of ${r.data.total}`;
    $('#viewer').textContent = (lines.join('\n') || '(none)') + more;
  } catch (e) {
    $('#viewer').textContent = e.message;
  }
}

async function cancelTask() {
  const d = state.detail;
  if (!d) return;
  try {
    const r = await api('DELETE', `/api/v1/tasks/${d.id}`);
    $('#detail-error').textContent = '';
    for (const ev of r.data.events) addEvent(ev);
  } catch (e) {
    $('#detail-error').textContent = e.message;
  }
}

async function restartTask() {
  const d = state.detail;
  if (!d) return;
  try {
    const from = $('#restart-from').value;
    await api('POST', `/api/v1/tasks/${d.id}/restart`, from ? { from } : {});
    openDetail(d.id);
  } catch (e) {
    $('#detail-error').textContent = e.message;
  }
}

// --------------------------------------------------------------------------------
// Submitting: a form built from the application's input specs
// --------------------------------------------------------------------------------

async function loadSubmitForm() {
  $('#form-error').textContent = '';
  try {
    const [apps, clusters] = await Promise.all([api('GET', '/api/v1/applications'), api('GET', '/api/v1/clusters')]);
    state.apps = apps.data;
    state.clusters = clusters.data;
  } catch (e) {
    $('#form-error').textContent = e.message;
    return;
  }
  const keep = $('#app').value;
  $('#app').replaceChildren(...state.apps.map((a) =>
    el('option', { value: a.name, text: (a.definition && a.definition.label) || a.name })));
  if (state.apps.some((a) => a.name === keep)) $('#app').value = keep;
  renderForm();
}

function currentApp() {
  return state.apps.find((a) => a.name === $('#app').value);
}

function renderForm() {
  const app = currentApp();
  const fields = $('#inputs');
  fields.replaceChildren(el('legend', { text: 'Inputs' }));
  $('#app-description').textContent = app && app.definition ? app.definition.description || '' : '';
  if (!app) return;
  // Clusters the application has a cluster environment for.
  const envs = new Set(app.files.map((f) => f.path).filter((p) => p.startsWith('cluster/')).map((p) => p.slice(8)));
  const keep = $('#cluster').value;
  const usable = state.clusters.filter((c) => envs.has(c.name));
  $('#cluster').replaceChildren(...usable.map((c) =>
    el('option', { value: c.name, text: (c.definition && c.definition.label) || c.name })));
  if (usable.some((c) => c.name === keep)) $('#cluster').value = keep;
  const inputs = (app.definition.inputs || []).slice()
    .sort((a, b) => (a.order ?? 1e9) - (b.order ?? 1e9));
  for (const spec of inputs) {
    if (spec.hidden) continue;
    fields.append(inputField(spec));
  }
}

function inputField(spec) {
  const id = `input-${spec.name}`;
  const editable = spec.editable !== false;
  let control;
  switch (spec.type) {
    case 'boolean':
      control = el('input', { id, type: 'checkbox', name: spec.name, disabled: !editable });
      control.checked = spec.value === true;
      break;
    case 'select':
      control = el('select', { id, name: spec.name, disabled: !editable },
        ...(spec.choices || []).map((c, i) => {
          const value = c !== null && typeof c === 'object' && 'value' in c ? c.value : c;
          const label = c !== null && typeof c === 'object' && 'label' in c ? c.label : String(value);
          const o = el('option', { value: String(i), text: label });
          if (JSON.stringify(value) === JSON.stringify(spec.value)) o.selected = true;
          return o;
        }));
      break;
    case 'file':
      control = el('textarea', { id, name: spec.name, rows: 3, disabled: !editable, placeholder: 'one absolute path per line' });
      control.value = (spec.files || []).map((f) => f.path).join('\n');
      break;
    default: {
      const numeric = spec.type === 'int' || spec.type === 'float';
      control = el('input', {
        id, name: spec.name, type: numeric ? 'number' : 'text', disabled: !editable,
        step: spec.type === 'int' ? '1' : (spec.type === 'float' ? 'any' : undefined),
        min: spec.min, max: spec.max, maxlength: spec.maxLength, pattern: spec.pattern,
      });
      if (spec.value !== undefined && spec.value !== null) control.value = String(spec.value);
    }
  }
  const label = el('label', { for: id, class: spec.required ? 'required' : undefined,
    text: spec.labelVisible === false ? '' : (spec.label || spec.name) });
  return el('div', { class: 'field', dataset: { input: spec.name, type: spec.type } },
    label, control,
    el('span', { class: 'field-error', dataset: { for: spec.name }, role: 'alert' }),
    spec.description ? el('span', { class: 'help', text: spec.description }) : null);
}

// What the form holds, as the task's `inputs` object (name → value). Values are
// sent typed when they read as their type, and as typed otherwise, so the server's
// validation (not this page) says what is wrong.
function formInputs() {
  const app = currentApp();
  const out = {};
  for (const spec of app.definition.inputs || []) {
    if (spec.hidden || spec.editable === false) continue;
    const control = document.getElementById(`input-${spec.name}`);
    if (!control) continue;
    switch (spec.type) {
      case 'boolean': out[spec.name] = control.checked; break;
      case 'select': {
        const c = (spec.choices || [])[Number(control.value)];
        if (c !== undefined) out[spec.name] = c !== null && typeof c === 'object' && 'value' in c ? c.value : c;
        break;
      }
      case 'file': {
        const paths = control.value.split('\n').map((s) => s.trim()).filter(Boolean);
        out[spec.name] = paths.map((path) => ({ action: 'COPY', path }));
        break;
      }
      case 'int':
      case 'float': {
        const text = control.value.trim();
        if (text === '') break;
        const n = Number(text);
        out[spec.name] = Number.isFinite(n) ? n : text;
        break;
      }
      default:
        out[spec.name] = control.value;
    }
  }
  return out;
}

function clearErrors() {
  $('#form-error').textContent = '';
  for (const e of document.querySelectorAll('.field-error')) e.textContent = '';
  for (const f of document.querySelectorAll('.field.invalid')) f.classList.remove('invalid');
}

// Puts each problem next to its field (`/inputs/<name>...`), the rest above the button.
function showErrors(err) {
  const rest = [];
  for (const p of err.envelope.errors || []) {
    const m = /^\/inputs\/([^/]+)/.exec(p.pointer || '');
    const field = m && document.querySelector(`.field[data-input="${CSS.escape(m[1])}"]`);
    if (field) {
      field.classList.add('invalid');
      const slot = field.querySelector('.field-error');
      slot.textContent = slot.textContent ? `${slot.textContent}; ${p.message}` : p.message;
    } else if (p.message !== err.message) {
      rest.push(p.pointer ? `${p.pointer}: ${p.message}` : p.message);
    }
  }
  $('#form-error').textContent = [err.message, ...rest].join('\n');
}

async function submitTask(ev) {
  ev.preventDefault();
  clearErrors();
  const body = { application: $('#app').value, cluster: $('#cluster').value, inputs: formInputs() };
  $('#submit').disabled = true;
  try {
    const r = await api('POST', '/api/v1/tasks', body);
    showTab('tasks');
    upsertTask({ ...r.data, event_count: r.data.events.length, last_event: r.data.events[r.data.events.length - 1] });
    openDetail(r.data.id);
  } catch (e) {
    if (e instanceof ApiError) showErrors(e);
    else $('#form-error').textContent = String(e);
  } finally {
    $('#submit').disabled = false;
  }
}

// --------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('#signin-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('#signin-error').textContent = '';
    try {
      await signIn($('#token').value);
    } catch (e) {
      state.token = '';
      $('#signin-error').textContent = e.message;
    }
  });
  $('#signout').addEventListener('click', signOut);
  $('#tab-tasks').addEventListener('click', () => showTab('tasks'));
  $('#tab-submit').addEventListener('click', () => showTab('submit'));
  $('#all').addEventListener('change', startTasks);
  $('#older').addEventListener('click', loadOlder);
  $('#close-detail').addEventListener('click', closeDetail);
  $('#cancel').addEventListener('click', cancelTask);
  $('#restart').addEventListener('click', restartTask);
  $('#download-outputs').addEventListener('click', downloadOutputs);
  $('#show-files').addEventListener('click', showFiles);
  $('#app').addEventListener('change', renderForm);
  $('#submit-form').addEventListener('submit', submitTask);
  if (state.token) {
    signIn(state.token).catch(() => signOut());
  }
});
