// kvq dashboard. Plain JavaScript, no library, no build step; served by
// kvq-api at /ui/app.js under a Content-Security-Policy that allows only
// this origin (no inline script, no eval).
//
// The admin token is kept in sessionStorage (this tab only, gone when it
// closes) and sent as a bearer token to the API's /v1 routes:
//   GET  /v1/stats                  every second: tiles, charts, partitions, workers
//   GET  /v1/jobs?status=dead       dead letters, every 5 s and when the dead count moves
//   POST /v1/jobs/{id}/retry        the Retry button
//   GET  /v1/kv?prefix=&cursor=     the key browser's pages
//   GET  /v1/kv/{key}               the value view
// Every error is shown as the problem's title (RFC 9457); a 401 or 403 signs
// out, showing why.
'use strict';

(() => {
  const TOKEN_KEY = 'kvq.adminToken';
  const STATS_EVERY_MS = 1000;
  const DEAD_EVERY_MS = 5000;
  const SAMPLES = 120; // two minutes of one-second samples on the charts
  const KEYS_PAGE = 50;
  const DEAD_PAGE = 50;

  const $ = (id) => document.getElementById(id);

  /** An API error: the problem's title, and its detail for a tooltip. */
  class Problem extends Error {
    constructor(title, detail, status) {
      super(title);
      this.title = title;
      this.detail = detail || '';
      this.status = status;
    }
  }

  // --- The API -------------------------------------------------------------

  /** Calls the API; resolves to the JSON body, or throws a Problem. */
  async function api(method, path) {
    const headers = { Accept: 'application/json' };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = 'Bearer ' + token;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new Problem('The API did not answer', String(e), 0);
    }
    const type = response.headers.get('content-type') || '';
    let body = null;
    if (type.includes('json')) {
      try {
        body = await response.json();
      } catch (e) {
        body = null;
      }
    }
    if (!response.ok) {
      const title = body && typeof body.title === 'string'
        ? body.title
        : (response.status + ' ' + (response.statusText || 'error'));
      throw new Problem(title, body && body.detail, response.status);
    }
    return body;
  }

  /** Shows `error` (a Problem or anything thrown) in element `el`. */
  function showError(el, error) {
    const title = error instanceof Problem ? error.title : 'Error';
    el.textContent = title;
    el.title = error instanceof Problem ? error.detail : String(error);
    el.hidden = false;
    if (error instanceof Problem && (error.status === 401 || error.status === 403)) {
      signOut(title);
    }
  }

  function clearError(el) {
    el.hidden = true;
    el.textContent = '';
    el.title = '';
  }

  // --- Small helpers -------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function count(n) {
    return typeof n === 'number' ? n.toLocaleString('en-US') : '–';
  }

  function rate(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    return (n < 10 ? n.toFixed(1) : Math.round(n).toLocaleString('en-US')) + '/s';
  }

  function seconds(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    if (n < 10) return n.toFixed(2) + ' s';
    if (n < 120) return n.toFixed(1) + ' s';
    if (n < 7200) return (n / 60).toFixed(1) + ' min';
    return (n / 3600).toFixed(1) + ' h';
  }

  /** "3 s ago" for an RFC 3339 time, or '–'. */
  function ago(time) {
    const t = Date.parse(time);
    if (!time || isNaN(t)) return '–';
    const s = Math.max(0, (Date.now() - t) / 1000);
    if (s < 1) return 'now';
    if (s < 90) return Math.round(s) + ' s ago';
    if (s < 5400) return Math.round(s / 60) + ' min ago';
    if (s < 172800) return Math.round(s / 3600) + ' h ago';
    return Math.round(s / 86400) + ' d ago';
  }

  function clock(date) {
    return date.toTimeString().slice(0, 8);
  }

  /** [0,1,2,3,7] → "0–3, 7". */
  function ranges(list) {
    const sorted = [...list].sort((a, b) => a - b);
    const parts = [];
    for (let i = 0; i < sorted.length; i++) {
      let j = i;
      while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
      parts.push(j > i ? sorted[i] + '–' + sorted[j] : String(sorted[i]));
      i = j;
    }
    return parts.join(', ') || '–';
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // --- Charts (canvas, drawn here) ----------------------------------------

  /** A rolling series per line, drawn on one canvas. */
  class Chart {
    constructor(canvas, lines, unit, floor) {
      this.canvas = canvas;
      this.lines = lines; // [{name, color (CSS variable)}]
      this.unit = unit;
      this.floor = floor; // the smallest top of the scale
      this.values = lines.map(() => []);
    }

    push(sample) {
      this.lines.forEach((line, i) => {
        const v = sample[line.name];
        this.values[i].push(typeof v === 'number' && isFinite(v) ? v : null);
        if (this.values[i].length > SAMPLES) this.values[i].shift();
      });
      this.draw();
    }

    clear() {
      this.values = this.lines.map(() => []);
      this.draw();
    }

    draw() {
      const canvas = this.canvas;
      const ratio = window.devicePixelRatio || 1;
      const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
      const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
      if (canvas.width !== width || canvas.height !== height) {
        canvas.width = width;
        canvas.height = height;
      }
      const ctx = canvas.getContext('2d');
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      const w = canvas.clientWidth;
      const h = canvas.clientHeight;
      ctx.clearRect(0, 0, w, h);

      let peak = 0;
      for (const series of this.values) {
        for (const v of series) if (v !== null && v > peak) peak = v;
      }
      const top = niceCeiling(Math.max(peak, this.floor));
      canvas.dataset.peak = String(peak);
      canvas.dataset.samples = String(this.values[0].length);

      const left = 44;
      const right = 6;
      const topPad = 8;
      const bottom = 18;
      const plotW = w - left - right;
      const plotH = h - topPad - bottom;
      const y = (v) => topPad + plotH - (v / top) * plotH;
      const x = (i) => left + (i / (SAMPLES - 1)) * plotW;

      ctx.font = '11px system-ui, sans-serif';
      ctx.fillStyle = cssVar('--muted');
      ctx.strokeStyle = cssVar('--line');
      ctx.lineWidth = 1;
      ctx.textAlign = 'right';
      ctx.textBaseline = 'middle';
      for (const f of [0, 0.5, 1]) {
        const yy = Math.round(y(top * f)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(left, yy);
        ctx.lineTo(w - right, yy);
        ctx.stroke();
        ctx.fillText(axisLabel(top * f) + this.unit, left - 6, yy);
      }
      ctx.textAlign = 'left';
      ctx.textBaseline = 'alphabetic';
      ctx.fillText('−2 min', left, h - 4);
      ctx.textAlign = 'right';
      ctx.fillText('now', w - right, h - 4);

      this.lines.forEach((line, li) => {
        const series = this.values[li];
        const offset = SAMPLES - series.length;
        const color = cssVar(line.color);
        ctx.strokeStyle = color;
        ctx.lineWidth = 2;
        ctx.lineJoin = 'round';
        ctx.beginPath();
        let drawing = false;
        series.forEach((v, i) => {
          if (v === null) {
            drawing = false;
            return;
          }
          const px = x(offset + i);
          const py = y(Math.min(v, top));
          if (drawing) ctx.lineTo(px, py);
          else ctx.moveTo(px, py);
          drawing = true;
        });
        ctx.stroke();
      });
    }
  }

  function niceCeiling(v) {
    const power = Math.pow(10, Math.floor(Math.log10(v)));
    for (const step of [1, 2, 5, 10]) {
      if (v <= step * power) return step * power;
    }
    return 10 * power;
  }

  function axisLabel(v) {
    if (v >= 10000) return Math.round(v / 1000) + 'k';
    if (v >= 10 || v === 0) return String(Math.round(v));
    return v.toFixed(1);
  }

  const rateChart = new Chart($('chart-rates'),
    [{ name: 'accepted', color: '--accepted' }, { name: 'applied', color: '--applied' }], '/s', 1);
  const lagChart = new Chart($('chart-lag'), [{ name: 'lag', color: '--lag' }], ' s', 1);

  // --- Stats: tiles, charts, partitions, workers --------------------------

  let session = 0; // bumped on sign-in and sign-out: late answers of an old session are dropped
  let statsTimer = null;
  let deadTimer = null;
  let lastDead = null;
  let previousTotals = null;

  /** Writes per second from two readings of the partitions' totals, for an
   *  API that gives no rates. */
  function derivedRates(stats) {
    const at = Date.parse(stats.at);
    let accepted = 0;
    let done = 0;
    for (const p of stats.partitions || []) {
      accepted += p.accepted_total || 0;
      done += p.done_total || 0;
    }
    const previous = previousTotals;
    previousTotals = { at, accepted, done };
    if (!previous || !(at > previous.at)) return { accepted: null, applied: null };
    const span = (at - previous.at) / 1000;
    return {
      accepted: Math.max(0, (accepted - previous.accepted) / span),
      applied: Math.max(0, (done - previous.done) / span),
    };
  }

  function renderStats(stats) {
    const jobs = stats.jobs || {};
    $('jobs-waiting').textContent = count(jobs.waiting);
    $('jobs-running').textContent = count(jobs.running);
    $('jobs-dead').textContent = count(jobs.dead);
    $('jobs-dead').classList.toggle('nonzero', (jobs.dead || 0) > 0);
    $('jobs-succeeded').textContent = count(jobs.succeeded_total);
    $('jobs-failed').textContent = count(jobs.failed_total);

    const derived = derivedRates(stats);
    const rates = stats.rates || {};
    const accepted = typeof rates.accepted_per_second === 'number' ? rates.accepted_per_second : derived.accepted;
    const applied = typeof rates.applied_per_second === 'number' ? rates.applied_per_second : derived.applied;
    $('rate-accepted').textContent = rate(accepted);
    $('rate-applied').textContent = rate(applied);
    rateChart.push({ accepted, applied });

    const partitions = stats.partitions || [];
    let lag = 0;
    for (const p of partitions) if (typeof p.lag_seconds === 'number' && p.lag_seconds > lag) lag = p.lag_seconds;
    $('lag-now').textContent = seconds(lag);
    lagChart.push({ lag });

    const maxDepth = Math.max(1, ...partitions.map((p) => p.depth || 0));
    const rows = partitions.map((p) => {
      const tr = el('tr');
      tr.dataset.partition = p.partition;
      tr.append(el('td', p.partition), el('td', count(p.depth)));
      const barCell = el('td');
      const bar = el('div', null, 'bar');
      bar.style.width = ((100 * (p.depth || 0)) / maxDepth).toFixed(1) + '%';
      barCell.append(bar);
      const owner = el('td', p.owner || '–', 'id mono');
      owner.title = p.owner || 'no owner';
      tr.append(barCell, el('td', p.lag_seconds ? seconds(p.lag_seconds) : '0'), owner);
      return tr;
    });
    if (!rows.length) rows.push(emptyRow(5, 'no partitions'));
    $('partitions').replaceChildren(...rows);

    const workers = stats.workers || [];
    $('workers-count').textContent = '(' + workers.length + ')';
    const workerRows = workers.map((w) => {
      const tr = el('tr');
      const id = el('td', w.id, 'id mono');
      id.title = w.id;
      const beat = el('td', ago(w.last_heartbeat));
      beat.title = w.last_heartbeat || '';
      tr.append(id, beat, el('td', ranges(w.partitions || [])));
      return tr;
    });
    if (!workerRows.length) workerRows.push(emptyRow(3, 'no live worker'));
    $('workers').replaceChildren(...workerRows);

    if (lastDead !== null && jobs.dead !== lastDead) loadDead();
    lastDead = typeof jobs.dead === 'number' ? jobs.dead : lastDead;
    const workersText = workers.length === 1 ? '1 worker' : workers.length + ' workers';
    setStatus('updated ' + clock(new Date()) + ' · ' + workersText, false);
    refreshTtl();
  }

  function emptyRow(columns, text) {
    const tr = el('tr');
    const td = el('td', text, 'empty');
    td.colSpan = columns;
    tr.append(td);
    return tr;
  }

  function setStatus(text, stale) {
    $('status').textContent = text;
    $('status').classList.toggle('stale', stale);
  }

  async function pollStats(mine) {
    if (mine !== session) return;
    try {
      const stats = await api('GET', '/v1/stats');
      if (mine !== session) return;
      clearError($('stats-error'));
      renderStats(stats);
    } catch (error) {
      if (mine !== session) return;
      showError($('stats-error'), error);
      setStatus('not updated since ' + clock(new Date()), true);
      rateChart.push({});
      lagChart.push({});
    }
    if (mine === session) statsTimer = setTimeout(() => pollStats(mine), STATS_EVERY_MS);
  }

  // --- Dead letters --------------------------------------------------------

  let deadCursor = null;
  let deadShown = 0;

  /** Reloads the dead letters from the first, as many as are shown. */
  async function loadDead() {
    const mine = session;
    const limit = Math.min(1000, Math.max(DEAD_PAGE, Math.ceil(deadShown / DEAD_PAGE) * DEAD_PAGE));
    try {
      const page = await api('GET', '/v1/jobs?status=dead&limit=' + limit);
      if (mine !== session) return;
      clearError($('dead-error'));
      $('dead').replaceChildren();
      deadShown = 0;
      appendDead(page);
    } catch (error) {
      if (mine === session) showError($('dead-error'), error);
    }
  }

  async function moreDead() {
    const mine = session;
    if (!deadCursor) return;
    try {
      const page = await api('GET', '/v1/jobs?status=dead&limit=' + DEAD_PAGE +
        '&cursor=' + encodeURIComponent(deadCursor));
      if (mine === session) appendDead(page);
    } catch (error) {
      if (mine === session) showError($('dead-error'), error);
    }
  }

  function appendDead(page) {
    const body = $('dead');
    body.querySelector('td.empty')?.parentElement.remove();
    for (const job of page.jobs || []) {
      const tr = el('tr');
      tr.dataset.jobId = job.id;
      const id = el('td', job.id, 'id mono');
      id.title = job.id;
      const error = job.error || {};
      const err = el('td', error.message || error.code || '–', 'err');
      err.title = error.code || '';
      const died = el('td', ago(job.finished_at));
      died.title = job.finished_at || '';
      const retry = el('button', 'Retry', 'retry danger');
      retry.type = 'button';
      retry.dataset.jobId = job.id;
      retry.addEventListener('click', () => retryJob(job.id, retry));
      const action = el('td');
      action.append(retry);
      tr.append(id, el('td', job.op), el('td', job.key, 'key'), err, died, action);
      body.append(tr);
      deadShown++;
    }
    if (!deadShown) body.append(emptyRow(6, 'no dead letters'));
    deadCursor = page.next_cursor || null;
    $('dead-more').hidden = !deadCursor;
  }

  async function retryJob(id, button) {
    button.disabled = true;
    clearError($('dead-error'));
    try {
      const accepted = await api('POST', '/v1/jobs/' + encodeURIComponent(id) + '/retry');
      const note = $('dead-note');
      note.textContent = 'Job ' + id + ' queued again (' + (accepted && accepted.status || 'queued') + ')';
      note.hidden = false;
      button.closest('tr')?.remove();
      deadShown = Math.max(0, deadShown - 1);
      if (!deadShown) $('dead').append(emptyRow(6, 'no dead letters'));
    } catch (error) {
      button.disabled = false;
      showError($('dead-error'), error);
    }
  }

  // --- Key browser ---------------------------------------------------------

  const keys = { prefix: '', cursor: null, next: null, selected: null, value: null };

  async function listKeys(prefix, cursor) {
    const mine = session;
    let path = '/v1/kv?limit=' + KEYS_PAGE + '&prefix=' + encodeURIComponent(prefix);
    if (cursor) path += '&cursor=' + encodeURIComponent(cursor);
    try {
      const page = await api('GET', path);
      if (mine !== session) return;
      clearError($('keys-error'));
      keys.prefix = prefix;
      keys.cursor = cursor;
      keys.next = page.next_cursor || null;
      const items = (page.keys || []).map((key) => {
        const li = el('li');
        const button = el('button', key);
        button.type = 'button';
        button.dataset.key = key;
        if (key === keys.selected) button.setAttribute('aria-current', 'true');
        button.addEventListener('click', () => showKey(key));
        li.append(button);
        return li;
      });
      if (!items.length) items.push(el('li', prefix ? 'no key starts with “' + prefix + '”' : 'no keys', 'empty'));
      $('keys').replaceChildren(...items);
      $('keys-next').hidden = !keys.next;
      $('keys-first').hidden = !cursor;
    } catch (error) {
      if (mine === session) showError($('keys-error'), error);
    }
  }

  async function showKey(key) {
    const mine = session;
    keys.selected = key;
    for (const b of $('keys').querySelectorAll('button')) {
      if (b.dataset.key === key) b.setAttribute('aria-current', 'true');
      else b.removeAttribute('aria-current');
    }
    try {
      const entry = await api('GET', '/v1/kv/' + encodeURIComponent(key));
      if (mine !== session) return;
      clearError($('keys-error'));
      keys.value = entry;
      $('value-key').textContent = entry.key;
      $('value-version').textContent = entry.version;
      $('value-updated').textContent = entry.updated_at + ' (' + ago(entry.updated_at) + ')';
      $('value-json').textContent = JSON.stringify(entry.value, null, 2);
      refreshTtl();
      $('value').hidden = false;
    } catch (error) {
      if (mine !== session) return;
      keys.value = null;
      $('value').hidden = true;
      showError($('keys-error'), error);
    }
  }

  /** The value view's TTL, counted down on each stats tick. */
  function refreshTtl() {
    const entry = keys.value;
    if (!entry) return;
    if (!entry.expires_at) {
      $('value-ttl').textContent = 'none';
      return;
    }
    const left = Math.max(0, (Date.parse(entry.expires_at) - Date.now()) / 1000);
    $('value-ttl').textContent = Math.round(left) + ' s left (expires ' + entry.expires_at + ')';
  }

  // --- Sign in, sign out ---------------------------------------------------

  function stopPolling() {
    clearTimeout(statsTimer);
    clearInterval(deadTimer);
    statsTimer = null;
    deadTimer = null;
  }

  function start() {
    session++;
    const mine = session;
    stopPolling();
    lastDead = null;
    previousTotals = null;
    rateChart.clear();
    lagChart.clear();
    $('login').hidden = true;
    $('dashboard').hidden = false;
    $('logout').hidden = false;
    pollStats(mine);
    loadDead();
    deadTimer = setInterval(() => loadDead(), DEAD_EVERY_MS);
    listKeys($('keys-prefix').value, null);
  }

  /** Forgets the token and shows the login form, with `reason` if given. */
  function signOut(reason) {
    session++;
    stopPolling();
    sessionStorage.removeItem(TOKEN_KEY);
    keys.value = null;
    keys.selected = null;
    for (const id of ['partitions', 'workers', 'dead', 'keys']) $(id).replaceChildren();
    $('value').hidden = true;
    $('dashboard').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    setStatus('', false);
    const error = $('login-error');
    if (reason) {
      error.textContent = reason;
      error.hidden = false;
    } else {
      clearError(error);
    }
    $('login-token').value = '';
    $('login-token').focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $('login-token').value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    const button = event.target.querySelector('button');
    button.disabled = true;
    try {
      // An admin-only route: a token without the role is refused here.
      await api('GET', '/v1/jobs?status=dead&limit=1');
      clearError($('login-error'));
      $('login-token').value = '';
      start();
    } catch (error) {
      sessionStorage.removeItem(TOKEN_KEY);
      showError($('login-error'), error);
    } finally {
      button.disabled = false;
    }
  }

  $('login-form').addEventListener('submit', signIn);
  $('logout').addEventListener('click', () => signOut(null));
  $('keys-form').addEventListener('submit', (event) => {
    event.preventDefault();
    listKeys($('keys-prefix').value, null);
  });
  $('keys-next').addEventListener('click', () => listKeys(keys.prefix, keys.next));
  $('keys-first').addEventListener('click', () => listKeys(keys.prefix, null));
  $('dead-more').addEventListener('click', moreDead);
  window.addEventListener('resize', () => {
    rateChart.draw();
    lagChart.draw();
  });

  if (sessionStorage.getItem(TOKEN_KEY)) start();
  else signOut(null);
})();
