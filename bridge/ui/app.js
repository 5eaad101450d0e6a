// CyberBackup browser UI: talks to the bridge's API (same origin, session cookie).
// No framework and no innerHTML: every name from a snapshot or a disk is set as text.
'use strict';

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

// IEC units, one system everywhere.
function iec(n) {
  if (n === null || n === undefined) return '—';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n; let i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${u[i]}`;
}

function plural(n, one, many) { return `${n} ${n === 1 ? one : many}`; }

// A date with the day, in the browser's time zone: "2026-12-04 18:55".
function when(ms) {
  if (!ms && ms !== 0) return '—';
  const d = new Date(ms);
  const p = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

function duration(s) {
  if (s === null || s === undefined) return '—';
  const t = Math.round(s);
  if (t < 60) return `${t} s`;
  if (t < 3600) return `${Math.floor(t / 60)} min ${t % 60} s`;
  return `${Math.floor(t / 3600)} h ${Math.floor((t % 3600) / 60)} min`;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `the bridge answered ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.detail = body && body.detail;
  }
}

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { error: 'The bridge cannot be reached. Is it still running?', code: 'bridge_down', detail: String(e) });
  }
  let data = null;
  try { data = await res.json(); } catch { data = null; }
  if (!res.ok) {
    if (res.status === 401 && data && data.code === 'unauthorized') showOnly('signin');
    throw new ApiError(res.status, data);
  }
  return data;
}

// Errors in words, with the reason behind a "Details" toggle.
function notify(err, kind = 'error') {
  const box = $('#notice');
  box.replaceChildren();
  box.className = `notice notice-${kind}`;
  if (kind === 'error') {
    box.append(el('p', { text: err.message || String(err) }));
    if (err.code || err.detail) {
      box.append(el('details', {}, el('summary', { text: 'Details' }),
        el('code', { text: [err.code, err.detail].filter(Boolean).join(': ') })));
    }
  } else {
    box.append(el('p', { text: err }));
  }
  box.append(el('button', { type: 'button', class: 'btn btn-ghost btn-small', text: 'Dismiss', onclick: () => { box.hidden = true; } }));
  box.hidden = false;
}

function clearNotice() { $('#notice').hidden = true; }

function showOnly(id) {
  for (const s of ['signin', 'setup', 'unlock', 'app']) $(`#${s}`).hidden = s !== id;
  $('#lock').hidden = id !== 'app';
}

let status = null;

async function refresh() {
  try {
    status = await api('GET', '/api/status');
  } catch (e) {
    if (e.status !== 401) notify(e);
    return;
  }
  if (!status.setup) {
    $('#create-server').value ||= status.default_server || '';
    $('#enrol-server').value ||= status.default_server || '';
    $('#server-info').textContent = 'This computer is not set up yet';
    showOnly('setup');
    return;
  }
  const fp = status.server_key ? ` · key ${status.server_key.slice(0, 23)}…` : '';
  $('#server-info').textContent = `${status.account} on ${status.server}${fp}`;
  if (status.server_key) $('#server-info').title = `The server's pinned key: ${status.server_key}`;
  if (!status.unlocked) {
    $('#unlock-who').textContent = `Account ${status.account} on ${status.server}, device ${status.device}.`;
    showOnly('unlock');
    return;
  }
  showOnly('app');
  if (status.error) notify(status.error);
  renderOverview();
}

function renderOverview() {
  const s = status;
  const last = s.last_backup;
  $('#stat-last').textContent = last ? when(last.time_ms) : 'never';
  $('#stat-last-sub').textContent = last
    ? `${plural(last.files, 'file', 'files')}, ${iec(last.size)}${last.partial ? ' — some files could not be read' : ' — complete'}${last.tags.length ? ` · ${last.tags.join(', ')}` : ''}`
    : 'Back up a folder to start.';
  const u = s.usage || {};
  $('#stat-stored').textContent = iec(u.stored_bytes);
  $('#stat-quota').textContent = u.quota ? `of a ${iec(u.quota)} quota (${Math.round((100 * u.stored_bytes) / u.quota)}%)` : 'no quota';
  $('#stat-logical').textContent = iec(s.snapshots_size);
  $('#stat-dedup').textContent = s.snapshots_size && u.stored_bytes
    ? `stored in ${iec(u.stored_bytes)} after deduplication and compression`
    : '';
  $('#stat-count').textContent = u.snapshots ?? '—';
  $('#stat-chunks').textContent = u.chunks !== undefined ? plural(u.chunks, 'chunk', 'chunks') : '';
  renderRunning(s.uploads || []);
}

const running = new Map();
function renderRunning(list) {
  if (list) { running.clear(); for (const b of list) running.set(b.id, b); }
  const ul = $('#running');
  ul.replaceChildren();
  const open = [...running.values()].filter((b) => b.state === 'open' || b.state === 'committing');
  if (!open.length) { ul.append(el('li', { class: 'muted', text: 'Nothing is running.' })); return; }
  for (const b of open) {
    ul.append(el('li', {}, `${b.label || 'Backup'}: ${b.files_done} of ${plural(b.files_total, 'file', 'files')}, ${iec(b.bytes_done + b.bytes_in_flight)} of ${iec(b.bytes_total)}`,
      b.eta_seconds !== null && b.eta_seconds !== undefined ? ` · about ${duration(b.eta_seconds)} left` : ''));
  }
}

// ---- tabs
function showView(name) {
  for (const t of document.querySelectorAll('.tab')) {
    if (t.dataset.view === name) t.setAttribute('aria-current', 'page'); else t.removeAttribute('aria-current');
  }
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${name}`;
  if (name === 'snapshots') loadSnapshots();
  if (name === 'devices') loadDevices();
  if (name === 'overview') refresh();
  if (name === 'backup') checkResume();
}

// ---- backup
let chosen = []; // [{file, path}]

function setChosen(list, label) {
  chosen = list;
  chosenLabel = label;
  const bytes = list.reduce((a, f) => a + f.file.size, 0);
  $('#selection').textContent = list.length
    ? `${label}: ${plural(list.length, 'file', 'files')}, ${iec(bytes)}`
    : 'Nothing chosen yet.';
  $('#start').disabled = !list.length;
}
let chosenLabel = '';

function fromInput(input) {
  const files = [...input.files];
  const list = files.map((f) => ({ file: f, path: f.webkitRelativePath || f.name }));
  const top = files[0] && files[0].webkitRelativePath ? files[0].webkitRelativePath.split('/')[0] : '';
  return { list, label: top || (files.length === 1 ? files[0].name : `${files.length} files`) };
}

async function readEntries(dirEntry) {
  const reader = dirEntry.createReader();
  const all = [];
  for (;;) {
    // eslint-disable-next-line no-await-in-loop
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) return all;
    all.push(...batch);
  }
}

async function walkEntry(entry, prefix, out) {
  if (entry.isFile) {
    const file = await new Promise((ok, bad) => entry.file(ok, bad));
    out.push({ file, path: prefix + entry.name });
  } else if (entry.isDirectory) {
    for (const kid of await readEntries(entry)) {
      // eslint-disable-next-line no-await-in-loop
      await walkEntry(kid, `${prefix}${entry.name}/`, out);
    }
  }
}

async function fromDrop(dt) {
  const out = [];
  const entries = [...dt.items].map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null)).filter(Boolean);
  if (entries.length) {
    for (const e of entries) await walkEntry(e, '', out); // eslint-disable-line no-await-in-loop
  } else {
    for (const f of dt.files) out.push({ file: f, path: f.name });
  }
  const label = entries.length === 1 ? entries[0].name : `${out.length} files`;
  return { list: out, label };
}

const PARALLEL = 3;

function putFile(backupId, index, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('PUT', `/api/backups/${backupId}/files/${index}`);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { error: 'The connection to the bridge was lost.', code: 'network' }));
    xhr.send(file);
  });
}

// Sends the files of `backup` that are not done yet; `files[i]` is the File for
// the backup's i-th file (or null when the page does not have it).
async function sendBackup(backup, files) {
  $('#progress').hidden = false;
  $('#progress-bar').value = 0;
  const rows = $('#progress-files');
  rows.replaceChildren();
  const total = backup.bytes_total;
  let doneBytes = backup.files.filter((f) => f.done).reduce((a, f) => a + f.size, 0);
  const inFlight = new Map();
  const started = performance.now();
  const startBytes = doneBytes;
  const update = () => {
    const now = doneBytes + [...inFlight.values()].reduce((a, b) => a + b, 0);
    $('#progress-bar').value = total ? now / total : 1;
    const secs = (performance.now() - started) / 1000;
    const rate = secs > 0.5 ? (now - startBytes) / secs : 0;
    const eta = rate > 0 ? (total - now) / rate : null;
    $('#progress-text').textContent = `${iec(now)} of ${iec(total)}` + (rate ? ` · ${iec(rate)}/s · about ${duration(eta)} left` : '');
  };
  const todo = [];
  backup.files.forEach((f, i) => { if (!f.done) todo.push(i); });
  const missing = todo.filter((i) => !files[i]);
  if (missing.length) {
    throw new ApiError(400, { error: `${plural(missing.length, 'file is', 'files are')} not in what you chose (e.g. ${backup.files[missing[0]].path}): choose the same folder as before.`, code: 'missing_files' });
  }
  let next = 0;
  let failure = null;
  const worker = async () => {
    while (next < todo.length && !failure) {
      const i = todo[next]; next += 1;
      const f = backup.files[i];
      const bar = el('progress', { max: f.size || 1, value: 0 });
      const li = el('li', { class: 'file-row' }, el('span', { class: 'file-name', title: f.path, text: f.path.split('/').pop() }), bar, el('span', { class: 'file-meta', text: iec(f.size) }));
      rows.prepend(li);
      if (rows.children.length > 200) rows.lastChild.remove();
      try {
        // A file the page was sending when it was reloaded may still be finishing on
        // the bridge (busy: wait for it) or may have finished (already done).
        for (let attempt = 0; ; attempt += 1) {
          try {
            // eslint-disable-next-line no-await-in-loop
            await putFile(backup.id, i, files[i], (n) => { bar.value = n; inFlight.set(i, n); update(); });
            break;
          } catch (e) {
            if (e.code === 'already_done') break;
            if (e.code === 'network') {
              // The bridge may have refused before reading the body (the file was
              // finished meanwhile): ask it.
              // eslint-disable-next-line no-await-in-loop
              const now = await api('GET', `/api/backups/${backup.id}`).catch(() => null);
              if (now && now.backup.files[i].done) break;
            }
            if (e.code !== 'busy' || attempt >= 60) throw e;
            inFlight.delete(i);
            // eslint-disable-next-line no-await-in-loop
            await new Promise((ok) => { setTimeout(ok, 1000); });
          }
        }
        inFlight.delete(i);
        doneBytes += f.size;
        bar.value = f.size || 1;
        li.classList.add('done');
        update();
      } catch (e) {
        inFlight.delete(i);
        failure = e;
      }
    }
  };
  await Promise.all(Array.from({ length: PARALLEL }, worker));
  if (failure) throw failure;
  $('#progress-text').textContent = 'Saving the snapshot…';
  const r = await api('POST', `/api/backups/${backup.id}/commit`);
  localStorage.removeItem('cyberbackup.backup');
  $('#progress-bar').value = 1;
  $('#progress-text').textContent = `Snapshot ${r.backup.snapshot.slice(0, 8)} saved: ${plural(backup.files_total, 'file', 'files')}, ${iec(total)}.`;
  return r.backup;
}

async function startBackup() {
  clearNotice();
  $('#start').disabled = true;
  $('#progress-files').replaceChildren();
  $('#progress-text').textContent = 'Announcing the files…';
  $('#progress-bar').value = 0;
  try {
    const body = {
      label: chosenLabel,
      tag: $('#tag').value.trim(),
      files: chosen.map((c) => ({ path: c.path, size: c.file.size, mtime_ms: c.file.lastModified })),
    };
    const r = await api('POST', '/api/backups', body);
    const backup = r.backup;
    localStorage.setItem('cyberbackup.backup', backup.id);
    const byPath = new Map(chosen.map((c) => [c.path.replace(/^\/+|\/+$/g, ''), c.file]));
    await sendBackup(backup, backup.files.map((f) => byPath.get(f.path) || null));
    setChosen([], '');
    refresh();
  } catch (e) {
    notify(e);
    $('#start').disabled = !chosen.length;
    checkResume();
  }
}

let resumable = null;
async function checkResume() {
  try {
    const r = await api('GET', '/api/backups');
    resumable = r.backups.find((b) => b.state === 'open' || b.state === 'failed') || null;
  } catch { resumable = null; }
  $('#resume').hidden = !resumable;
  if (resumable) {
    $('#resume-text').textContent = `A backup of “${resumable.label || 'files'}” stopped at ${resumable.files_done} of ${plural(resumable.files_total, 'file', 'files')} (${iec(resumable.bytes_done)} of ${iec(resumable.bytes_total)}). What is already stored is not sent again.`;
  }
}

async function resumeWith(input) {
  if (!resumable) return;
  clearNotice();
  try {
    const r = await api('GET', `/api/backups/${resumable.id}`);
    const { list } = fromInput(input);
    const byKey = new Map(list.map((c) => [`${c.path.replace(/^\/+|\/+$/g, '')}\u0000${c.file.size}`, c.file]));
    const files = r.backup.files.map((f) => byKey.get(`${f.path}\u0000${f.size}`) || null);
    $('#resume').hidden = true;
    await sendBackup(r.backup, files);
    refresh();
  } catch (e) {
    notify(e);
    checkResume();
  }
  input.value = '';
}

// ---- snapshots
let snaps = [];
const selected = new Set();

async function loadSnapshots() {
  try {
    snaps = (await api('GET', '/api/snapshots')).snapshots;
  } catch (e) { notify(e); return; }
  const tb = $('#snapshots tbody');
  tb.replaceChildren();
  selected.clear();
  $('#compare').disabled = true;
  if (!snaps.length) tb.append(el('tr', {}, el('td', { colspan: 7, class: 'empty', text: 'No snapshots yet.' })));
  for (const s of snaps) {
    const box = el('input', { type: 'checkbox', 'aria-label': `Select the snapshot of ${when(s.time_ms)}` });
    box.addEventListener('change', () => {
      if (box.checked) selected.add(s.id); else selected.delete(s.id);
      $('#compare').disabled = selected.size !== 2;
    });
    const open = el('button', { type: 'button', class: 'linkish', text: when(s.time_ms), onclick: () => browse(s, '') });
    tb.append(el('tr', { 'data-id': s.id }, el('td', {}, box), el('td', {}, open), el('td', { text: s.host }),
      el('td', { text: s.tags.join(', ') }), el('td', { text: s.files }), el('td', { text: iec(s.size) }),
      el('td', {}, el('code', { text: s.short }))));
  }
}

async function compare() {
  const [x, y] = snaps.filter((s) => selected.has(s.id)).sort((a, b) => a.time_ms - b.time_ms);
  try {
    const d = await api('GET', `/api/diff?a=${x.id}&b=${y.id}`);
    $('#browser').hidden = true;
    $('#diff').hidden = false;
    $('#diff-title').textContent = `From ${when(x.time_ms)} to ${when(y.time_ms)}`;
    const count = (k) => d.changes.filter((c) => c.kind === k).length;
    $('#diff-summary').textContent = `${count('added')} added, ${count('removed')} removed, ${count('modified')} changed, ${count('metadata')} with new times or permissions only.`;
    const rows = $('#diff-rows');
    rows.replaceChildren();
    const label = { added: 'Added', removed: 'Removed', modified: 'Changed', metadata: 'Times or permissions' };
    for (const c of d.changes) {
      const size = c.kind === 'added' ? iec(c.after) : c.kind === 'removed' ? iec(c.before) : (c.before !== c.after ? `${iec(c.before)} → ${iec(c.after)}` : iec(c.after));
      rows.append(el('tr', { class: `change-${c.kind}` }, el('td', { text: label[c.kind] }), el('td', { text: c.path }), el('td', { text: size })));
    }
    if (!d.changes.length) rows.append(el('tr', {}, el('td', { colspan: 3, class: 'empty', text: 'Nothing changed.' })));
  } catch (e) { notify(e); }
}

let browsing = null;
async function browse(snap, path) {
  clearNotice();
  try {
    const t = await api('GET', `/api/snapshots/${snap.id}/tree?path=${encodeURIComponent(path)}`);
    browsing = { snap, path };
    $('#diff').hidden = true;
    $('#browser').hidden = false;
    $('#browser-title').textContent = `Snapshot of ${when(snap.time_ms)} (${snap.short})`;
    const crumbs = $('#crumbs');
    crumbs.replaceChildren(el('button', { type: 'button', class: 'linkish', text: 'top', onclick: () => browse(snap, '') }));
    let acc = '';
    for (const part of path.split('/').filter(Boolean)) {
      acc = acc ? `${acc}/${part}` : part;
      const to = acc;
      crumbs.append(' / ', el('button', { type: 'button', class: 'linkish', text: part, onclick: () => browse(snap, to) }));
    }
    $('#archive-link').href = `/api/snapshots/${snap.id}/archive?path=${encodeURIComponent(path)}`;
    const rows = $('#entries');
    rows.replaceChildren();
    const sorted = [...t.entries].sort((a, b) => (a.type === 'dir') !== (b.type === 'dir') ? (a.type === 'dir' ? -1 : 1) : a.name.localeCompare(b.name));
    for (const e of sorted) {
      let name;
      let action = '';
      if (e.type === 'dir') {
        name = el('button', { type: 'button', class: 'linkish', text: `${e.name}/`, onclick: () => browse(snap, e.path) });
        action = el('a', { class: 'btn btn-ghost btn-small', href: `/api/snapshots/${snap.id}/archive?path=${encodeURIComponent(e.path)}`, text: 'Download .tar' });
      } else if (e.type === 'file') {
        name = el('span', { text: e.name });
        action = el('a', { class: 'btn btn-ghost btn-small', href: `/api/snapshots/${snap.id}/file?path=${encodeURIComponent(e.path)}`, download: e.name, text: 'Download' });
      } else {
        name = el('span', { text: `${e.name} → ${e.target}` });
      }
      rows.append(el('tr', {}, el('td', {}, name), el('td', { text: e.type === 'file' ? iec(e.size) : '' }), el('td', { text: when(e.mtime_ms) }), el('td', {}, action)));
    }
    if (!sorted.length) rows.append(el('tr', {}, el('td', { colspan: 4, class: 'empty', text: 'This folder is empty.' })));
  } catch (e) { notify(e); }
}

async function restoreHere() {
  if (!browsing) return;
  clearNotice();
  $('#restore-result').textContent = 'Restoring…';
  try {
    const r = await api('POST', `/api/snapshots/${browsing.snap.id}/restore`, {
      path: browsing.path, target: $('#restore-target').value.trim(), overwrite: $('#restore-overwrite').checked,
    });
    $('#restore-result').textContent = `Restored ${plural(r.files, 'file', 'files')} (${iec(r.bytes)}) to ${r.target}${r.already_restored ? `; ${r.already_restored} were already there` : ''}.`;
  } catch (e) { $('#restore-result').textContent = ''; notify(e); }
}

// ---- forget
let lastPolicy = null;
function policy(dryRun) {
  const n = (id) => Number($(id).value) || 0;
  return {
    keep_last: n('#keep-last'), keep_daily: n('#keep-daily'), keep_weekly: n('#keep-weekly'),
    keep_monthly: n('#keep-monthly'), keep_yearly: n('#keep-yearly'),
    keep_within: $('#keep-within').value.trim() || null, dry_run: dryRun,
  };
}

function showPlan(r) {
  const rows = $('#forget-rows');
  rows.replaceChildren();
  for (const p of r.plan) {
    rows.append(el('tr', { class: p.keep ? 'keep' : 'forget' }, el('td', { text: p.keep ? 'Keep' : 'Forget' }),
      el('td', { text: when(p.time_ms) }), el('td', { text: p.host }), el('td', { text: p.tags.join(', ') }),
      el('td', { text: p.reasons.join(', ') })));
  }
  const gone = r.plan.filter((p) => !p.keep).length;
  $('#forget-plan').hidden = false;
  if (r.dry_run) {
    $('#forget-summary').textContent = `${plural(gone, 'snapshot', 'snapshots')} of ${r.plan.length} would be forgotten.`;
    $('#forget-apply').hidden = gone === 0;
    $('#forget-apply').textContent = `Forget ${plural(gone, 'snapshot', 'snapshots')}`;
  } else {
    $('#forget-summary').textContent = `Forgot ${plural(r.forgotten, 'snapshot', 'snapshots')}.`;
    $('#forget-apply').hidden = true;
  }
}

async function previewForget() {
  clearNotice();
  try {
    lastPolicy = policy(true);
    showPlan(await api('POST', '/api/forget', lastPolicy));
  } catch (e) { notify(e); }
}

async function applyForget() {
  if (!lastPolicy) return;
  try {
    showPlan(await api('POST', '/api/forget', { ...lastPolicy, dry_run: false }));
    lastPolicy = null;
  } catch (e) { notify(e); }
}

// ---- devices
async function loadDevices() {
  let r;
  try { r = await api('GET', '/api/devices'); } catch (e) { notify(e); return; }
  const rows = $('#devices');
  rows.replaceChildren();
  for (const d of r.devices) {
    const revoke = d.this || d.revoked_ms ? '' : el('button', {
      type: 'button', class: 'btn btn-danger btn-small', text: 'Revoke',
      onclick: async () => {
        try { await api('POST', `/api/devices/${d.id}/revoke`); loadDevices(); } catch (e) { notify(e); }
      },
    });
    rows.append(el('tr', {}, el('td', { text: d.name || `device ${d.id}` }, d.this ? el('span', { class: 'badge', text: 'this one' }) : null),
      el('td', { text: d.capabilities.join(', ') }), el('td', { text: when(d.created_ms) }),
      el('td', { text: d.revoked_ms ? `revoked ${when(d.revoked_ms)}` : 'active' }), el('td', {}, revoke)));
  }
}

async function addDevice() {
  const caps = [...document.querySelectorAll('input[name=cap]:checked')].map((c) => c.value).join(',');
  try {
    const r = await api('POST', '/api/devices', { capabilities: caps, name: $('#device-name').value.trim() });
    const p = $('#device-code');
    p.replaceChildren('Enrolment code (valid until ', when(r.expires_ms), '): ', el('code', { text: r.code }));
    p.hidden = false;
  } catch (e) { notify(e); }
}

// ---- live updates
function connectLive() {
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${proto}://${location.host}/api/ws`);
  ws.onopen = () => { $('#live-text').textContent = 'Live'; $('#live').className = 'pill pill-ok'; };
  ws.onclose = () => {
    $('#live-text').textContent = 'Reconnecting…'; $('#live').className = 'pill pill-warn';
    setTimeout(connectLive, 2000);
  };
  ws.onmessage = (m) => {
    let v;
    try { v = JSON.parse(m.data); } catch { return; }
    if (v.type === 'backups') renderRunning(v.backups);
    if (v.type === 'backup') { running.set(v.backup.id, v.backup); renderRunning(null); }
  };
}

function on(sel, ev, f) { $(sel).addEventListener(ev, (e) => { if (ev === 'submit') e.preventDefault(); f(e); }); }

function init() {
  on('#signin-form', 'submit', async () => {
    try { await api('POST', '/api/login', { token: $('#token').value.trim() }); clearNotice(); refresh(); connectLive(); } catch (e) { notify(e); }
  });
  on('#create-form', 'submit', async () => {
    if ($('#create-pass').value !== $('#create-pass2').value) { notify(new ApiError(400, { error: 'The two passphrases differ.' })); return; }
    try {
      await api('POST', '/api/setup', { server: $('#create-server').value, account: $('#create-account').value, passphrase: $('#create-pass').value });
      clearNotice(); refresh();
    } catch (e) { notify(e); }
  });
  on('#enrol-form', 'submit', async () => {
    try {
      await api('POST', '/api/enrol', { server: $('#enrol-server').value, code: $('#enrol-code').value, passphrase: $('#enrol-pass').value });
      clearNotice(); refresh();
    } catch (e) { notify(e); }
  });
  on('#unlock-form', 'submit', async () => {
    try { await api('POST', '/api/unlock', { passphrase: $('#unlock-pass').value }); $('#unlock-pass').value = ''; clearNotice(); refresh(); } catch (e) { notify(e); }
  });
  on('#lock', 'click', async () => { try { await api('POST', '/api/lock'); refresh(); } catch (e) { notify(e); } });
  for (const t of document.querySelectorAll('.tab')) t.addEventListener('click', () => showView(t.dataset.view));
  for (const id of ['#pick-folder', '#pick-files']) {
    on(id, 'change', () => { const { list, label } = fromInput($(id)); setChosen(list, label); $(id).value = ''; });
  }
  const dz = $('#dropzone');
  dz.addEventListener('dragover', (e) => { e.preventDefault(); dz.classList.add('over'); });
  dz.addEventListener('dragleave', () => dz.classList.remove('over'));
  dz.addEventListener('drop', async (e) => {
    e.preventDefault(); dz.classList.remove('over');
    const { list, label } = await fromDrop(e.dataTransfer);
    setChosen(list, label);
  });
  on('#backup-form', 'submit', startBackup);
  on('#resume-folder', 'change', () => resumeWith($('#resume-folder')));
  on('#resume-files', 'change', () => resumeWith($('#resume-files')));
  on('#resume-discard', 'click', async () => {
    if (!resumable) return;
    try { await api('DELETE', `/api/backups/${resumable.id}`); localStorage.removeItem('cyberbackup.backup'); checkResume(); } catch (e) { notify(e); }
  });
  on('#compare', 'click', compare);
  on('#restore-form', 'submit', restoreHere);
  on('#forget-form', 'submit', previewForget);
  on('#forget-apply', 'click', applyForget);
  on('#device-form', 'submit', addDevice);
  refresh().then(() => { if (!$('#app').hidden || !$('#unlock').hidden || !$('#setup').hidden) connectLive(); });
}

document.addEventListener('DOMContentLoaded', init);
