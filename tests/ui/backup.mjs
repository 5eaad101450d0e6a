#!/usr/bin/env node
// Drives the CyberBackup browser UI in headless Chromium (Debian's package, through
// playwright-core; no browser is downloaded): fill the server and user fields, choose
// files, press "Back up", wait until the history shows every file as backed up with a
// checksum, and keep a screenshot.
//
//   node tests/ui/backup.mjs --url http://127.0.0.1:PORT --token TOKEN --server 127.0.0.1:PORT2 \
//        --user NAME --files /path/a,/path/b --screenshot /path/out.png
//
// Prints "FILE cksum N" per file and exits 0; on failure prints why, saves
// /path/out-failure.png and exits 1. The browser is always closed.

import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { chromium } from 'playwright-core';

const TIMEOUT_MS = 60_000;
const TERMINAL = ['done', 'failed', 'cancelled', 'interrupted'];

function usage(msg) {
  if (msg) console.error(`error: ${msg}`);
  console.error('usage: node backup.mjs --url URL --server HOST:PORT --user NAME --files A[,B...] --screenshot OUT.png');
  process.exit(1);
}

function parseArgs(argv) {
  const opts = {};
  const known = new Set(['url', 'token', 'server', 'user', 'files', 'screenshot']);
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (!arg.startsWith('--')) usage(`unexpected argument ${arg}`);
    let key = arg.slice(2);
    let value;
    const eq = key.indexOf('=');
    if (eq >= 0) { value = key.slice(eq + 1); key = key.slice(0, eq); } else { value = argv[i + 1]; i += 1; }
    if (!known.has(key)) usage(`unknown option --${key}`);
    if (value === undefined) usage(`--${key} needs a value`);
    opts[key] = value;
  }
  for (const k of ['url', 'user', 'files', 'screenshot']) if (!opts[k]) usage(`--${k} is required`);
  opts.files = opts.files.split(',').map((f) => f.trim()).filter(Boolean).map((f) => path.resolve(f));
  if (!opts.files.length) usage('--files names no file');
  opts.screenshot = path.resolve(opts.screenshot);
  return opts;
}

function failurePath(shot) {
  const ext = path.extname(shot);
  return ext ? `${shot.slice(0, -ext.length)}-failure${ext}` : `${shot}-failure.png`;
}

const opts = parseArgs(process.argv.slice(2));
for (const f of opts.files) {
  if (!existsSync(f) || !statSync(f).isFile()) usage(`${f} is not a file`);
}
const names = opts.files.map((f) => path.basename(f));
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

let browser;
let page;
const pageErrors = [];
let exitCode = 0;
try {
  if (!existsSync(executablePath)) throw new Error(`${executablePath} does not exist (apt-get install chromium, or set CHROMIUM)`);
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on('pageerror', (e) => pageErrors.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`console: ${m.text()}`); });

  // The sign-in link the bridge prints: it sets the session cookie and redirects to /.
  const signIn = opts.token ? `${opts.url}/?token=${encodeURIComponent(opts.token)}` : opts.url;
  const res = await page.goto(signIn, { waitUntil: 'domcontentloaded' });
  if (!res || !res.ok()) throw new Error(`${opts.url} answered ${res ? res.status() : 'nothing'}`);
  await page.waitForSelector('#server');
  await page.fill('#server', opts.server || '');
  await page.fill('#user', opts.user);

  // Rows already in the history (e.g. the same file backed up before) do not count.
  const before = await page.$$eval('#history tbody tr', (rows) => rows.map((r) => r.dataset.jobId || ''));

  await page.setInputFiles('#files', opts.files);
  await page.waitForFunction((n) => {
    const b = document.querySelector('#start');
    return b && !b.disabled && document.querySelectorAll('#selected li').length >= n;
  }, names.length, { timeout: 10_000 }).catch(async () => {
    const problems = await page.$$eval('#selected .file-problem', (ps) => ps.map((p) => p.textContent.trim()));
    throw new Error(`the chosen files were not accepted${problems.length ? `: ${problems.join('; ')}` : ''}`);
  });
  await page.click('#start');

  // Wait until each file has a new finished row in the history, or failed before it had a job.
  const handle = await page.waitForFunction(({ wanted, old }) => {
    const outcome = {};
    for (const name of wanted) {
      const row = [...document.querySelectorAll('#history tbody tr')]
        .find((r) => r.dataset.file === name && !old.includes(r.dataset.jobId || ''));
      if (row && ['done', 'failed', 'cancelled', 'interrupted'].includes(row.dataset.status)) {
        const ck = row.querySelector('[data-col="cksum"]');
        const res = row.querySelector('[data-col="result"]');
        outcome[name] = {
          status: row.dataset.status,
          cksum: ck ? ck.textContent.trim() : '',
          result: res ? res.innerText.replace(/\s+/g, ' ').trim() : '',
        };
        continue;
      }
      // A failure before any job existed (e.g. refused by the bridge) only shows in the transfers.
      const t = [...document.querySelectorAll('#transfers li')]
        .find((li) => li.dataset.file === name && !li.dataset.jobId && ['failed', 'cancelled'].includes(li.dataset.status));
      if (t) {
        const e = t.querySelector('.transfer-error');
        outcome[name] = { status: t.dataset.status, cksum: '', result: e ? e.textContent.trim() : '' };
        continue;
      }
      return false;
    }
    return outcome;
  }, { wanted: names, old: before }, { timeout: TIMEOUT_MS, polling: 200 }).catch(async (e) => {
    const status = await page.$eval('#status', (s) => s.textContent.replace(/\s+/g, ' ').trim()).catch(() => '');
    throw new Error(`the backup did not finish within ${TIMEOUT_MS / 1000} s (${e.message.split('\n')[0]})${status ? `; status: ${status}` : ''}`);
  });
  const outcome = await handle.jsonValue();

  const problems = [];
  for (const name of names) {
    const o = outcome[name];
    if (o.status !== 'done') problems.push(`${name}: ${o.status}${o.result ? ` (${o.result})` : ''}`);
    else if (!/^\d+$/.test(o.cksum)) problems.push(`${name}: backed up but the history shows no checksum (${JSON.stringify(o.cksum)})`);
  }
  if (problems.length) throw new Error(`not every file was backed up: ${problems.join('; ')}`);

  await page.screenshot({ path: opts.screenshot, fullPage: true });
  for (const name of names) console.log(`${name} cksum ${outcome[name].cksum}`);
} catch (e) {
  exitCode = 1;
  // Playwright appends a call log to its messages: the first line says what failed.
  console.error(`FAILED: ${e && e.message ? e.message.split('\n')[0] : e}`);
  for (const line of pageErrors) console.error(line);
  if (page) {
    const shot = failurePath(opts.screenshot);
    try {
      await page.screenshot({ path: shot, fullPage: true });
      console.error(`screenshot: ${shot}`);
    } catch (se) {
      console.error(`(no screenshot: ${se.message})`);
    }
  }
} finally {
  if (browser) await browser.close().catch(() => {});
}
process.exit(exitCode);
