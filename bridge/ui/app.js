// CyberBackup browser UI. Plain ES2020, no framework, no build step, nothing loaded from elsewhere.
// Talks to the bridge on the same origin: /api/config, /api/jobs, /api/ws, /api/test-connection.
'use strict';

(() => {
  // ---------------------------------------------------------------- storage & theme
  const KEYS = { server: 'cyberbackup.server', user: 'cyberbackup.user', theme: 'cyberbackup.theme' };

  function load(key) {
    try { return window.localStorage.getItem(key); } catch (_) { return null; }
  }
  function save(key, value) {
    try {
      if (value === null || value === '') window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch (_) { /* storage disabled: nothing to remember */ }
  }

  const darkQuery = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;
  const systemTheme = () => (darkQuery && darkQuery.matches ? 'dark' : 'light');
  let themeChoice = load(KEYS.theme); // 'light' | 'dark' | null (follow the system)
  if (themeChoice !== 'light' && themeChoice !== 'dark') themeChoice = null;

  function applyTheme() {
    const root = document.documentElement;
    if (themeChoice) root.setAttribute('data-theme', themeChoice);
    else root.removeAttribute('data-theme');
    const label = document.getElementById('theme-label');
    const button = document.getElementById('theme-toggle');
    if (!label || !button) return;
    const effective = themeChoice || systemTheme();
    const other = effective === 'dark' ? 'light' : 'dark';
    label.textContent = (effective === 'dark' ? 'Dark' : 'Light') + (themeChoice ? '' : ' (auto)');
    button.setAttribute('aria-label', `Colour theme: ${effective}${themeChoice ? '' : ', following the system'}. Switch to ${other} theme`);
    button.title = `Switch to ${other} theme`;
  }
  // Set the theme before the body is painted.
  applyTheme();

  // ---------------------------------------------------------------- formatting
  const nf = new Intl.NumberFormat(undefined);

  function fmtBytes(n) {
    if (n === null || n === undefined || !Number.isFinite(n)) return '—';
    if (n < 1000) return `${n} B`;
    const units = ['kB', 'MB', 'GB', 'TB'];
    let v = n;
    let i = -1;
    do { v /= 1000; i += 1; } while (v >= 1000 && i < units.length - 1);
    return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
  }
  function exactBytes(n) { return `${nf.format(n)} byte${n === 1 ? '' : 's'}`; }
  function fmtSpeed(bps) {
    if (!Number.isFinite(bps) || bps <= 0) return '— MB/s';
    const mb = bps / 1e6;
    return `${mb >= 100 ? mb.toFixed(0) : mb >= 1 ? mb.toFixed(1) : mb.toFixed(2)} MB/s`;
  }
  function fmtEta(s) {
    if (s === null || s === undefined || !Number.isFinite(s) || s < 0) return '—';
    if (s < 1) return 'under 1 s';
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) { const m = Math.floor(s / 60); return `${m} min ${Math.round(s - m * 60)} s`; }
    const h = Math.floor(s / 3600);
    return `${h} h ${Math.round((s - h * 3600) / 60)} min`;
  }
  function fmtDuration(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(ms)) return '';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    return fmtEta(ms / 1000);
  }
  function fmtTime(ms) {
    if (!ms) return '—';
    const d = new Date(ms);
    const now = new Date();
    const sameDay = d.toDateString() === now.toDateString();
    return sameDay
      ? d.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' })
      : d.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }
  function extOf(name) {
    const i = name.lastIndexOf('.');
    const ext = i > 0 && i < name.length - 1 ? name.slice(i + 1) : '';
    return ext.length && ext.length <= 4 ? ext : 'file';
  }
  const utf8Len = (s) => new TextEncoder().encode(s).length;
  // eslint-disable-next-line no-control-regex
  const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
  function sentence(s) {
    const t = String(s || '').trim();
    if (!t) return '';
    const c = t.charAt(0).toUpperCase() + t.slice(1);
    return /[.!?]$/.test(c) ? c : `${c}.`;
  }

  const PHASES = {
    waiting: 'Waiting',
    connecting: 'Connecting',
    sending: 'Sending',
    verifying: 'Verifying checksum',
    retrying: 'Resending (checksum differed)',
    reconnecting: 'Reconnecting',
    done: 'Done',
  };
  const STATUS_WORDS = {
    queued: 'Queued',
    starting: 'Starting',
    pending: 'Waiting',
    running: 'Running',
    done: 'Backed up',
    failed: 'Failed',
    cancelled: 'Cancelled',
    interrupted: 'Interrupted',
  };
  const TERMINAL = new Set(['done', 'failed', 'cancelled', 'interrupted']);
  const isTerminal = (status) => TERMINAL.has(status);

  // ---------------------------------------------------------------- errors a person understands
  let config = { default_server: '127.0.0.1:1256', max_upload_bytes: 4294967279 };

  const ERROR_CODES = [
    [['unreachable', 'server_unreachable', 'connect_failed', 'connection_refused', 'cannot_connect'],
      (c) => `The backup server${c.server ? ` at ${c.server}` : ''} could not be reached. Check the address and that the server is running.`],
    [['bad_address', 'bad_server', 'invalid_server', 'invalid_address', 'bad_server_address'],
      (c) => `${c.server ? `“${c.server}” is not` : 'That is not'} a valid server address. Write it as host:port, for example ${config.default_server}.`],
    [['bad_name', 'invalid_name', 'bad_file_name', 'invalid_file_name', 'name_not_allowed', 'bad_filename'],
      (c) => `The file name${c.file ? ` “${c.file}”` : ''} is not allowed. Names can be up to 250 bytes long, without slashes or control characters, and cannot be “.” or “..”.`],
    [['bad_user', 'invalid_user', 'bad_user_name', 'invalid_user_name', 'user_required', 'missing_user'],
      () => 'That user name is not allowed. Use 1 to 100 characters, without control characters.'],
    [['too_large', 'file_too_large', 'payload_too_large', 'bad_size', 'size_too_large', 'invalid_size'],
      (c) => `${c.file ? `“${c.file}”` : 'The file'} is too large to back up. The limit is ${fmtBytes(config.max_upload_bytes)} per file.`],
    [['name_taken', 'user_taken', 'user_name_taken'],
      (c) => `The user name${c.user ? ` “${c.user}”` : ''} is already registered on this server by someone else. Choose a different user name.`],
    [['rejected', 'identity_rejected'],
      (c) => `The backup server did not recognise the identity of${c.user ? ` “${c.user}”` : ' this user'}.`],
    [['connection_lost', 'disconnected'],
      () => 'The connection to the backup server was lost during the transfer.'],
    [['timeout', 'timed_out'],
      () => 'The backup server stopped answering (timed out).'],
    [['server_error', 'server_failed', 'storage_error'],
      () => 'The backup server reported an error and could not store the file (it may be out of disk space).'],
    [['not_cyberbackup', 'protocol', 'protocol_error', 'bad_protocol'],
      () => 'The server at that address does not speak the CyberBackup protocol.'],
    [['checksum_failed', 'checksum_mismatch', 'crc_failed'],
      () => 'The file kept arriving damaged (checksum mismatch), so the upload was stopped. Try again.'],
    [['cancelled', 'canceled'],
      () => 'The backup was cancelled.'],
    [['interrupted'],
      () => 'The backup was interrupted (the bridge was restarted). Start it again.'],
    [['incomplete_body', 'size_mismatch', 'length_mismatch', 'bad_length', 'incomplete', 'short_body', 'upload_incomplete'],
      () => 'The bridge did not receive the whole file. It may have changed while it was being read; try again.'],
    [['no_job', 'not_found', 'job_not_found', 'unknown_job'],
      () => 'This backup job no longer exists on the bridge.'],
    [['finished', 'job_finished'],
      () => 'This backup had already finished.'],
    [['not_pending', 'conflict', 'already_started', 'bad_state'],
      () => 'This backup job has already been started.'],
    [['busy', 'too_many_jobs', 'too_many_requests', 'overloaded'],
      () => 'The bridge is busy with other backups. Try again in a moment.'],
    [['bad_identity', 'identity'],
      (c) => `The saved identity of${c.user ? ` “${c.user}”` : ' this user'} on the bridge is damaged or belongs to another user.`],
    [['length_required'],
      () => 'The browser did not tell the bridge how large the file is. Try again, or use another browser.'],
    [['internal', 'store'],
      (c, m) => `The bridge had an internal problem${m ? `: ${m.replace(/[.\s]+$/, '')}` : ''}. Try again.`],
    [['unresolvable'],
      (c) => `The server name${c.server ? ` in “${c.server}”` : ''} could not be found. Check the spelling.`],
    [['network'],
      () => 'Cannot reach the CyberBackup bridge (the program serving this page). Check that it is still running.'],
  ];
  const CODE_MAP = new Map();
  for (const [codes, fn] of ERROR_CODES) for (const code of codes) CODE_MAP.set(code, fn);

  // Job errors come as messages only: recognise the common ones.
  const MESSAGE_PATTERNS = [
    [/already registered|name (is )?taken/i, 'name_taken'],
    [/cannot resolve/i, 'unresolvable'],
    [/did not answer like|does not speak|not a cyberbackup/i, 'protocol'],
    [/cannot reach|could not connect|connection refused|unreachable|no route to host|failed to lookup|name or service not known/i, 'unreachable'],
    [/not a valid host:port|not a backup server address|invalid (server )?address/i, 'bad_address'],
    [/rejected the identity/i, 'rejected'],
    [/connection .*lost|connection reset|broken pipe|closed the connection/i, 'connection_lost'],
    [/did not answer within|timed out|timeout/i, 'timeout'],
    [/\b1607\b/, 'server_error'],
    [/protocol violation/i, 'protocol'],
    [/checksum mismatch|checksum differed/i, 'checksum_failed'],
    [/interrupted|bridge restart/i, 'interrupted'],
    [/^cancel+ed\.?$/i, 'cancelled'],
    [/user name/i, 'bad_user'],
    [/(file )?name .*(not allowed|control character|path|special name|over the limit|empty|invalid)/i, 'bad_name'],
    [/too large|too big|exceeds|over the limit/i, 'too_large'],
  ];

  /** A plain sentence for an error: {code, message} from the bridge, plus what it was about. */
  function humanize(err, ctx = {}) {
    const code = String((err && err.code) || '').toLowerCase();
    const message = String((err && (err.error || err.message)) || '');
    if (code && CODE_MAP.has(code)) return CODE_MAP.get(code)(ctx, message);
    for (const [re, mapped] of MESSAGE_PATTERNS) {
      if (re.test(message)) return CODE_MAP.get(mapped)(ctx, message);
    }
    if (err && err.status === 413) return CODE_MAP.get('too_large')(ctx, message);
    if (err && err.status >= 500 && !message) return 'The bridge had an internal error. Try again.';
    return sentence(message) || 'Something went wrong.';
  }

  // ---------------------------------------------------------------- HTTP
  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error) || `HTTP ${status}`);
      this.status = status;
      this.code = body && body.code;
      this.error = (body && body.error) || '';
      this.job = body && body.job;
    }
  }

  async function api(method, path, body, options = {}) {
    const init = { method, headers: { Accept: 'application/json' }, signal: options.signal };
    if (body !== undefined) {
      if (body instanceof Blob) {
        init.body = body;
        init.headers['Content-Type'] = 'application/octet-stream';
      } else {
        init.body = JSON.stringify(body);
        init.headers['Content-Type'] = 'application/json';
      }
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      const err = new ApiError(0, { error: 'network error', code: 'network' });
      err.cause = e;
      throw err;
    }
    let data = null;
    const text = await res.text().catch(() => '');
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = { error: text.slice(0, 300) }; }
    }
    if (!res.ok) throw new ApiError(res.status, data || {});
    return data || {};
  }

  // ---------------------------------------------------------------- state
  const MAX_PARALLEL = 2;
  const jobs = new Map(); // id -> Job, as the bridge last told us
  const selection = []; // {key, file, problem}
  const uploads = new Map(); // local key -> upload entry (files started from this page)
  const uploadByJob = new Map(); // job id -> local key
  const queue = []; // local keys waiting for a slot
  let running = 0;
  let nextKey = 1;
  let historyDirty = true;
  let wsLive = false;

  const $ = (id) => document.getElementById(id);
  let el = {};

  function el_(tag, className, text) {
    const n = document.createElement(tag);
    if (className) n.className = className;
    if (text !== undefined && text !== null) n.textContent = text;
    return n;
  }

  /** Merges a job from any source, never letting a stale update undo a finished one. */
  function applyJob(job) {
    if (!job || job.id === undefined || job.id === null) return;
    job.id = String(job.id);
    const prev = jobs.get(job.id);
    if (prev && isTerminal(prev.status) && !isTerminal(job.status)) return;
    if (!prev || isTerminal(job.status) !== isTerminal(prev.status) || isTerminal(job.status)) historyDirty = true;
    jobs.set(job.id, job);
    const key = uploadByJob.get(job.id);
    if (key !== undefined && isTerminal(job.status)) {
      const up = uploads.get(key);
      if (up && up.state === 'uploading') maybeAnnounceFinish(up, job);
    }
    scheduleRender();
  }

  // ---------------------------------------------------------------- announcements
  function announce(text, kind = 'info') {
    const box = el.status;
    const p = el_('p', `status-msg ${kind}`, text);
    for (const old of box.children) old.classList.add('old');
    box.appendChild(p);
    while (box.children.length > 4) box.removeChild(box.firstElementChild);
  }

  function maybeAnnounceFinish(up, job) {
    if (up.announced) return;
    up.announced = true;
    const name = up.file.name;
    if (job.status === 'done') {
      announce(`“${name}” is backed up${job.cksum !== null && job.cksum !== undefined ? ` (checksum ${job.cksum})` : ''}.`, 'success');
    } else if (job.status === 'cancelled') {
      announce(`The backup of “${name}” was cancelled.`, 'warning');
    } else {
      const why = up.error || humanize({ error: job.error || job.status, code: job.status === 'interrupted' ? 'interrupted' : undefined }, up.ctx);
      announce(`“${name}” could not be backed up. ${why}`, 'error');
    }
    finishBatchItem(up, job.status === 'done');
  }

  function finishBatchItem(up, ok) {
    const b = up.batch;
    if (!b || up.batchCounted) return;
    up.batchCounted = true;
    if (ok) b.ok += 1; else b.bad += 1;
    if (b.ok + b.bad === b.total && b.total > 1) {
      if (b.bad === 0) announce(`All ${b.total} files are backed up.`, 'success');
      else announce(`${b.ok} of ${b.total} files backed up; ${b.bad} did not complete.`, b.ok ? 'warning' : 'error');
    }
  }

  // ---------------------------------------------------------------- form fields
  function serverValue() { return el.server.value.trim(); }
  function userValue() { return el.user.value.trim(); }

  function setFieldError(input, errorEl, message) {
    if (message) {
      errorEl.textContent = message;
      errorEl.hidden = false;
      input.setAttribute('aria-invalid', 'true');
    } else {
      errorEl.textContent = '';
      errorEl.hidden = true;
      input.removeAttribute('aria-invalid');
    }
  }

  function checkServer() {
    const s = serverValue();
    if (!s) { setFieldError(el.server, el.serverError, ''); return true; }
    const m = /^(\[[0-9a-fA-F:.]+\]|[^\s:/[\]]+):(\d{1,5})$/.exec(s);
    const port = m ? Number(m[2]) : 0;
    if (!m || port < 1 || port > 65535) {
      setFieldError(el.server, el.serverError, `Write the server as host:port, for example ${config.default_server}.`);
      return false;
    }
    setFieldError(el.server, el.serverError, '');
    return true;
  }

  function checkUser() {
    const u = userValue();
    let msg = '';
    if (!u) msg = 'Enter a user name: your backups are stored under it.';
    else if (utf8Len(u) > 100) msg = 'The user name is too long (at most 100 bytes).';
    else if (CONTROL.test(u)) msg = 'The user name cannot contain control characters.';
    setFieldError(el.user, el.userError, msg);
    return !msg;
  }

  async function testConnection(ev) {
    if (ev) ev.preventDefault();
    if (!checkServer()) { el.server.focus(); return; }
    const server = serverValue() || config.default_server;
    const button = el.testButton;
    button.disabled = true;
    button.classList.add('busy');
    el.connResult.className = 'connection-result busy';
    el.connResult.textContent = `Testing ${server}…`;
    try {
      const r = await api('POST', '/api/test-connection', { server });
      if (r.ok) {
        setFieldError(el.server, el.serverError, '');
        const ms = Number(r.latency_ms);
        el.connResult.className = 'connection-result ok';
        el.connResult.textContent = `Connected: ${r.server || server} is a CyberBackup server${Number.isFinite(ms) ? ` and answered in ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms` : ''}.`;
      } else {
        el.connResult.className = 'connection-result bad';
        el.connResult.textContent = `Not connected. ${humanize({ error: r.error || 'cannot reach the server' }, { server: r.server || server })}`;
      }
    } catch (e) {
      el.connResult.className = 'connection-result bad';
      el.connResult.textContent = `Not connected. ${humanize(e, { server })}`;
    } finally {
      button.disabled = false;
      button.classList.remove('busy');
    }
  }

  // ---------------------------------------------------------------- selection
  function fileProblem(file, others) {
    const name = file.name;
    if (!name || name === '.' || name === '..' || /[/\\]/.test(name) || CONTROL.test(name)) {
      return 'This file name is not allowed (no slashes, control characters, “.” or “..”).';
    }
    const len = utf8Len(name);
    if (len > 250) return `The name is too long (${len} bytes; at most 250).`;
    if (file.size > config.max_upload_bytes) {
      return `Too large: ${fmtBytes(file.size)}, over the limit of ${fmtBytes(config.max_upload_bytes)}.`;
    }
    if (others.some((o) => !o.problem && o.file.name === name)) {
      return 'Another file in the list has the same name; only one of them can be backed up at a time.';
    }
    return '';
  }

  function addFiles(fileList, skippedFolders = 0) {
    let added = 0;
    for (const file of fileList) {
      const dup = selection.some((s) => s.file.name === file.name && s.file.size === file.size
        && s.file.lastModified === file.lastModified);
      if (dup) continue;
      selection.push({ key: nextKey++, file, problem: fileProblem(file, selection) });
      added += 1;
    }
    renderSelection();
    if (skippedFolders) announce(`${skippedFolders === 1 ? 'A folder was' : `${skippedFolders} folders were`} left out: choose the files inside ${skippedFolders === 1 ? 'it' : 'them'} instead.`, 'warning');
    if (added) announce(`${added} file${added === 1 ? '' : 's'} added to the list.`);
  }

  function removeFromSelection(key) {
    const i = selection.findIndex((s) => s.key === key);
    if (i < 0) return;
    const [removed] = selection.splice(i, 1);
    // Re-check the others (a same-name conflict may be gone).
    for (let j = 0; j < selection.length; j += 1) {
      selection[j].problem = fileProblem(selection[j].file, selection.slice(0, j));
    }
    renderSelection();
    const buttons = el.selected.querySelectorAll('button');
    if (buttons.length) buttons[Math.min(i, buttons.length - 1)].focus();
    else el.dropzone.focus();
    announce(`“${removed.file.name}” removed from the list.`);
  }

  function renderSelection() {
    const list = el.selected;
    list.replaceChildren();
    let valid = 0;
    let total = 0;
    for (const item of selection) {
      const li = el_('li', item.problem ? 'invalid' : '');
      li.dataset.file = item.file.name;
      li.appendChild(el_('span', 'file-icon', extOf(item.file.name))).setAttribute('aria-hidden', 'true');
      const main = el_('div', 'file-main');
      const name = el_('span', 'file-name', item.file.name);
      name.title = item.file.name;
      main.appendChild(name);
      const meta = el_('span', 'file-meta', fmtBytes(item.file.size));
      meta.title = exactBytes(item.file.size);
      main.appendChild(meta);
      if (item.problem) main.appendChild(el_('span', 'file-problem', item.problem));
      li.appendChild(main);
      const rm = el_('button', 'btn btn-ghost btn-small', 'Remove');
      rm.type = 'button';
      rm.setAttribute('aria-label', `Remove ${item.file.name} from the list`);
      rm.addEventListener('click', () => removeFromSelection(item.key));
      li.appendChild(rm);
      list.appendChild(li);
      if (!item.problem) { valid += 1; total += item.file.size; }
    }
    el.selection.hidden = selection.length === 0;
    el.clearSelection.hidden = selection.length === 0;
    el.start.disabled = valid === 0;
    el.startLabel.textContent = valid > 1 ? `Back up ${valid} files` : 'Back up';
    const bad = selection.length - valid;
    el.selectedSummary.textContent = selection.length
      ? `${valid} file${valid === 1 ? '' : 's'}, ${fmtBytes(total)}${bad ? ` · ${bad} cannot be backed up` : ''}`
      : '';
  }

  // ---------------------------------------------------------------- uploads
  function startBackup() {
    const okServer = checkServer();
    const okUser = checkUser();
    if (!okUser) { el.user.focus(); announce(`Check the user name before backing up: ${el.userError.textContent}`, 'error'); return; }
    if (!okServer) { el.server.focus(); announce('Fix the server address before backing up.', 'error'); return; }
    const server = serverValue();
    const user = userValue();
    save(KEYS.server, server);
    save(KEYS.user, user);

    const valid = selection.filter((s) => !s.problem);
    const skipped = selection.filter((s) => s.problem);
    if (!valid.length) return;
    const batch = { total: valid.length, ok: 0, bad: 0 };
    for (const item of valid) {
      const key = nextKey++;
      const up = {
        key,
        file: item.file,
        server,
        user,
        state: 'queued', // queued -> starting -> uploading -> finished
        jobId: null,
        job: null,
        controller: null,
        cancelled: false,
        error: '',
        detail: '',
        batch,
        ctx: { file: item.file.name, user, server: server || config.default_server },
      };
      uploads.set(key, up);
      queue.push(key);
    }
    for (const s of skipped) {
      announce(`“${s.file.name}” was left out: ${s.problem}`, 'warning');
    }
    selection.length = 0;
    renderSelection();
    announce(valid.length === 1
      ? `Starting the backup of “${valid[0].file.name}”.`
      : `Starting the backup of ${valid.length} files (${MAX_PARALLEL} at a time).`);
    render();
    // The button just became disabled: keep keyboard focus in a sensible place.
    if (document.activeElement === el.start || document.activeElement === document.body) el.transfersTitle.focus();
    pump();
  }

  function pump() {
    while (running < MAX_PARALLEL && queue.length) {
      const key = queue.shift();
      const up = uploads.get(key);
      if (!up || up.cancelled) continue;
      running += 1;
      runUpload(up).catch((e) => {
        // Should not happen: runUpload handles its own errors.
        up.state = 'finished';
        up.error = humanize(e, up.ctx);
      }).finally(() => {
        running -= 1;
        scheduleRender();
        pump();
      });
    }
  }

  const USER_CODES = new Set(['name_taken', 'bad_user', 'rejected']);
  const SERVER_CODES = new Set(['bad_server', 'unreachable', 'not_cyberbackup']);
  /** Marks the server or user field when an error is about it (and they still hold what was used). */
  function flagField(err, up) {
    const code = err && err.code;
    if (!code) return;
    const text = humanize(err, up.ctx);
    if (USER_CODES.has(code) && userValue() === up.user) setFieldError(el.user, el.userError, text);
    if (SERVER_CODES.has(code) && serverValue() === up.server) setFieldError(el.server, el.serverError, text);
  }

  function failUpload(up, err) {
    flagField(err, up);
    up.state = 'finished';
    up.error = humanize(err, up.ctx);
    const raw = err && (err.error || err.message);
    up.detail = raw && sentence(raw) !== up.error ? raw : '';
    if (!up.announced) {
      up.announced = true;
      announce(`“${up.file.name}” could not be backed up. ${up.error}`, 'error');
      finishBatchItem(up, false);
    }
  }

  async function runUpload(up) {
    up.state = 'starting';
    scheduleRender();
    let job;
    try {
      const body = { user: up.user, name: up.file.name, size: up.file.size };
      if (up.server) body.server = up.server;
      const r = await api('POST', '/api/jobs', body);
      job = r.job;
    } catch (e) {
      failUpload(up, e);
      return;
    }
    if (!job || job.id === undefined) { failUpload(up, { error: 'the bridge answered without a job' }); return; }
    up.jobId = String(job.id);
    uploadByJob.set(up.jobId, up.key);
    up.state = 'uploading';
    applyJob(job);
    if (up.cancelled) {
      // Cancelled while the job was being created.
      await api('POST', `/api/jobs/${encodeURIComponent(up.jobId)}/cancel`).then((r) => applyJob(r.job)).catch(() => {});
      up.state = 'finished';
      maybeAnnounceFinish(up, jobs.get(up.jobId) || { status: 'cancelled' });
      return;
    }

    up.controller = new AbortController();
    let settle;
    up.putSettled = new Promise((resolve) => { settle = resolve; });
    try {
      const r = await api('PUT', `/api/jobs/${encodeURIComponent(up.jobId)}/content`, up.file, { signal: up.controller.signal });
      applyJob(r.job);
    } catch (e) {
      if (e && e.name === 'AbortError') {
        up.cancelled = true;
      } else if (e instanceof ApiError && e.job) {
        // The bridge says how it ended: keep its code for the wording.
        if (e.job.status !== 'cancelled' && e.job.status !== 'done') {
          flagField(e, up);
          up.error = humanize(e, up.ctx);
          up.detail = e.error && sentence(e.error) !== up.error ? e.error : '';
        }
        applyJob(e.job);
        if (!isTerminal(e.job.status)) { failUpload(up, e); return; }
      } else if (!(e instanceof ApiError && e.code === 'network')) {
        failUpload(up, e);
        return;
      }
      // Aborted, or the connection to the bridge broke: ask the bridge how the job ended.
      try {
        const r = await api('GET', `/api/jobs/${encodeURIComponent(up.jobId)}`);
        applyJob(r.job);
      } catch (_) { /* keep what we know */ }
      const known = jobs.get(up.jobId);
      if (!known || !isTerminal(known.status)) {
        if (up.cancelled) {
          applyJob({ ...(known || {}), id: up.jobId, status: 'cancelled', phase: (known && known.phase) || 'waiting', error: null });
        } else {
          failUpload(up, e);
          return;
        }
      }
    } finally {
      up.controller = null;
      settle();
    }
    const final = jobs.get(up.jobId);
    up.state = 'finished';
    if (final) maybeAnnounceFinish(up, final);
  }

  async function cancelUpload(up) {
    if (up.cancelled || up.state === 'finished') return;
    up.cancelled = true;
    if (up.state === 'queued') {
      const i = queue.indexOf(up.key);
      if (i >= 0) queue.splice(i, 1);
      up.state = 'finished';
      up.error = 'Cancelled before it started.';
      up.announced = true;
      announce(`The backup of “${up.file.name}” was cancelled.`, 'warning');
      finishBatchItem(up, false);
      scheduleRender();
      return;
    }
    if (!up.jobId) { scheduleRender(); return; } // runUpload cancels once the job exists
    // Ask the bridge first (so the job ends as "cancelled", not as a broken upload), then abort the request.
    try {
      const r = await withTimeout(api('POST', `/api/jobs/${encodeURIComponent(up.jobId)}/cancel`), 3000);
      if (r && r.job) applyJob(r.job);
    } catch (e) {
      if (!(e && e.name === 'TimeoutError')) announce(`Could not cancel “${up.file.name}”: ${humanize(e, up.ctx)}`, 'error');
    }
    // The bridge ends the upload and answers the PUT with the cancelled job; abort it if that takes too long.
    if (up.putSettled) await Promise.race([up.putSettled, new Promise((r) => setTimeout(r, 2500))]);
    if (up.controller) up.controller.abort();
  }

  async function cancelForeign(job) {
    try {
      const r = await api('POST', `/api/jobs/${encodeURIComponent(job.id)}/cancel`);
      applyJob(r.job);
    } catch (e) {
      announce(`Could not cancel “${job.file}”: ${humanize(e, { file: job.file })}`, 'error');
    }
  }

  function withTimeout(promise, ms) {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { const e = new Error('timeout'); e.name = 'TimeoutError'; reject(e); }, ms);
      promise.then((v) => { clearTimeout(t); resolve(v); }, (e) => { clearTimeout(t); reject(e); });
    });
  }

  // ---------------------------------------------------------------- rendering
  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    const run = () => { renderQueued = false; render(); };
    if (document.hidden) setTimeout(run, 250);
    else requestAnimationFrame(run);
  }

  function render() {
    renderTransfers();
    if (historyDirty) { historyDirty = false; renderHistory(); }
  }

  /** What the transfers panel shows: this page's uploads, plus jobs running elsewhere. */
  function transferItems() {
    const items = [];
    for (const up of uploads.values()) {
      const job = up.jobId ? jobs.get(up.jobId) : null;
      items.push({ key: `u${up.key}`, up, job, name: up.file.name, size: up.file.size });
    }
    for (const job of jobs.values()) {
      if (isTerminal(job.status) || uploadByJob.has(job.id)) continue;
      items.push({ key: `j${job.id}`, up: null, job, name: job.file, size: job.size });
    }
    return items;
  }

  const transferEls = new Map();

  function buildTransfer(item) {
    const li = el_('li', 'transfer');
    const head = el_('div', 'transfer-head');
    const icon = el_('span', 'file-icon', extOf(item.name || ''));
    icon.setAttribute('aria-hidden', 'true');
    head.appendChild(icon);
    const title = el_('div', 'transfer-title');
    const name = el_('span', 'file-name', item.name);
    name.title = item.name;
    title.appendChild(name);
    const meta = el_('span', 'file-meta');
    title.appendChild(meta);
    head.appendChild(title);
    const badge = el_('span', 'badge');
    head.appendChild(badge);
    const cancel = el_('button', 'btn btn-danger btn-small', 'Cancel');
    cancel.type = 'button';
    cancel.setAttribute('aria-label', `Cancel the backup of ${item.name}`);
    head.appendChild(cancel);
    li.appendChild(head);
    const progress = document.createElement('progress');
    progress.max = 100;
    progress.value = 0;
    progress.setAttribute('aria-label', `Backup progress of ${item.name}`);
    li.appendChild(progress);
    const stats = el_('div', 'transfer-stats');
    const pct = el_('strong', 'stat-percent');
    const amount = el_('span', 'stat-amount');
    const speed = el_('span', 'stat-speed');
    const eta = el_('span', 'stat-eta');
    stats.append(pct, amount, speed, eta);
    li.appendChild(stats);
    const error = el_('p', 'transfer-error');
    li.appendChild(error);
    const view = { li, meta, badge, cancel, progress, pct, amount, speed, eta, error, item };
    cancel.addEventListener('click', () => {
      const it = view.item;
      cancel.disabled = true;
      cancel.textContent = 'Cancelling…';
      if (it.up) cancelUpload(it.up); else if (it.job) cancelForeign(it.job);
    });
    return view;
  }

  function updateTransfer(view, item) {
    view.item = item;
    const { up, job } = item;
    let status;
    if (job) status = job.status;
    else if (up.state === 'finished') status = up.cancelled ? 'cancelled' : 'failed';
    else if (up.state === 'starting') status = 'starting';
    else status = 'queued';
    if (up && up.error && (!job || !isTerminal(job.status))) status = up.cancelled ? 'cancelled' : 'failed';

    const size = job ? job.size : item.size;
    const bytes = job && typeof job.bytes === 'number' ? job.bytes : 0;
    let percent = job && typeof job.percent === 'number' ? job.percent : (size ? (bytes / size) * 100 : 0);
    if (status === 'done') percent = 100;
    percent = Math.max(0, Math.min(100, percent));

    view.li.className = `transfer ${status}`;
    view.li.dataset.status = status;
    view.li.dataset.file = item.name;
    if (job) view.li.dataset.jobId = job.id;

    const server = (job && job.server) || (up && (up.server || config.default_server)) || '';
    const who = (job && job.user) || (up && up.user) || '';
    view.meta.textContent = `${fmtBytes(size)} · ${who ? `${who} @ ` : ''}${server}${up ? '' : ' · started elsewhere'}`;

    let badge = STATUS_WORDS[status] || status;
    if (status === 'running' && job && job.phase) badge = PHASES[job.phase] || job.phase;
    if (status === 'pending' && job && job.phase && job.phase !== 'waiting') badge = PHASES[job.phase] || job.phase;
    view.badge.className = `badge ${status}`;
    view.badge.textContent = badge;

    const active = !isTerminal(status);
    view.cancel.hidden = !active;
    if (active && !(up && up.cancelled)) {
      view.cancel.disabled = false;
      view.cancel.textContent = 'Cancel';
    }

    view.progress.value = percent;
    view.progress.setAttribute('aria-valuetext', `${percent.toFixed(0)} percent, ${badge}`);

    view.pct.parentElement.hidden = !active && status !== 'done' && bytes === 0;
    view.pct.textContent = `${percent.toFixed(1)}%`;
    view.amount.textContent = `${fmtBytes(bytes)} of ${fmtBytes(size)}`;
    if (status === 'done') {
      view.amount.textContent = fmtBytes(size);
      view.speed.textContent = job && job.cksum !== null && job.cksum !== undefined ? `Checksum ${job.cksum}` : '';
      view.eta.textContent = job && job.duration_ms ? `Took ${fmtDuration(job.duration_ms)}` : '';
    } else if (active) {
      view.speed.textContent = `Speed ${fmtSpeed(job ? job.bytes_per_sec : 0)}`;
      view.eta.textContent = `Time left ${fmtEta(job ? job.eta_seconds : null)}`;
    } else {
      view.speed.textContent = '';
      view.eta.textContent = '';
    }

    let errText = '';
    let errTitle = '';
    if (up && up.error) { errText = up.error; errTitle = up.detail; }
    else if (job && (status === 'failed' || status === 'interrupted')) {
      errText = humanize({ error: job.error || status, code: status === 'interrupted' ? 'interrupted' : undefined }, up ? up.ctx : { file: item.name, user: job.user, server: job.server });
      errTitle = job.error || '';
    }
    view.error.textContent = errText;
    view.error.title = errTitle && errTitle !== errText ? errTitle : '';
  }

  function renderTransfers() {
    const items = transferItems();
    const seen = new Set();
    for (const item of items) {
      seen.add(item.key);
      let view = transferEls.get(item.key);
      if (!view) {
        view = buildTransfer(item);
        transferEls.set(item.key, view);
        el.transfers.appendChild(view.li);
      }
      updateTransfer(view, item);
    }
    for (const [key, view] of transferEls) {
      if (!seen.has(key)) { view.li.remove(); transferEls.delete(key); }
    }
    el.transfersCard.hidden = items.length === 0;
    el.clearFinished.hidden = ![...uploads.values()].some((u) => u.state === 'finished');
  }

  function resultOf(job) {
    const span = el_('span', `result ${job.status}`);
    const word = STATUS_WORDS[job.status] || job.status;
    const box = el_('span');
    box.appendChild(document.createTextNode(word));
    if (job.status === 'done') {
      if (job.duration_ms) box.appendChild(el_('span', 'result-detail', `in ${fmtDuration(job.duration_ms)}`));
    } else if (job.status === 'failed' || job.status === 'interrupted') {
      const key = uploadByJob.get(job.id);
      const up = key !== undefined ? uploads.get(key) : null;
      const text = up && up.error ? up.error : humanize({ error: job.error || job.status, code: job.status === 'interrupted' ? 'interrupted' : undefined },
        up ? up.ctx : { file: job.file, user: job.user, server: job.server });
      const detail = el_('span', 'result-detail', text);
      if (job.error && job.error !== text) detail.title = job.error;
      box.appendChild(detail);
    } else if (job.status === 'cancelled' && job.bytes) {
      box.appendChild(el_('span', 'result-detail', `after ${fmtBytes(job.bytes)}`));
    }
    span.appendChild(box);
    return span;
  }

  function renderHistory() {
    const finished = [...jobs.values()].filter((j) => isTerminal(j.status));
    finished.sort((a, b) => (b.finished_at || b.created_at || 0) - (a.finished_at || a.created_at || 0));
    const frag = document.createDocumentFragment();
    for (const job of finished) {
      const tr = document.createElement('tr');
      tr.dataset.status = job.status;
      tr.dataset.file = job.file;
      tr.dataset.jobId = job.id;
      if (job.cksum !== null && job.cksum !== undefined) tr.dataset.cksum = String(job.cksum);

      const tdFile = el_('td', 'cell-file');
      tdFile.dataset.label = 'File';
      tdFile.dataset.col = 'file';
      const fileBox = el_('div');
      fileBox.appendChild(el_('span', '', job.file));
      if (job.user || job.server) fileBox.appendChild(el_('span', 'file-meta result-detail', `${job.user || ''}${job.user && job.server ? ' @ ' : ''}${job.server || ''}`));
      tdFile.appendChild(fileBox);
      tr.appendChild(tdFile);

      const tdSize = el_('td', 'num', fmtBytes(job.size));
      tdSize.dataset.label = 'Size';
      tdSize.dataset.col = 'size';
      if (typeof job.size === 'number') tdSize.title = exactBytes(job.size);
      tr.appendChild(tdSize);

      const hasCk = job.cksum !== null && job.cksum !== undefined;
      const tdCk = el_('td', 'cell-cksum', hasCk ? String(job.cksum) : '—');
      tdCk.dataset.label = 'Checksum';
      tdCk.dataset.col = 'cksum';
      if (hasCk) tdCk.title = 'POSIX cksum of the file, verified by the server';
      tr.appendChild(tdCk);

      const tdTime = el_('td', 'cell-time');
      tdTime.dataset.label = 'Time';
      tdTime.dataset.col = 'time';
      const when = job.finished_at || job.created_at;
      if (when) {
        const t = el_('time', '', fmtTime(when));
        t.dateTime = new Date(when).toISOString();
        t.title = new Date(when).toLocaleString();
        tdTime.appendChild(t);
      } else tdTime.textContent = '—';
      tr.appendChild(tdTime);

      const tdRes = el_('td', 'cell-result');
      tdRes.dataset.label = 'Result';
      tdRes.dataset.col = 'result';
      tdRes.appendChild(resultOf(job));
      tr.appendChild(tdRes);
      frag.appendChild(tr);
    }
    el.historyBody.replaceChildren(frag);
    el.historyEmpty.hidden = finished.length > 0;
  }

  // ---------------------------------------------------------------- live updates
  let ws = null;
  let wsAttempt = 0;
  let wsTimer = null;

  function setLive(state) {
    const pill = el.live;
    if (state === 'live') {
      pill.className = 'pill pill-ok';
      el.liveText.textContent = 'Live';
      pill.title = 'Receiving live updates from the bridge';
    } else if (state === 'reconnecting') {
      pill.className = 'pill pill-warn';
      el.liveText.textContent = 'Reconnecting…';
      pill.title = 'The live connection to the bridge dropped; reconnecting';
    } else {
      pill.className = 'pill pill-muted';
      el.liveText.textContent = 'Connecting…';
      pill.title = 'Connecting to the bridge';
    }
  }

  function connectWs() {
    clearTimeout(wsTimer);
    const url = `${window.location.protocol === 'https:' ? 'wss:' : 'ws:'}//${window.location.host}/api/ws`;
    try {
      ws = new WebSocket(url);
    } catch (_) {
      scheduleReconnect();
      return;
    }
    ws.addEventListener('open', () => {
      wsAttempt = 0;
      wsLive = true;
      setLive('live');
    });
    ws.addEventListener('message', (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      if (!msg || typeof msg !== 'object') return;
      if (msg.type === 'snapshot' && Array.isArray(msg.jobs)) {
        for (const job of msg.jobs) applyJob(job);
        historyDirty = true;
        scheduleRender();
      } else if (msg.type === 'job' && msg.job) {
        applyJob(msg.job);
      }
    });
    ws.addEventListener('close', () => {
      ws = null;
      wsLive = false;
      scheduleReconnect();
    });
    ws.addEventListener('error', () => { /* a close event follows */ });
  }

  function scheduleReconnect() {
    setLive('reconnecting');
    wsAttempt += 1;
    const base = Math.min(10000, 500 * 2 ** Math.min(wsAttempt - 1, 5));
    const delay = base / 2 + Math.random() * base / 2;
    clearTimeout(wsTimer);
    wsTimer = setTimeout(connectWs, delay);
  }

  // Without live updates, poll while something is running so progress still moves.
  function pollLoop() {
    const busy = [...uploads.values()].some((u) => u.state === 'uploading' || u.state === 'starting')
      || [...jobs.values()].some((j) => !isTerminal(j.status));
    if (!wsLive && busy) refreshJobs(true);
    setTimeout(pollLoop, 1500);
  }

  async function refreshJobs(quiet) {
    try {
      const r = await api('GET', '/api/jobs');
      if (Array.isArray(r.jobs)) for (const job of r.jobs) applyJob(job);
      historyDirty = true;
      scheduleRender();
      return true;
    } catch (e) {
      if (!quiet) announce(`Could not load the history: ${humanize(e)}`, 'error');
      return false;
    }
  }

  // ---------------------------------------------------------------- drag and drop
  function setupDropzone() {
    const dz = el.dropzone;
    const open = () => el.files.click();
    dz.addEventListener('click', open);
    dz.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' || ev.key === ' ' || ev.key === 'Spacebar') {
        ev.preventDefault();
        open();
      }
    });
    el.files.addEventListener('change', () => {
      if (el.files.files && el.files.files.length) addFiles(Array.from(el.files.files));
      el.files.value = ''; // choosing the same file again fires change again
    });
    let depth = 0;
    dz.addEventListener('dragenter', (ev) => {
      ev.preventDefault();
      depth += 1;
      dz.classList.add('dragover');
    });
    dz.addEventListener('dragover', (ev) => {
      ev.preventDefault();
      if (ev.dataTransfer) ev.dataTransfer.dropEffect = 'copy';
    });
    dz.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1);
      if (!depth) dz.classList.remove('dragover');
    });
    dz.addEventListener('drop', (ev) => {
      ev.preventDefault();
      depth = 0;
      dz.classList.remove('dragover');
      const dt = ev.dataTransfer;
      if (!dt) return;
      const files = [];
      let folders = 0;
      if (dt.items && dt.items.length) {
        for (const item of dt.items) {
          if (item.kind !== 'file') continue;
          const entry = typeof item.webkitGetAsEntry === 'function' ? item.webkitGetAsEntry() : null;
          if (entry && entry.isDirectory) { folders += 1; continue; }
          const f = item.getAsFile();
          if (f) files.push(f);
        }
      } else {
        files.push(...Array.from(dt.files || []));
      }
      addFiles(files, folders);
    });
    // A file dropped beside the zone must not make the browser navigate away from the page.
    window.addEventListener('dragover', (ev) => { if (!dz.contains(ev.target)) ev.preventDefault(); });
    window.addEventListener('drop', (ev) => { if (!dz.contains(ev.target)) ev.preventDefault(); });
  }

  // ---------------------------------------------------------------- start-up
  async function init() {
    el = {
      server: $('server'),
      user: $('user'),
      serverError: $('server-error'),
      userError: $('user-error'),
      connForm: $('connection-form'),
      testButton: $('test-connection'),
      connResult: $('connection-result'),
      files: $('files'),
      dropzone: $('dropzone'),
      limitHint: $('limit-hint'),
      selection: $('selection'),
      selected: $('selected'),
      selectedSummary: $('selected-summary'),
      start: $('start'),
      startLabel: $('start').querySelector('span'),
      clearSelection: $('clear-selection'),
      status: $('status'),
      transfersCard: $('transfers-card'),
      transfers: $('transfers'),
      transfersTitle: $('transfers-title'),
      clearFinished: $('clear-finished'),
      historyBody: $('history-body'),
      historyEmpty: $('history-empty'),
      refresh: $('refresh'),
      live: $('live'),
      liveText: $('live-text'),
    };

    applyTheme();
    $('theme-toggle').addEventListener('click', () => {
      const effective = themeChoice || systemTheme();
      const next = effective === 'dark' ? 'light' : 'dark';
      themeChoice = next === systemTheme() ? null : next; // back to "auto" when it matches the system
      save(KEYS.theme, themeChoice);
      applyTheme();
    });
    if (darkQuery) {
      const onChange = () => applyTheme();
      if (darkQuery.addEventListener) darkQuery.addEventListener('change', onChange);
      else if (darkQuery.addListener) darkQuery.addListener(onChange);
    }

    el.server.value = load(KEYS.server) || '';
    el.user.value = load(KEYS.user) || '';
    el.server.addEventListener('input', () => { save(KEYS.server, serverValue()); if (el.server.getAttribute('aria-invalid')) checkServer(); });
    el.user.addEventListener('input', () => { save(KEYS.user, userValue()); if (el.user.getAttribute('aria-invalid')) checkUser(); });
    el.server.addEventListener('change', checkServer);
    el.connForm.addEventListener('submit', testConnection);

    setupDropzone();
    el.start.addEventListener('click', startBackup);
    el.clearSelection.addEventListener('click', () => {
      selection.length = 0;
      renderSelection();
      el.dropzone.focus();
      announce('The list of files was cleared.');
    });
    el.clearFinished.addEventListener('click', () => {
      for (const [key, up] of uploads) {
        if (up.state === 'finished') {
          uploads.delete(key);
          if (up.jobId) uploadByJob.delete(up.jobId);
        }
      }
      scheduleRender();
    });
    el.refresh.addEventListener('click', async () => {
      el.refresh.disabled = true;
      if (await refreshJobs(false)) announce('The history is up to date.');
      el.refresh.disabled = false;
    });
    window.addEventListener('beforeunload', (ev) => {
      const busy = [...uploads.values()].some((u) => u.state !== 'finished');
      if (busy) { ev.preventDefault(); ev.returnValue = ''; }
    });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) scheduleRender(); });

    renderSelection();
    render();

    // Configuration first (defaults and limits), then history and live updates.
    try {
      const c = await api('GET', '/api/config');
      if (c && typeof c.default_server === 'string' && c.default_server) config.default_server = c.default_server;
      if (c && Number.isFinite(c.max_upload_bytes)) config.max_upload_bytes = c.max_upload_bytes;
    } catch (e) {
      announce(`Could not load the settings: ${humanize(e)}`, 'error');
    }
    el.server.placeholder = config.default_server;
    $('server-hint').textContent = `host:port — leave empty to use ${config.default_server}.`;
    el.limitHint.textContent = `Up to ${fmtBytes(config.max_upload_bytes)} per file.`;
    for (let j = 0; j < selection.length; j += 1) selection[j].problem = fileProblem(selection[j].file, selection.slice(0, j));
    renderSelection();

    await refreshJobs(false);
    connectWs();
    pollLoop();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
