#!/usr/bin/env node
// Drives the CyberBackup browser UI in headless Chromium (Debian's package, through
// playwright-core; no browser is downloaded), as a person who never opens a terminal:
//
//   1. open the sign-in link the bridge printed; set up an account from the page;
//   2. back up a folder with nested directories; wait for its snapshot;
//   3. back up a bigger folder, reload the page mid-upload, choose the folder again
//      and see the backup resume and finish;
//   4. browse the first snapshot into a nested folder, download one file and the
//      folder as a tar; check a file named like HTML shows as text;
//   5. compare the two snapshots; forget by policy, seeing the dry run first;
//   6. keep screenshots of the main views.
//
//   node tests/ui/v4.mjs --url URL --token T --server HOST:PORT --account NAME \
//        --folder DIR --big-folder DIR --out DIR
//
// Writes OUT/file.bin (the downloaded file), OUT/folder.tar and OUT/*.png, prints
// "ok" lines, exits 0; on failure prints why, saves OUT/failure.png and exits 1.

import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { chromium } from 'playwright-core';

const TIMEOUT_MS = 120_000;

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      console.error(`bad argument ${argv[i]}`);
      process.exit(2);
    }
    opts[argv[i].slice(2)] = argv[i + 1];
  }
  for (const k of ['url', 'token', 'server', 'account', 'folder', 'big-folder', 'out']) {
    if (!opts[k]) { console.error(`--${k} is required`); process.exit(2); }
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
mkdirSync(opts.out, { recursive: true });
const shot = (name) => path.join(opts.out, `${name}.png`);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const problems = [];
let browser;
let page;
let exitCode = 0;

function step(msg) { console.log(`ok ${msg}`); }

async function tab(name) {
  await page.click(`.tab[data-view="${name}"]`);
  await page.waitForSelector(`#view-${name}:not([hidden])`);
}

try {
  if (!existsSync(executablePath)) throw new Error(`${executablePath} does not exist (apt-get install chromium, or set CHROMIUM)`);
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 }, acceptDownloads: true });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`); });
  page.on('dialog', (d) => { problems.push(`a dialog opened (${d.type()}: ${d.message()}): script ran from a file name`); d.dismiss(); });

  // 1. The sign-in link, then the setup form.
  const res = await page.goto(`${opts.url}/?token=${encodeURIComponent(opts.token)}`);
  if (!res || !res.ok()) throw new Error(`the sign-in link answered ${res ? res.status() : 'nothing'}`);
  if (page.url().includes('token=')) throw new Error('the token stayed in the address bar');
  await page.waitForSelector('#setup:not([hidden])');
  await page.fill('#create-server', opts.server);
  await page.fill('#create-account', opts.account);
  await page.fill('#create-pass', 'a long enough passphrase');
  await page.fill('#create-pass2', 'a long enough passphrase');
  await page.click('#create-form button[type=submit]');
  await page.waitForSelector('#app:not([hidden])');
  await page.waitForFunction(() => document.querySelector('#server-info').textContent.includes(' on '));
  step('signed in with the link and set up an account');

  // 2. A folder with nested directories.
  await tab('backup');
  await page.setInputFiles('#pick-folder', opts.folder);
  await page.waitForFunction(() => !document.querySelector('#start').disabled);
  await page.fill('#tag', 'first');
  await page.click('#start');
  await page.waitForFunction(() => /Snapshot [0-9a-f]{8} saved/.test(document.querySelector('#progress-text').textContent));
  step('backed up a folder');

  // 3. A bigger one, interrupted by a reload, then resumed.
  await page.setInputFiles('#pick-folder', opts['big-folder']);
  await page.waitForFunction(() => !document.querySelector('#start').disabled);
  await page.fill('#tag', 'second');
  await page.click('#start');
  await page.waitForSelector('#progress-files li.done');
  await page.screenshot({ path: shot('backup-progress'), fullPage: true });
  await page.reload();
  await page.waitForSelector('#app:not([hidden])');
  await tab('backup');
  await page.waitForSelector('#resume:not([hidden])');
  const resumeText = await page.textContent('#resume-text');
  if (!/stopped at [1-9]\d* of \d+ files/.test(resumeText)) throw new Error(`the resume banner says: ${resumeText}`);
  await page.setInputFiles('#resume-folder', opts['big-folder']);
  await page.waitForFunction(() => /Snapshot [0-9a-f]{8} saved/.test(document.querySelector('#progress-text').textContent));
  step(`resumed after a reload (${resumeText.trim()})`);

  // Overview: the last backup with its date, space and dedup.
  await tab('overview');
  await page.waitForFunction(() => /^\d{4}-\d\d-\d\d \d\d:\d\d$/.test(document.querySelector('#stat-last').textContent));
  await page.screenshot({ path: shot('overview'), fullPage: true });
  step('the overview shows the last backup with its date');

  // 4. Browse the first snapshot, into a nested folder; download a file and a tar.
  await tab('snapshots');
  await page.waitForSelector('#snapshots tbody tr[data-id]');
  const rows = await page.$$('#snapshots tbody tr[data-id]');
  if (rows.length !== 2) throw new Error(`${rows.length} snapshots listed, not 2`);
  // Newest first: the first backup is the second row.
  await rows[1].$eval('button.linkish', (b) => b.click());
  await page.waitForSelector('#browser:not([hidden]) #entries tr');
  const top = path.basename(opts.folder);
  await page.click(`#entries button.linkish:text-is("${top}/")`);
  await page.waitForFunction((t) => document.querySelector('#crumbs').textContent.includes(t), top);
  // The HTML-like name is text: the cell holds it, no <img> was made.
  const xss = '<img src=x onerror=alert(1)>.txt';
  const cells = await page.$$eval('#entries td', (tds) => tds.map((t) => t.textContent));
  if (!cells.includes(xss)) throw new Error(`the file ${xss} is not shown as text: ${cells.join(' | ')}`);
  if (await page.$('#entries img')) throw new Error('a file name became an <img> element');
  step('a file named like HTML shows as text');
  await page.click('#entries button.linkish:text-is("nested/")');
  await page.waitForFunction(() => document.querySelector('#crumbs').textContent.includes('nested'));
  await page.click('#entries button.linkish:text-is("deeper/")');
  await page.waitForSelector('#entries a:text-is("Download")');
  await page.screenshot({ path: shot('snapshot-browser'), fullPage: true });
  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#entries a:text-is("Download")')]);
  await dl.saveAs(path.join(opts.out, 'file.bin'));
  if (await dl.failure()) throw new Error(`the file download failed: ${await dl.failure()}`);
  step(`downloaded ${dl.suggestedFilename()}`);
  await page.click(`#crumbs button.linkish:text-is("${top}")`);
  await page.waitForFunction(() => !document.querySelector('#crumbs').textContent.includes('nested'));
  const [tar] = await Promise.all([page.waitForEvent('download'), page.click('#archive-link')]);
  await tar.saveAs(path.join(opts.out, 'folder.tar'));
  if (await tar.failure()) throw new Error(`the archive download failed: ${await tar.failure()}`);
  step(`downloaded the folder as ${tar.suggestedFilename()}`);

  // 5. Compare the two snapshots.
  const boxes = await page.$$('#snapshots tbody input[type=checkbox]');
  await boxes[0].check();
  await boxes[1].check();
  await page.click('#compare');
  await page.waitForSelector('#diff:not([hidden]) #diff-rows tr');
  const summary = await page.textContent('#diff-summary');
  if (!/\d+ added, \d+ removed/.test(summary)) throw new Error(`the diff says: ${summary}`);
  step(`compared: ${summary}`);

  // Forget by policy: the dry run first, then for real.
  await tab('forget');
  for (const id of ['#keep-daily', '#keep-weekly', '#keep-monthly', '#keep-yearly']) await page.fill(id, '0');
  await page.fill('#keep-last', '1');
  await page.click('#forget-form button[type=submit]');
  await page.waitForFunction(() => /would be forgotten/.test(document.querySelector('#forget-summary').textContent));
  const dry = await page.textContent('#forget-summary');
  if (!dry.startsWith('1 snapshot of 2')) throw new Error(`the dry run says: ${dry}`);
  await page.screenshot({ path: shot('forget-preview'), fullPage: true });
  await page.click('#forget-apply');
  await page.waitForFunction(() => /^Forgot 1 snapshot/.test(document.querySelector('#forget-summary').textContent));
  await tab('snapshots');
  await page.waitForFunction(() => document.querySelectorAll('#snapshots tbody tr[data-id]').length === 1);
  step('forgot by policy after the dry run');

  if (problems.length) throw new Error(problems.join('\n'));
} catch (e) {
  exitCode = 1;
  console.error(`FAILED: ${e.message}`);
  if (problems.length) console.error(problems.join('\n'));
  if (page) {
    try { await page.screenshot({ path: shot('failure'), fullPage: true }); } catch { /* ignore */ }
  }
} finally {
  if (browser) await browser.close();
}
process.exit(exitCode);
