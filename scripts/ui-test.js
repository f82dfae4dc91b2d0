// The dashboard's browser test, run by scripts/ui-test.sh against a stack of
// `./deploy.sh --local`: Debian's chromium, headless, driven by
// puppeteer-core. Settings come from the environment (see ui-test.sh):
//   KVQ_UI_BASE           the API, e.g. http://127.0.0.1:28080
//   KVQ_UI_ADMIN_TOKEN    an admin token (the login form's)
//   KVQ_UI_WRITER_TOKEN   a writer token, for the writes the test makes
//   KVQ_UI_KV_PORT        the data Redis' port (made to refuse writes for a while)
//   KVQ_UI_SCREENSHOTS    where the screenshots go
//   KVQ_UI_CHROMIUM       the browser (default /usr/bin/chromium)
// Every check waits with a deadline (the machine may be slow); the first
// that fails ends the run with a message and a screenshot of the page.
'use strict';

const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const puppeteer = require('puppeteer-core');

const env = (name, fallback) => {
  const value = process.env[name] || fallback;
  if (!value) throw new Error(name + ' is not set');
  return value;
};
const BASE = env('KVQ_UI_BASE');
const ADMIN = env('KVQ_UI_ADMIN_TOKEN');
const WRITER = env('KVQ_UI_WRITER_TOKEN');
const KV_PORT = env('KVQ_UI_KV_PORT');
const SHOTS = env('KVQ_UI_SCREENSHOTS');
const CHROMIUM = env('KVQ_UI_CHROMIUM', '/usr/bin/chromium');
const RUN = Date.now().toString(36); // keys of this run

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function step(text) {
  console.log('ui: ' + text);
}

/** Polls `check` until it returns something truthy, or fails naming `what`. */
async function eventually(what, check, seconds = 30) {
  const deadline = Date.now() + seconds * 1000;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error('timed out after ' + seconds + ' s waiting for ' + what + ' (last: ' + last + ')');
    await sleep(200);
  }
}

/** A call to the API with the writer token (or `token`). */
async function call(method, urlPath, body, { token = WRITER, headers = {} } = {}) {
  const response = await fetch(BASE + urlPath, {
    method,
    headers: {
      Authorization: 'Bearer ' + token,
      ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
      ...headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch (e) {
    json = null;
  }
  return { status: response.status, json, text };
}

function redis(...args) {
  return execFileSync('redis-cli', ['-p', KV_PORT, ...args], { encoding: 'utf8' }).trim();
}

/** The text of the element `selector`, or null. */
function text(page, selector) {
  return page.$eval(selector, (node) => node.textContent).catch(() => null);
}

function visible(page, selector) {
  return page.$eval(selector, (node) => !node.hidden && node.offsetParent !== null).catch(() => false);
}

/** "812/s" or "1.5/s" → the number. */
function perSecond(value) {
  const n = Number(String(value || '').replace(/[^0-9.]/g, ''));
  return isFinite(n) ? n : 0;
}

async function main() {
  fs.mkdirSync(SHOTS, { recursive: true });
  const args = ['--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'];
  if (process.getuid && process.getuid() === 0) args.push('--no-sandbox');
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args,
    protocolTimeout: 120000,
  });
  let page;
  try {
    page = await browser.newPage();
    page.setDefaultTimeout(60000);
    await page.setViewport({ width: 1280, height: 800 });

    // The page must load nothing but this server's files and API.
    const outside = [];
    const problems = [];
    await page.setRequestInterception(true);
    page.on('request', (request) => {
      if (request.url().startsWith(BASE + '/')) request.continue();
      else {
        outside.push(request.url());
        request.abort();
      }
    });
    page.on('console', (message) => {
      if (message.type() === 'error') problems.push('console: ' + message.text());
    });
    page.on('pageerror', (error) => problems.push('page error: ' + error.message));

    step('the page opens on its login form, with no data');
    await page.goto(BASE + '/ui', { waitUntil: 'load' });
    await eventually('the login form', () => visible(page, '#login'));
    assert.equal(await visible(page, '#dashboard'), false, 'the dashboard shows before login');

    step('a bad token is refused with the problem\'s title');
    await page.type('#login-token', 'not-a-token');
    await page.click('#login-form button[type=submit]');
    await eventually('the login error', async () => (await text(page, '#login-error')) === 'Unauthorized');
    assert.equal(await visible(page, '#dashboard'), false);
    // The refused request's 401 is logged by the browser; it is expected.
    problems.length = 0;

    step('it logs in with an admin token');
    await page.type('#login-token', ADMIN);
    await page.click('#login-form button[type=submit]');
    await eventually('the dashboard', () => visible(page, '#dashboard'));
    const stored = await page.evaluate(() => sessionStorage.getItem('kvq.adminToken'));
    assert.equal(stored, ADMIN, 'the token is kept in sessionStorage');
    await eventually('stats (the partitions table)', async () =>
      (await page.$$('#partitions tr[data-partition]')).length > 0);
    await eventually('a live worker', async () => (await text(page, '#workers-count')) !== '(0)' &&
      (await page.$$('#workers tr td.mono')).length > 0);

    step('a key written through the API shows in the key browser');
    const key = 'ui-test/' + RUN + '/greeting';
    const write = await call('POST', '/v1/kv', { key, value: { hello: 'dashboard', run: RUN }, ttl_seconds: 3600 },
      { headers: { Prefer: 'wait=20' } });
    assert.equal(write.status, 201, 'the write: ' + write.text);
    await page.$eval('#keys-prefix', (input) => { input.value = ''; });
    await page.type('#keys-prefix', 'ui-test/' + RUN + '/');
    await page.click('#keys-form button[type=submit]');
    const keyButton = '#keys button[data-key="' + key + '"]';
    await eventually('the key in the list', () => page.$(keyButton));
    await page.click(keyButton);
    await eventually('the value view', async () => (await text(page, '#value-key')) === key);
    assert.equal(await text(page, '#value-version'), '1');
    assert.match(await text(page, '#value-json'), /"hello": "dashboard"/);
    assert.match(await text(page, '#value-ttl'), /^\d+ s left/);
    assert.match(await text(page, '#value-updated'), /^\d{4}-\d\d-\d\dT/);

    step('a dead job shows among the dead letters, and its Retry button queues it again');
    const doomed = 'ui-test/' + RUN + '/phoenix';
    let id;
    redis('CONFIG', 'SET', 'maxmemory-policy', 'noeviction', 'maxmemory', '1');
    try {
      const accepted = await call('POST', '/v1/kv', { key: doomed, value: { risen: true } });
      assert.equal(accepted.status, 202, accepted.text);
      id = accepted.json.job_id;
      await eventually('the job to die', async () => {
        const job = await call('GET', '/v1/jobs/' + id);
        return job.json && job.json.status === 'dead';
      }, 90);
    } finally {
      redis('CONFIG', 'SET', 'maxmemory', '0');
    }
    const row = '#dead tr[data-job-id="' + id + '"]';
    await eventually('the dead job in the list', () => page.$(row), 30);
    assert.equal(await page.$eval(row + ' td.key', (node) => node.textContent), doomed);
    await eventually('the dead count', async () => Number(await text(page, '#jobs-dead')) >= 1);
    await page.screenshot({ path: path.join(SHOTS, 'dead-letter-1280x800.png') });
    await page.click(row + ' button.retry');
    await eventually('the retry note', async () => ((await text(page, '#dead-note')) || '').includes(id));
    await eventually('the row to go', async () => !(await page.$(row)));
    await eventually('the retried job to succeed', async () => {
      const job = await call('GET', '/v1/jobs/' + id);
      return job.json && job.json.status === 'succeeded';
    }, 60);
    const risen = await call('GET', '/v1/kv/' + encodeURIComponent(doomed));
    assert.equal(risen.status, 200, risen.text);
    assert.deepEqual(risen.json.value, { risen: true });

    step('the charts move while writes arrive');
    const before = await page.$eval('#chart-rates', (canvas) => canvas.toDataURL());
    let writing = true;
    let written = 0;
    const writer = async (n) => {
      while (writing) {
        const writes = [];
        for (let i = 0; i < 50; i++) {
          writes.push({ op: 'upsert', key: 'ui-test/' + RUN + '/load/' + n + '/' + i, value: { n: written + i } });
        }
        const batch = await call('POST', '/v1/batch', { writes });
        if (batch.status !== 202) throw new Error('a batch was refused: ' + batch.text);
        written += writes.length;
        await sleep(50);
      }
    };
    const writers = [writer(0), writer(1)];
    try {
      await eventually('accepted writes per second above 0', async () => perSecond(await text(page, '#rate-accepted')) > 0, 30);
      await eventually('applied writes per second above 0', async () => perSecond(await text(page, '#rate-applied')) > 0, 30);
      await eventually('a peak on the rates chart', async () =>
        Number(await page.$eval('#chart-rates', (canvas) => canvas.dataset.peak)) > 0);
      // Two more samples, so the lines have a rise to show.
      await sleep(2500);
      await page.evaluate(() => window.scrollTo(0, 0));
      await page.screenshot({ path: path.join(SHOTS, 'dashboard-1280x800.png') });
    } finally {
      writing = false;
      await Promise.all(writers);
    }
    const after = await page.$eval('#chart-rates', (canvas) => canvas.toDataURL());
    assert.notEqual(after, before, 'the rates chart did not change');
    step('wrote ' + written + ' keys; accepted ' + (await text(page, '#rate-accepted')) +
      ', applied ' + (await text(page, '#rate-applied')));

    step('at phone size (390x844) nothing overflows sideways');
    await page.setViewport({ width: 390, height: 844, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
    await sleep(1500);
    await page.evaluate(() => window.scrollTo(0, 0));
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, 'the page is ' + overflow + ' px wider than the phone');
    assert.ok(await visible(page, '#chart-rates'), 'the chart shows on a phone');
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-390x844.png') });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-390x844-full.png'), fullPage: true });

    step('logging out forgets the token');
    await page.setViewport({ width: 1280, height: 800 });
    await page.click('#logout');
    await eventually('the login form again', () => visible(page, '#login'));
    assert.equal(await page.evaluate(() => sessionStorage.getItem('kvq.adminToken')), null);
    assert.equal(await visible(page, '#dashboard'), false);

    assert.deepEqual(outside, [], 'the page asked for something outside this server');
    assert.deepEqual(problems, [], 'the page logged errors');
    step('all checks passed');
  } catch (error) {
    if (page) {
      await page.screenshot({ path: path.join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
    }
    throw error;
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error('ui: FAILED: ' + (error && error.stack ? error.stack : error));
  process.exit(1);
});
