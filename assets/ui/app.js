// The dashboard: hash routes (#/functions, #/functions/NAME,
// #/functions/OWNER/NAME for an admin, #/users), each
// a view that reads and changes state through api.js only. Text from the
// server goes into the page as text (textContent), never as markup.

import {
  api,
  ApiError,
  bytes,
  envLines,
  errorOf,
  fnPath,
  joinCommand,
  session,
  splitCommand,
  streamEvents,
  streamLines,
  waitOutput,
} from './api.js';

const $ = (id) => document.getElementById(id);

/** An element with properties (`class`, `text`, `on*` listeners, attributes) and children. */
function h(tag, props = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === null || v === undefined || v === false) {
      continue;
    }
    if (k.startsWith('on')) {
      el.addEventListener(k.slice(2), v);
    } else if (k === 'class') {
      el.className = v;
    } else if (k === 'text') {
      el.textContent = v;
    } else {
      el.setAttribute(k, v === true ? '' : v);
    }
  }
  for (const c of kids.flat()) {
    if (c !== null && c !== undefined) {
      el.append(c instanceof Node ? c : String(c));
    }
  }
  return el;
}

// ---- state of the signed-in tab ----

const state = {
  admin: false,
  /** The user this tab's key belongs to (`/v1/whoami`). */
  me: null,
  /** Aborts the current view's requests and streams when it is left. */
  view: new AbortController(),
  timers: [],
  /** Object URLs of downloaded outputs, revoked when left. */
  blobs: [],
};

function leaveView() {
  state.view.abort();
  state.view = new AbortController();
  for (const t of state.timers) {
    clearInterval(t);
  }
  state.timers = [];
  for (const u of state.blobs) {
    URL.revokeObjectURL(u);
  }
  state.blobs = [];
}

function isAbort(e) {
  return e && e.name === 'AbortError';
}

// ---- messages ----

function showError(e) {
  if (isAbort(e)) {
    return;
  }
  const text = e instanceof ApiError ? e.toString() : `error: ${e && e.message ? e.message : e}`;
  $('error-text').textContent = text;
  $('error').hidden = false;
  // An error replaces a success or progress message still on screen.
  clearTimeout(flashTimer);
  $('flash').hidden = true;
  if (e instanceof ApiError && e.status === 401 && session.key) {
    // The key stopped working (removed or rotated): nothing else will.
    $('error-text').textContent = `${text} (sign in again)`;
  }
}

function clearError() {
  $('error').hidden = true;
  $('error-text').textContent = '';
}

let flashTimer = null;
function flash(text) {
  $('flash').textContent = text;
  $('flash').hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => {
    $('flash').hidden = true;
  }, 5000);
}

/** Runs `f`, showing its error; returns whether it succeeded. */
async function attempt(f) {
  clearError();
  try {
    await f();
    return true;
  } catch (e) {
    showError(e);
    return false;
  }
}

/** A modal yes/no question; resolves true only on an explicit confirm. */
function confirmDialog(text, ok = 'Confirm') {
  const d = $('confirm');
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = ok;
  return new Promise((resolve) => {
    const done = (v) => {
      $('confirm-ok').removeEventListener('click', yes);
      $('confirm-cancel').removeEventListener('click', no);
      d.removeEventListener('cancel', no);
      if (d.open) {
        d.close();
      }
      resolve(v);
    };
    const yes = () => done(true);
    const no = () => done(false);
    $('confirm-ok').addEventListener('click', yes);
    $('confirm-cancel').addEventListener('click', no);
    d.addEventListener('cancel', no);
    d.showModal();
    $('confirm-cancel').focus();
  });
}

// ---- sign in / out ----

/** Checks a key against the API and learns whose it is and whether an admin's. */
async function checkKey(key) {
  const me = await api('GET', '/v1/whoami', { key });
  state.me = me.Name;
  return me.Admin;
}

async function signIn(ev) {
  ev.preventDefault();
  const input = $('signin-key');
  const key = input.value.trim();
  await attempt(async () => {
    try {
      state.admin = await checkKey(key);
    } finally {
      // The key leaves the DOM whether it worked or not.
      input.value = '';
    }
    session.set(key);
    signedIn();
    location.hash = '#/functions';
    route();
  });
}

function signedIn() {
  $('nav').hidden = false;
  $('nav-users').hidden = !state.admin;
  $('signout').hidden = false;
}

function signOut() {
  leaveView();
  session.clear();
  // Drop everything the views showed (call URLs are secrets too), then
  // start over from a fresh document.
  for (const id of ['functions-body', 'fn-details', 'logs', 'users-body', 'registries-body', 'call-output']) {
    $(id).replaceChildren();
  }
  for (const f of document.forms) {
    f.reset();
  }
  $('newkey-value').textContent = '';
  $('call-id').textContent = '';
  location.replace('/ui/');
}

// ---- routing ----

const VIEWS = ['view-signin', 'view-functions', 'view-function', 'view-users', 'view-registries'];

function show(view) {
  for (const v of VIEWS) {
    $(v).hidden = v !== view;
  }
  for (const [link, on] of [
    ['nav-functions', view === 'view-functions' || view === 'view-function'],
    ['nav-users', view === 'view-users'],
    ['nav-registries', view === 'view-registries'],
  ]) {
    if (on) {
      $(link).setAttribute('aria-current', 'page');
    } else {
      $(link).removeAttribute('aria-current');
    }
  }
}

function route() {
  leaveView();
  if (!session.key) {
    show('view-signin');
    $('signin-key').focus();
    return;
  }
  const [section, first, second] = location.hash.replace(/^#\/?/, '').split('/');
  // `#/functions/OWNER/NAME`: another user's function, for an admin.
  const [owner, name] = second ? [first, second] : [null, first];
  if (section === 'users' && state.admin) {
    show('view-users');
    loadUsers();
  } else if (section === 'registries') {
    show('view-registries');
    loadRegistries();
  } else if (section === 'functions' && name) {
    show('view-function');
    openFunction(decodeURIComponent(name), owner && decodeURIComponent(owner));
  } else {
    show('view-functions');
    loadFunctions();
    state.timers.push(setInterval(() => loadFunctions(true), 5000));
  }
}

// ---- functions ----

/**
 * The owner to name in a function's API paths and links: an admin sees
 * every user's functions, whose names may repeat, so theirs always say
 * whose; a user sees only their own.
 */
function ownerOf(f) {
  return state.admin ? f.Owner : null;
}

/** The dashboard link of `f`: `#/functions/NAME`, or OWNER/NAME for an admin. */
function fnHash(f) {
  const owner = ownerOf(f);
  return `#/functions/${owner ? `${encodeURIComponent(owner)}/` : ''}${encodeURIComponent(f.Name)}`;
}

/** What a list shows of `f`'s name: OWNER/NAME for an admin. */
function fnLabel(f) {
  return ownerOf(f) ? `${f.Owner}/${f.Name}` : f.Name;
}

/** Badges for the call counts that are not zero. */
function badges(s) {
  const kids = [];
  for (const [n, what] of [
    [s.Pending, 'pending'],
    [s.Running, 'running'],
    [s.Finished, 'finished'],
    [s.Failed, 'failed'],
  ]) {
    if (n > 0) {
      kids.push(h('span', { class: `badge ${what}`, text: `${n} ${what}` }));
    }
  }
  return kids.length ? h('span', { class: 'badges' }, kids) : h('span', { class: 'hint', text: 'no calls' });
}

/** `…/call/resize/1b4e28ba…` of a call URL: enough to tell URLs apart. */
function shortAddress(a) {
  const m = a.match(/^(.*\/call\/[^/]+\/)([0-9a-f]{8})[0-9a-f-]+$/i);
  return m ? `${m[1]}${m[2]}…` : a;
}

function copyButton(text, what) {
  return h('button', {
    type: 'button',
    class: 'quiet small',
    text: 'Copy',
    'aria-label': `Copy ${what}`,
    onclick: () => navigator.clipboard.writeText(text).then(() => flash(`${what} copied`), showError),
  });
}

/** The list view: every function the key sees, from one request. */
const list = { rows: [], page: 0 };
const PAGE = 25;

async function loadFunctions(quiet = false) {
  const signal = state.view.signal;
  try {
    const rows = await api('GET', '/v1/functions', { signal });
    if (signal.aborted) {
      return;
    }
    list.rows = rows;
    renderList();
    if (rows.length > 0) {
      hostActivity();
    }
    $('functions-empty').hidden = rows.length !== 0;
    $('functions-tools').hidden = rows.length === 0;
    if (rows.length === 0) {
      $('create').open = true;
    }
  } catch (e) {
    if (!quiet) {
      showError(e);
    }
  }
}

function renderList() {
  const q = $('functions-search').value.trim().toLowerCase();
  const sort = $('functions-sort').value;
  const shown = list.rows.filter(
    (f) => !q || fnLabel(f).toLowerCase().includes(q) || f.Image.toLowerCase().includes(q),
  );
  const by = {
    name: (a, b) => fnLabel(a).localeCompare(fnLabel(b)),
    updated: (a, b) => b.Updated.localeCompare(a.Updated),
    running: (a, b) => b.Calls.Running - a.Calls.Running,
    failed: (a, b) => b.Calls.Failed - a.Calls.Failed,
    total: (a, b) => b.Calls.Total - a.Calls.Total,
  }[sort];
  shown.sort((a, b) => by(a, b) || fnLabel(a).localeCompare(fnLabel(b)));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  list.page = Math.min(list.page, pages - 1);
  const first = list.page * PAGE;
  const page = shown.slice(first, first + PAGE);
  $('functions-body').replaceChildren(
    ...page.map((f) =>
      h(
        'tr',
        { 'data-function': fnLabel(f) },
        h('td', { 'data-label': 'Name' }, h('a', { href: fnHash(f), text: fnLabel(f) })),
        h('td', { 'data-label': 'Image', class: 'img' }, h('code', { text: f.Image })),
        h(
          'td',
          { 'data-label': 'Address', class: 'addr' },
          h('code', { text: shortAddress(f.Address), title: f.Address }),
          ' ',
          copyButton(f.Address, `the address of ${f.Name}`),
        ),
        h('td', { 'data-label': 'Calls' }, badges(f.Calls)),
        h('td', { 'data-label': 'Updated', text: f.Updated }),
      ),
    ),
  );
  $('functions-table').hidden = page.length === 0;
  $('functions-count').textContent = q
    ? `${shown.length} of ${list.rows.length} functions match`
    : `${list.rows.length} function${list.rows.length === 1 ? '' : 's'}`;
  $('functions-pager').hidden = pages === 1;
  $('functions-page').textContent = `${first + 1}–${first + page.length} of ${shown.length}`;
  $('functions-prev').disabled = list.page === 0;
  $('functions-next').disabled = list.page >= pages - 1;
}

function turnPage(by) {
  list.page = Math.max(0, list.page + by);
  renderList();
}

async function createFunction(ev) {
  ev.preventDefault();
  const form = ev.target;
  const v = Object.fromEntries(new FormData(form));
  await attempt(async () => {
    const body = {
      Name: v.name.trim(),
      Image: v.image.trim(),
      Command: splitCommand(v.command),
      Env: envLines(v.env),
    };
    if (v.timeout.trim()) {
      body.Timeout = v.timeout.trim();
    }
    if (v.runtime.trim()) {
      body.Runtime = v.runtime.trim();
    }
    if (v.webhook.trim()) {
      body.Webhook = v.webhook.trim();
    }
    if (v.schedule.trim()) {
      body.Schedule = { Expression: v.schedule.trim(), Timezone: v.timezone.trim() || 'UTC' };
    }
    flash(`creating ${body.Name} (the image may be pulled)…`);
    const f = await api('POST', '/v1/functions', { json: body });
    keepSecret(f);
    form.reset();
    $('create').open = false;
    flash(`${f.Name} is created with the address of ${f.Address}`);
    location.hash = fnHash(f);
  });
}

// ---- activity charts (SVG drawn here: no library, nothing from elsewhere) ----

/** The SVG namespace: a name, never fetched. */
const SVG = 'http://www.w3.org/2000/svg';

/** An SVG element with attributes and children. */
function svg(tag, attrs = {}, ...kids) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') {
      el.textContent = v;
    } else {
      el.setAttribute(k, String(v));
    }
  }
  el.append(...kids.flat(Infinity).filter(Boolean));
  return el;
}

function hhmm(time) {
  return time.slice(11, 16);
}

function secs(v) {
  if (v === null || v === undefined) {
    return '—';
  }
  return v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(v < 10 ? 2 : 0)} s`;
}

const CW = 600;
const CH = 140;
const PAD = { l: 56, r: 8, t: 10, b: 22 };

function frame(points, max, unit) {
  const y = (v) => PAD.t + (CH - PAD.t - PAD.b) * (1 - v / max);
  return [
    svg('line', { class: 'axis', x1: PAD.l, y1: y(0), x2: CW - PAD.r, y2: y(0) }),
    svg('line', { class: 'axis', x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: y(0) }),
    svg('text', { class: 'label', x: PAD.l - 4, y: PAD.t + 8, 'text-anchor': 'end', text: unit(max) }),
    svg('text', { class: 'label', x: PAD.l - 4, y: y(0), 'text-anchor': 'end', text: '0' }),
    svg('text', { class: 'label', x: PAD.l, y: CH - 6, text: hhmm(points[0].Time) }),
    svg('text', { class: 'label', x: CW - PAD.r, y: CH - 6, 'text-anchor': 'end', text: hhmm(points[points.length - 1].Time) }),
  ];
}

/** Calls per point: finished and failed stacked. */
function callsChart(a) {
  const pts = a.Points;
  const max = Math.max(1, ...pts.map((p) => p.Finished + p.Failed));
  const w = (CW - PAD.l - PAD.r) / pts.length;
  const hgt = (v) => ((CH - PAD.t - PAD.b) * v) / max;
  const base = CH - PAD.b;
  const bars = [];
  pts.forEach((p, i) => {
    const x = PAD.l + i * w + 0.5;
    const ok = hgt(p.Finished);
    const bad = hgt(p.Failed);
    const tip = `${hhmm(p.Time)}: ${p.Finished} finished, ${p.Failed} failed, ${p.Accepted} accepted`;
    if (p.Finished > 0) {
      bars.push(svg('rect', { class: 'bar-ok', x, y: base - ok, width: Math.max(1, w - 1), height: ok, 'data-count': p.Finished }, svg('title', { text: tip })));
    }
    if (p.Failed > 0) {
      bars.push(svg('rect', { class: 'bar-failed', x, y: base - ok - bad, width: Math.max(1, w - 1), height: bad, 'data-count': p.Failed }, svg('title', { text: tip })));
    }
  });
  const per = a.Step === 60 ? 'minute' : 'quarter hour';
  const t = a.Total;
  return h(
    'figure',
    { class: 'chart' },
    h('h3', { text: `Calls per ${per}` }),
    svg(
      'svg',
      { viewBox: `0 0 ${CW} ${CH}`, role: 'img', 'aria-label': `Calls per ${per}: ${t.Finished} finished and ${t.Failed} failed in the last ${a.Window}` },
      frame(pts, max, (v) => String(v)),
      bars,
    ),
    h(
      'figcaption',
      { class: 'summary hint' },
      h('span', { class: 'legend-ok', text: `${t.Finished} finished` }),
      ' · ',
      h('span', { class: 'legend-failed', text: `${t.Failed} failed` }),
      ` · ${t.Accepted} accepted in the last ${a.Window}`,
    ),
  );
}

/** p50 and p95 run time per point, where calls ended. */
function durationChart(a) {
  const pts = a.Points;
  const max = Math.max(0.001, ...pts.map((p) => p.P95 ?? 0));
  const w = (CW - PAD.l - PAD.r) / pts.length;
  const x = (i) => PAD.l + i * w + w / 2;
  const y = (v) => PAD.t + (CH - PAD.t - PAD.b) * (1 - v / max);
  const line = (key, cls, dot) => {
    let d = '';
    let open = false;
    const dots = [];
    pts.forEach((p, i) => {
      const v = p[key];
      if (v === null || v === undefined) {
        open = false;
        return;
      }
      d += `${open ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
      open = true;
      dots.push(svg('circle', { class: dot, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5 }, svg('title', { text: `${hhmm(p.Time)}: ${key.toLowerCase()} ${secs(v)}` })));
    });
    return [d ? svg('path', { class: cls, d: d.trim() }) : null, dots];
  };
  const t = a.Total;
  return h(
    'figure',
    { class: 'chart' },
    h('h3', { text: 'Run time' }),
    svg(
      'svg',
      { viewBox: `0 0 ${CW} ${CH}`, role: 'img', 'aria-label': `Run time in the last ${a.Window}: p50 ${secs(t.P50)}, p95 ${secs(t.P95)}` },
      frame(pts, max, secs),
      line('P50', 'p50', 'dot50'),
      line('P95', 'p95', 'dot95'),
    ),
    h(
      'figcaption',
      { class: 'summary hint' },
      h('span', { class: 'legend-ok', text: `p50 ${secs(t.P50)}` }),
      ' · ',
      h('span', { class: 'legend-failed', text: `p95 ${secs(t.P95)}` }),
      ` over the last ${a.Window}`,
    ),
  );
}

async function loadActivity(target, path, which) {
  const select = document.querySelector(`.activity-window[data-for=${which}]`);
  const q = `window=${select.value}`;
  const a = await api('GET', `${path}${path.includes('?') ? '&' : '?'}${q}`, { signal: state.view.signal });
  $(target).replaceChildren(callsChart(a), durationChart(a));
}

function hostActivity() {
  return loadActivity('host-charts', '/v1/activity', 'host')
    .then(() => {
      $('host-activity').hidden = false;
    })
    .catch((e) => {
      if (!isAbort(e)) {
        showError(e);
      }
    });
}

function functionActivity() {
  if (!current) {
    return Promise.resolve();
  }
  return loadActivity('fn-charts', fnPath(current.Name, '/activity', ownerOf(current)), 'function').catch((e) => {
    if (!isAbort(e) && !(e instanceof ApiError && e.status === 404)) {
      showError(e);
    }
  });
}

// ---- one function ----

let current = null;

function detail(label, value) {
  return [h('dt', { text: label }), h('dd', {}, value)];
}

function meter(used, budget) {
  return h('span', { class: 'meter-row' }, h('meter', { min: '0', max: String(budget), value: String(used) }), ` ${bytes(used)} / ${bytes(budget)}`);
}

function renderFunction(f, s) {
  current = f;
  $('fn-title').textContent = f.Name;
  const copy = h('button', {
    type: 'button',
    class: 'quiet small',
    text: 'Copy',
    onclick: () => navigator.clipboard.writeText(f.Address).then(() => flash('address copied'), showError),
  });
  $('fn-details').replaceChildren(
    ...detail('Address', [h('code', { id: 'fn-address', class: 'addr', text: f.Address }), ' ', copy]),
    ...detail('Image', h('code', { text: f.Image })),
    ...detail('Image digest', f.ImageDigest ? h('code', { class: 'img', text: f.ImageDigest }) : '(not pinned yet: runs its tag)'),
    ...detail('Command', h('code', { text: f.Command.length ? joinCommand(f.Command) : '(image default)' })),
    ...detail('Environment', f.Env.length ? h('code', { class: 'pre', text: f.Env.join('\n') }) : '—'),
    ...detail('Timeout', f.Timeout ?? 'none'),
    ...detail('Runtime', f.Runtime ?? '(the Engine\'s default)'),
    ...detail('Webhook', webhookText(f.Webhook)),
    ...detail('Schedule', scheduleText(f.Schedule)),
    ...detail('Owner', f.Owner),
    ...detail('Calls', h('span', { id: 'fn-status' }, statusText(s))),
    ...detail('Updated', f.Updated),
    ...detail('Output cache', meter(f.OutputCacheBytes, f.OutputCacheBudget)),
    ...detail('Log cache', meter(f.LogCacheBytes, f.LogCacheBudget)),
  );
  renderExamples(f);
  // A secret just made shows until this function's page is left.
  const box = $('fn-secret');
  if (freshSecret && freshSecret.key === fnHash(f)) {
    $('fn-secret-text').textContent = freshSecret.secret;
    box.dataset.key = freshSecret.key;
    box.hidden = false;
    freshSecret = null;
  } else if (box.dataset.key !== fnHash(f)) {
    $('fn-secret-text').textContent = '';
    box.dataset.key = '';
    box.hidden = true;
  }
}

/** The signing secret a create or update just made: shown on its
 * function's page until the page is left, never fetched again. */
let freshSecret = null;
function keepSecret(f) {
  if (f.WebhookSecret) {
    freshSecret = { key: fnHash(f), secret: f.WebhookSecret };
  }
}

function webhookText(w) {
  if (!w) {
    return '—';
  }
  const where = w.Url ? h('code', { class: 'addr', text: w.Url }) : '(only calls\' own X-Callback-Url)';
  return [where, ` on ${w.On.join(', ')}`];
}

function scheduleText(s) {
  if (!s) {
    return '—';
  }
  return [
    h('code', { text: s.Expression }),
    ` (${s.Timezone})`,
    h('span', { class: 'hint', id: 'fn-next-ticks' }, s.Next.length ? ` next: ${s.Next.join(', ')}` : ''),
  ];
}

/** Ready-to-paste ways to call `f` from a shell, each with a copy button. */
function renderExamples(f) {
  // An admin names the owner (their own functions too: OWNER/NAME always works).
  const cli = `hyperfuncd func call ${fnLabel(f)}`;
  const examples = [
    ['async call (prints the CallId)', `curl --data-binary @payload ${f.Address}`],
    ['sync call (prints the output)', `curl --data-binary @payload ${f.Address}/sync`],
    ['from the CLI', `${cli} < payload`],
    ['from the CLI, waiting for the output', `${cli} --sync < payload`],
  ];
  $('fn-examples-body').replaceChildren(
    ...examples.map(([what, cmd]) =>
      h('div', { class: 'example' }, h('p', { class: 'hint', text: what }), h('code', { class: 'pre', text: cmd }), ' ', copyButton(cmd, `the ${what} command`)),
    ),
  );
}

function statusText(s) {
  return `${s.Total} total: ${s.Pending} pending, ${s.Running} running, ${s.Finished} finished, ${s.Failed} failed`;
}

/** Forgets the function on screen: nothing of it may be acted on. */
function clearFunction() {
  current = null;
  // A secret shown for the last function is gone for good.
  $('fn-secret-text').textContent = '';
  $('fn-secret').dataset.key = '';
  $('fn-secret').hidden = true;
  $('fn-body').hidden = true;
  $('fn-missing').hidden = true;
  $('fn-details').replaceChildren();
  $('edit-form').hidden = true;
  $('call-form').reset();
  payloadMode();
  resetCallResult('');
  $('call-result').hidden = true;
  $('logs').replaceChildren();
  $('logs-state').textContent = '';
  $('logs-callid').value = '';
  $('logs-follow').checked = true;
  $('history-state').value = '';
  $('history-body').replaceChildren();
  $('history-table').hidden = true;
  $('history-pager').hidden = true;
  $('history-empty').textContent = '';
  resetHistory();
}

async function openFunction(name, owner = null) {
  const signal = state.view.signal;
  clearFunction();
  $('fn-title').textContent = name;
  $('fn-loading').hidden = false;
  try {
    const [f, s] = await Promise.all([
      api('GET', fnPath(name, '', owner), { signal }),
      api('GET', fnPath(name, '/status', owner), { signal }),
    ]);
    renderFunction(f, s);
    $('fn-body').hidden = false;
    startLogs();
    loadHistory();
    functionActivity();
    state.timers.push(setInterval(functionActivity, 10000));
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      $('fn-title').textContent = 'Function not found';
      $('fn-missing-text').textContent = `There is no function ${owner ? `${owner}/` : ''}${name} that this key can see.`;
      $('fn-missing').hidden = false;
    } else {
      showError(e);
    }
  } finally {
    if (!signal.aborted) {
      $('fn-loading').hidden = true;
    }
  }
}

async function refreshFunction() {
  if (!current) {
    return;
  }
  const signal = state.view.signal;
  try {
    const [f, s] = await Promise.all([
      api('GET', fnPath(current.Name, '', ownerOf(current)), { signal }),
      api('GET', fnPath(current.Name, '/status', ownerOf(current)), { signal }),
    ]);
    renderFunction(f, s);
  } catch (e) {
    if (!isAbort(e) && !(e instanceof ApiError && e.status === 404)) {
      showError(e);
    }
  }
}

let statusSoon = null;
function refreshSoon() {
  clearTimeout(statusSoon);
  statusSoon = setTimeout(() => {
    refreshFunction();
    functionActivity();
  }, 300);
}

function editFunction() {
  const form = $('edit-form');
  form.elements.image.value = current.Image;
  form.elements.command.value = joinCommand(current.Command);
  form.elements.timeout.value = current.Timeout ?? '';
  form.elements.runtime.value = current.Runtime ?? '';
  form.elements.env.value = current.Env.join('\n');
  form.elements.webhook.value = current.Webhook?.Url ?? '';
  form.elements.schedule.value = current.Schedule?.Expression ?? '';
  form.elements.timezone.value = current.Schedule?.Timezone ?? '';
  form.elements.rotate.checked = false;
  form.hidden = false;
  form.elements.image.focus();
}

async function saveFunction(ev) {
  ev.preventDefault();
  const form = ev.target;
  const v = Object.fromEntries(new FormData(form));
  await attempt(async () => {
    const env = envLines(v.env);
    const keep = new Set(env.map((e) => e.split('=')[0]));
    const body = {
      Command: splitCommand(v.command),
      Env: env,
      UnsetEnv: current.Env.map((e) => e.split('=')[0]).filter((k) => !keep.has(k)),
      Timeout: v.timeout.trim() || 'none',
    };
    // An image sent is resolved again (a new digest if the tag moved):
    // only when it was changed, so saving other fields keeps the digest.
    if (v.image.trim() !== current.Image) {
      body.Image = v.image.trim();
    }
    // The field shows the effective runtime: send it only when changed,
    // so saving does not pin a default.
    if (v.runtime.trim() !== (current.Runtime ?? '')) {
      body.Runtime = v.runtime.trim() || 'default';
    }
    // Webhook and schedule: sent only when changed; emptied, removed.
    const hook = v.webhook.trim();
    if (hook !== (current.Webhook?.Url ?? '')) {
      if (hook) {
        body.Webhook = hook;
      } else {
        body.NoWebhook = true;
      }
    }
    if (v.rotate) {
      body.RotateWebhookSecret = true;
    }
    const expr = v.schedule.trim();
    const zone = v.timezone.trim() || 'UTC';
    if (!expr && current.Schedule) {
      body.NoSchedule = true;
    } else if (expr && (expr !== current.Schedule?.Expression || zone !== current.Schedule?.Timezone)) {
      body.Schedule = { Expression: expr, Timezone: zone };
    }
    const f = await api('PATCH', fnPath(current.Name, '', ownerOf(current)), { json: body });
    keepSecret(f);
    form.hidden = true;
    flash(`${f.Name} is updated`);
    await refreshFunction();
  });
}

async function newUrl() {
  const name = current.Name;
  const owner = ownerOf(current);
  if (!(await confirmDialog(`Give ${name} a new URL? The current one stops working at once.`, 'New URL'))) {
    return;
  }
  await attempt(async () => {
    const f = await api('PATCH', fnPath(name, '', owner), { json: { Refresh: true } });
    flash(`${name} has the address of ${f.Address}`);
    await refreshFunction();
  });
}

async function removeFunction() {
  const name = current.Name;
  const owner = ownerOf(current);
  const question = `Remove ${name}? Its queued calls are cancelled, its running calls are killed, and its outputs and logs are deleted.`;
  if (!(await confirmDialog(question, 'Remove'))) {
    return;
  }
  await attempt(async () => {
    leaveView();
    await api('DELETE', fnPath(name, '?force=true', owner));
    current = null;
    flash(`${name} is removed`);
    location.hash = '#/functions';
  });
}

// ---- calls ----

function payloadMode() {
  const file = $('call-form').elements.mode.value === 'file';
  $('payload-text-label').hidden = file;
  $('payload-file-label').hidden = !file;
}

function showOutput(data) {
  const text = new TextDecoder('utf-8', { fatal: false }).decode(data);
  const binary = text.includes('\uFFFD') || /[\0-\x08\x0E-\x1F]/.test(text);
  $('call-output').textContent = binary ? '(binary output: use Download)' : text;
  $('call-output-size').textContent = bytes(data.length);
  const url = URL.createObjectURL(new Blob([data], { type: 'application/octet-stream' }));
  state.blobs.push(url);
  $('call-download').href = url;
  $('call-download').download = `${$('call-id').textContent || current.Name}.out`;
  $('call-output-box').hidden = false;
  // The server deleted it as it answered: there is nothing more to get.
  $('call-wait').hidden = true;
}

function showFailure(e) {
  const b = e instanceof ApiError ? e.body : null;
  let text = e instanceof ApiError ? `${e.status} ${e.code}: ${e.message}` : String(e);
  if (b && b.ExitCode !== undefined && b.ExitCode !== null && !text.includes(`exit code ${b.ExitCode}`)) {
    text += ` (exit code ${b.ExitCode})`;
  }
  if (b && b.ShortStderr) {
    text += `\nstderr: ${b.ShortStderr}`;
  }
  $('call-failed').textContent = text;
  $('call-failed').hidden = false;
  $('call-state').textContent = 'FAILED';
  $('call-wait').hidden = true;
}

function resetCallResult(id) {
  watching.abort();
  clearInterval(watchTimer);
  $('call-timer').textContent = '';
  $('call-result').hidden = false;
  $('call-id').textContent = id;
  $('call-state').textContent = '';
  $('call-failed').hidden = true;
  $('call-output-box').hidden = true;
  $('call-output').textContent = '';
  $('call-wait').hidden = id === '';
}

async function callFunction(ev) {
  ev.preventDefault();
  const form = ev.target;
  const name = current.Name;
  const file = form.elements.mode.value === 'file';
  const payload = file ? form.elements.file.files[0] ?? new Blob([]) : form.elements.text.value;
  const sync = form.elements.sync.checked;
  const signal = state.view.signal;
  clearError();
  $('call-submit').disabled = true;
  try {
    const r = await api('POST', fnPath(name, sync ? '/call?sync=true' : '/call', ownerOf(current)), {
      raw: true,
      body: payload,
      signal,
    });
    if (sync) {
      resetCallResult(r.headers.get('Hyperfuncd-Call-Id') ?? '');
      $('call-wait').hidden = true;
      if (r.ok) {
        $('call-state').textContent = 'FINISHED';
        showOutput(new Uint8Array(await r.arrayBuffer()));
      } else {
        const e = await errorOf(r);
        if (e.body && e.body.CallId) {
          $('call-id').textContent = e.body.CallId;
        }
        showFailure(e);
      }
      $('call-result').focus();
      historyNow();
      return;
    }
    if (!r.ok) {
      throw await errorOf(r);
    }
    const { CallId } = await r.json();
    resetCallResult(CallId);
    $('call-state').textContent = 'ACCEPTED';
    $('call-result').focus();
    historyNow();
    watchCall(CallId);
  } catch (e) {
    showError(e);
  } finally {
    $('call-submit').disabled = false;
  }
}

// The call on screen, watched until it ends: its state from
// `GET /v1/calls/ID/events` (or sooner from the function's log stream), a
// running timer, and its output fetched as soon as it is FINISHED.
let watching = new AbortController();
let watchTimer = null;
const ENDED = new Set(['FINISHED', 'FAILED']);

function callShown() {
  return $('call-id').textContent;
}

/** Shows `st` for the watched call; on an end, fetches the outcome. */
function callState(id, st, since) {
  if (callShown() !== id || ENDED.has($('call-state').textContent)) {
    return;
  }
  $('call-state').textContent = st;
  if (st === 'RUNNING' && since.running === null) {
    since.running = performance.now();
  }
  if (ENDED.has(st)) {
    watching.abort();
    clearInterval(watchTimer);
    const ran = since.running === null ? null : (performance.now() - since.running) / 1000;
    $('call-timer').textContent = ran === null ? '' : `ran about ${ran.toFixed(1)} s`;
    getOutput();
    historyNow();
  }
}

async function watchCall(id) {
  watching.abort();
  watching = new AbortController();
  const ctl = watching;
  state.view.signal.addEventListener('abort', () => ctl.abort());
  const since = { accepted: performance.now(), running: null };
  watching.since = since;
  clearInterval(watchTimer);
  watchTimer = setInterval(() => {
    const t0 = since.running ?? since.accepted;
    const what = since.running === null ? 'waiting' : 'running';
    $('call-timer').textContent = `${what} ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  }, 200);
  $('call-wait').hidden = true;
  // The call's own event stream (`/v1/calls/ID/events`), again after the
  // server ends it early (its `max_wait`); the log stream helps too.
  while (!ctl.signal.aborted && !ENDED.has($('call-state').textContent)) {
    try {
      await streamEvents(`/v1/calls/${encodeURIComponent(id)}/events`, (name, c) => {
        if (name === 'state') {
          callState(id, c.State, since);
        }
      }, ctl.signal);
    } catch (e) {
      if (!isAbort(e)) {
        showError(e);
        clearInterval(watchTimer);
        $('call-wait').hidden = false;
      }
      return;
    }
  }
}

/** A log event of the function: moves the watched call's state on at once. */
function callEvent(e) {
  const id = callShown();
  if (e.CallId === id && !watching.signal.aborted && watching.since) {
    const st = { RUNNING: 'RUNNING', FINISHED: 'FINISHED', FAILED: 'FAILED' }[e.Event];
    if (st) {
      callState(id, st, watching.since);
    }
  }
}

async function getOutput() {
  const id = $('call-id').textContent;
  const signal = state.view.signal;
  $('call-wait').disabled = true;
  try {
    const data = await waitOutput(id, (s) => {
      $('call-state').textContent = s;
    }, signal);
    $('call-state').textContent = 'FINISHED';
    showOutput(data);
  } catch (e) {
    if (e instanceof ApiError && e.code === 'call_failed') {
      showFailure(e);
    } else if (e instanceof ApiError && e.code === 'output_gone') {
      $('call-failed').textContent = e.message;
      $('call-failed').hidden = false;
      $('call-wait').hidden = true;
    } else {
      showError(e);
    }
  } finally {
    $('call-wait').disabled = false;
  }
}

// ---- call history ----

const HISTORY_PAGE = 20;
/** The history's pages seen so far: the cursor each one started from
 * (null: the newest), the next one's, and the call whose detail is shown. */
const calls = { starts: [null], page: 0, next: null, shownId: null };

function historyPath(start) {
  const q = new URLSearchParams({ limit: String(HISTORY_PAGE) });
  const st = $('history-state').value;
  if (st) {
    q.set('state', st);
  }
  if (start) {
    q.set('cursor', start);
  }
  const owner = ownerOf(current);
  if (owner) {
    q.set('owner', owner);
  }
  return `/v1/functions/${encodeURIComponent(current.Name)}/calls?${q}`;
}

function msText(ms) {
  if (ms === null || ms === undefined) {
    return '';
  }
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(ms < 60000 ? 1 : 0)} s`;
}

function stateBadge(st) {
  return h('span', { class: `badge ${st.toLowerCase()}`, text: st });
}

/** Shows the history page `calls.page`, from the server. */
async function loadHistory() {
  if (!current) {
    return;
  }
  const signal = state.view.signal;
  const f = current;
  try {
    const p = await api('GET', historyPath(calls.starts[calls.page]), { signal });
    if (current !== f) {
      return;
    }
    calls.next = p.Cursor ?? null;
    $('history-body').replaceChildren(
      ...p.Calls.map((c) =>
        h(
          'tr',
          { 'data-call': c.CallId },
          h(
            'td',
            { 'data-label': 'Call id' },
            h('button', {
              type: 'button',
              class: 'quiet small mono',
              text: c.CallId,
              'aria-label': `Details of call ${c.CallId}`,
              onclick: () => openCall(c.CallId),
            }),
          ),
          h('td', { 'data-label': 'State' }, stateBadge(c.State)),
          h('td', { 'data-label': 'Accepted', text: c.Created }),
          h('td', { 'data-label': 'Duration', text: msText(c.DurationMs) }),
          h('td', { 'data-label': 'Exit', text: c.ExitCode ?? '' }),
          h('td', { 'data-label': 'Message', class: 'msg', text: c.Message ?? '' }),
        ),
      ),
    );
    $('history-table').hidden = p.Calls.length === 0;
    const first = calls.page * HISTORY_PAGE;
    $('history-empty').textContent = p.Calls.length
      ? `calls ${first + 1}–${first + p.Calls.length}${calls.next ? '' : ' (the oldest kept)'}`
      : calls.page === 0 && !calls.next
        ? 'No calls.'
        : 'No calls on this page.';
    $('history-pager').hidden = calls.page === 0 && !calls.next;
    $('history-page').textContent = `page ${calls.page + 1}`;
    $('history-newer').disabled = calls.page === 0;
    $('history-older').disabled = !calls.next;
  } catch (e) {
    if (!isAbort(e)) {
      showError(e);
    }
  }
}

/** A call of this page began or ended: the newest page shows it. */
function historyNow() {
  if (calls.page === 0) {
    loadHistory();
  }
}

function resetHistory() {
  calls.starts = [null];
  calls.page = 0;
  calls.next = null;
  closeCall();
}

function turnHistory(by) {
  if (by > 0 && calls.next) {
    calls.starts[calls.page + 1] = calls.next;
    calls.page += 1;
  } else if (by < 0 && calls.page > 0) {
    calls.page -= 1;
  }
  loadHistory();
}

function closeCall() {
  calls.shownId = null;
  $('call-detail').hidden = true;
  $('cd-details').replaceChildren();
  $('cd-failed').hidden = true;
  $('cd-output-text').hidden = true;
  $('cd-output-text').textContent = '';
}

/** Shows one call's record (`GET /v1/calls/ID`) under the history. */
async function openCall(id) {
  const signal = state.view.signal;
  try {
    const c = await api('GET', `/v1/calls/${encodeURIComponent(id)}`, { signal });
    closeCall();
    calls.shownId = id;
    $('cd-id').textContent = c.CallId;
    $('cd-details').replaceChildren(
      ...detail('State', stateBadge(c.State)),
      ...detail('Accepted', c.Created),
      ...detail('Started', c.Started ?? '—'),
      ...detail('Ended', c.Finished ?? '—'),
      ...detail('Duration', msText(c.DurationMs) || '—'),
      ...detail('Exit code', c.ExitCode ?? '—'),
      ...detail('Message', c.Message ?? '—'),
      ...detail('STDIN', bytes(c.StdinBytes)),
      ...detail('STDOUT', c.State === 'FINISHED' ? bytes(c.StdoutBytes) : '—'),
      ...detail('STDERR (start)', c.ShortStderr ? h('code', { class: 'pre', text: c.ShortStderr }) : '—'),
      ...detail('Image', c.ImageDigest ? h('code', { class: 'img', text: c.ImageDigest }) : '—'),
      ...(c.Webhook ? detail('Webhook', deliveryText(c.Webhook)) : []),
    );
    $('cd-redeliver').hidden = !c.Webhook;
    $('cd-output').hidden = c.State !== 'FINISHED';
    $('call-detail').hidden = false;
    $('call-detail').focus();
  } catch (e) {
    if (!isAbort(e)) {
      showError(e);
    }
  }
}

/** A call's webhook delivery: where, how it went, what is next. */
function deliveryText(d) {
  const tries = `${d.Attempts} attempt${d.Attempts === 1 ? '' : 's'}`;
  const last = d.LastStatus ? `, last answered ${d.LastStatus}` : '';
  const why = d.LastError ? `: ${d.LastError}` : '';
  const next = d.NextAttempt ? `; next at ${d.NextAttempt}` : '';
  const look = { DELIVERED: 'finished', GAVE_UP: 'failed' }[d.State] ?? 'pending';
  return h('span', { id: 'cd-webhook' },
    h('span', { class: `badge ${look}`, text: d.State }),
    ` ${tries}${last}${why}${next} `,
    h('code', { class: 'addr', text: d.Url }));
}

/** Sends the shown call's webhook delivery again (a new retry window). */
async function redeliver() {
  const id = calls.shownId;
  if (!id) {
    return;
  }
  await attempt(async () => {
    await api('POST', `/v1/calls/${encodeURIComponent(id)}/redeliver`);
    flash('the webhook delivery is sent again');
    await openCall(id);
  });
}

/** Fetches the shown call's output, which deletes it on the server. */
async function callDetailOutput() {
  const id = calls.shownId;
  if (!id) {
    return;
  }
  const signal = state.view.signal;
  $('cd-output').disabled = true;
  try {
    const r = await api('GET', `/v1/calls/${encodeURIComponent(id)}/output`, { raw: true, signal });
    if (r.status !== 200) {
      throw await errorOf(r);
    }
    const data = new Uint8Array(await r.arrayBuffer());
    $('cd-output-text').textContent = new TextDecoder().decode(data);
    $('cd-output-text').hidden = false;
    $('cd-output').hidden = true;
  } catch (e) {
    if (e instanceof ApiError && e.code === 'output_gone') {
      $('cd-failed').textContent = `Output already fetched: ${e.message} (an output is fetched once, then deleted on the server).`;
      $('cd-failed').hidden = false;
      $('cd-output').hidden = true;
    } else if (e instanceof ApiError) {
      $('cd-failed').textContent = `${e.status} ${e.code}: ${e.message}`;
      $('cd-failed').hidden = false;
      $('cd-output').hidden = true;
    } else if (!isAbort(e)) {
      showError(e);
    }
  } finally {
    $('cd-output').disabled = false;
  }
}

// ---- logs ----

let logs = new AbortController();

/** The `func logs` line of an event. */
function logLine(e) {
  let s = `${e.Time} [${e.Event}] CallId: ${e.CallId}`;
  if (e.Event === 'CALL') {
    s += `, ShortStdin: ${e.ShortStdin}`;
  } else if (e.Event === 'FINISHED') {
    s += `, ShortStdout: ${e.ShortStdout}, ShortStderr: ${e.ShortStderr}`;
  } else if (e.Event === 'FAILED') {
    s += `, ShortStdout: ${e.ShortStdout}, ShortStderr: ${e.ShortStderr}, Message: ${e.Message}`;
  }
  return s.replace(/[\r\n]/g, ' ');
}

function startLogs() {
  logs.abort();
  logs = new AbortController();
  const ctl = logs;
  state.view.signal.addEventListener('abort', () => ctl.abort());
  const name = current.Name;
  const callid = $('logs-callid').value.trim();
  const follow = $('logs-follow').checked;
  const q = new URLSearchParams({ tail: '200' });
  if (callid) {
    q.set('callid', callid);
  }
  if (follow) {
    q.set('follow', '1');
  }
  const list = $('logs');
  list.replaceChildren();
  $('logs-state').textContent = follow ? 'following…' : '';
  streamLines(
    fnPath(name, `/logs?${q}`, ownerOf(current)),
    (e) => {
      // Newest first: each event goes on top.
      list.prepend(h('li', { class: `ev ev-${e.Event.toLowerCase()}`, 'data-event': e.Event, 'data-callid': e.CallId }, logLine(e)));
      while (list.childElementCount > 500) {
        list.lastElementChild.remove();
      }
      callEvent(e);
      refreshSoon();
    },
    ctl.signal,
  ).then(
    () => {
      if (!ctl.signal.aborted) {
        $('logs-state').textContent = follow ? 'the log stream ended' : '';
      }
    },
    (e) => {
      if (!isAbort(e)) {
        $('logs-state').textContent = '';
        showError(e);
      }
    },
  );
}

// ---- users (admin) ----

async function loadUsers() {
  const signal = state.view.signal;
  try {
    const [users, fns] = await Promise.all([
      api('GET', '/v1/users', { signal }),
      api('GET', '/v1/functions', { signal }),
    ]);
    // Running and queued per user: the sum over the functions they own.
    const load = new Map();
    for (const f of fns) {
      const s = f.Calls;
      const l = load.get(f.Owner) ?? { running: 0, queued: 0 };
      l.running += s.Running;
      l.queued += s.Pending;
      load.set(f.Owner, l);
    }
    users.sort((a, b) => a.Name.localeCompare(b.Name));
    $('users-body').replaceChildren(...users.map((u) => userRow(u, load.get(u.Name) ?? { running: 0, queued: 0 })));
  } catch (e) {
    showError(e);
  }
}

function userRow(u, l) {
  const quota = h('input', {
    type: 'number',
    min: '1',
    value: String(u.MaxConcurrency),
    class: 'quota',
    'aria-label': `Max concurrency of ${u.Name}`,
  });
  const save = h('button', {
    type: 'button',
    class: 'small',
    text: 'Set',
    onclick: () => setQuota(u.Name, quota.value),
  });
  return h(
    'tr',
    { 'data-user': u.Name },
    h('td', { 'data-label': 'Name' }, h('strong', { text: u.Name })),
    h('td', { 'data-label': 'Role', text: u.Admin ? 'admin' : 'user' }),
    h('td', { 'data-label': 'Quota' }, h('span', { class: 'inline' }, quota, save)),
    h('td', { 'data-label': 'Budgets', class: 'num', text: budgets(u) }),
    h('td', { 'data-label': 'Running', class: 'num', text: String(l.running) }),
    h('td', { 'data-label': 'Queued', class: 'num', text: String(l.queued) }),
    h('td', { 'data-label': 'Created', text: u.Created }),
    h(
      'td',
      { 'data-label': 'Actions' },
      h(
        'span',
        { class: 'inline' },
        h('button', { type: 'button', class: 'small', 'data-action': 'rotate', text: 'Rotate key', onclick: () => rotateKey(u.Name) }),
        h('button', { type: 'button', class: 'small danger', text: 'Remove', onclick: () => removeUser(u.Name) }),
      ),
    ),
  );
}

/** `10000 queued, 1.0 GiB, 100 fns, 100/s, 1 reserved slot` */
function budgets(u) {
  const reserved = u.Reserved ? `, ${u.Reserved} reserved slot${u.Reserved === 1 ? '' : 's'}` : '';
  return `${u.MaxQueued} queued, ${bytes(u.MaxQueuedBytes)}, ${u.MaxFunctions} fns, ${u.Rate}/s${reserved}`;
}

function showKey(user, key) {
  $('newkey-user').textContent = user;
  $('newkey-value').textContent = key;
  $('newkey').hidden = false;
  $('newkey-value').focus();
}

function hideKey() {
  $('newkey-value').textContent = '';
  $('newkey-user').textContent = '';
  $('newkey').hidden = true;
}

async function addUser(ev) {
  ev.preventDefault();
  const form = ev.target;
  const v = Object.fromEntries(new FormData(form));
  await attempt(async () => {
    const body = { Name: v.name.trim(), Admin: v.admin === 'on' };
    if (v.max) {
      body.MaxConcurrency = Number(v.max);
    }
    const u = await api('POST', '/v1/users', { json: body });
    form.reset();
    $('adduser').open = false;
    showKey(u.Name, u.Key);
    await loadUsers();
  });
}

async function setQuota(name, value) {
  await attempt(async () => {
    await api('PATCH', `/v1/users/${encodeURIComponent(name)}`, { json: { MaxConcurrency: Number(value) } });
    flash(`${name} may run ${value} call(s) at once`);
    await loadUsers();
  });
}

async function rotateKey(name) {
  const own = name === state.me;
  const question = own
    ? `This is your own key: the one this tab is signed in with. Give ${name} a new key? The current one stops working at once, in every other tab and script that uses it; this tab switches to the new one, which is shown once — save it.`
    : `Give ${name} a new key? The current one stops working at once, in every tab and script that uses it.`;
  if (!(await confirmDialog(question, own ? 'Rotate my key' : 'Rotate key'))) {
    return;
  }
  await attempt(async () => {
    const u = await api('PATCH', `/v1/users/${encodeURIComponent(name)}`, { json: { RotateKey: true } });
    if (own) {
      // The old key no longer works: carry on with the new one.
      session.set(u.Key);
      flash('Your key is rotated: this tab now uses the new one. Save it before you sign out.');
    }
    showKey(u.Name, u.Key);
  });
}

async function removeUser(name) {
  if (!(await confirmDialog(`Remove user ${name}? Their key stops working.`, 'Remove'))) {
    return;
  }
  await attempt(async () => {
    await api('DELETE', `/v1/users/${encodeURIComponent(name)}`);
    flash(`${name} is removed`);
    await loadUsers();
  });
}

// ---- registry logins (the caller's own) ----

async function loadRegistries() {
  const signal = state.view.signal;
  try {
    const logins = await api('GET', '/v1/registries', { signal });
    $('registries-body').replaceChildren(
      ...logins.map((l) =>
        h(
          'tr',
          {},
          h('td', { text: l.Host }),
          h('td', { text: l.Username }),
          h('td', { text: l.Created }),
          h(
            'td',
            {},
            h('button', {
              type: 'button',
              class: 'danger',
              text: 'Remove',
              'aria-label': `Remove the login to ${l.Host}`,
              onclick: () => registryLogout(l.Host),
            }),
          ),
        ),
      ),
    );
  } catch (e) {
    showError(e);
  }
}

async function registryLogin(ev) {
  ev.preventDefault();
  const form = ev.target;
  const v = Object.fromEntries(new FormData(form));
  const ok = await attempt(async () => {
    const l = await api('PUT', `/v1/registries/${encodeURIComponent(v.host.trim())}`, {
      json: { Username: v.username.trim(), Password: v.password },
    });
    $('reglogin').open = false;
    flash(`logged in to ${l.Host} as ${l.Username}`);
    await loadRegistries();
  });
  // The password leaves the page whatever the answer.
  form.elements.password.value = '';
  if (ok) {
    form.reset();
  }
}

async function registryLogout(host) {
  if (!(await confirmDialog(`Remove your login to ${host}?`, 'Remove'))) {
    return;
  }
  await attempt(async () => {
    await api('DELETE', `/v1/registries/${encodeURIComponent(host)}`);
    flash(`the login to ${host} is removed`);
    await loadRegistries();
  });
}

// ---- wiring ----

function wire() {
  // The router owns the hash: the skip link moves focus without changing it.
  $('skip').addEventListener('click', (ev) => {
    ev.preventDefault();
    $('main').focus();
  });
  $('signin-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', signOut);
  $('error-close').addEventListener('click', clearError);
  $('functions-refresh').addEventListener('click', () => loadFunctions());
  $('functions-search').addEventListener('input', () => {
    list.page = 0;
    renderList();
  });
  $('functions-sort').addEventListener('change', renderList);
  for (const sel of document.querySelectorAll('.activity-window')) {
    sel.addEventListener('change', () => (sel.dataset.for === 'host' ? hostActivity() : functionActivity()));
  }
  $('functions-prev').addEventListener('click', () => turnPage(-1));
  $('functions-next').addEventListener('click', () => turnPage(1));
  $('create-form').addEventListener('submit', createFunction);
  $('fn-edit').addEventListener('click', editFunction);
  $('edit-cancel').addEventListener('click', () => {
    $('edit-form').hidden = true;
  });
  $('edit-form').addEventListener('submit', saveFunction);
  $('fn-refresh-url').addEventListener('click', newUrl);
  $('fn-remove').addEventListener('click', removeFunction);
  for (const r of $('call-form').elements.mode) {
    r.addEventListener('change', payloadMode);
  }
  $('call-form').addEventListener('submit', callFunction);
  $('call-wait').addEventListener('click', getOutput);
  $('logs-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    startLogs();
  });
  $('logs-follow').addEventListener('change', startLogs);
  $('history-state').addEventListener('change', () => {
    resetHistory();
    loadHistory();
  });
  $('history-refresh').addEventListener('click', () => {
    resetHistory();
    loadHistory();
  });
  $('history-newer').addEventListener('click', () => turnHistory(-1));
  $('history-older').addEventListener('click', () => turnHistory(1));
  $('cd-close').addEventListener('click', closeCall);
  $('cd-redeliver').addEventListener('click', redeliver);
  $('fn-secret-copy').addEventListener('click', () =>
    navigator.clipboard.writeText($('fn-secret-text').textContent).then(() => flash('secret copied'), showError));
  $('cd-output').addEventListener('click', callDetailOutput);
  $('users-refresh').addEventListener('click', loadUsers);
  $('adduser-form').addEventListener('submit', addUser);
  $('newkey-done').addEventListener('click', hideKey);
  $('registries-refresh').addEventListener('click', loadRegistries);
  $('reglogin-form').addEventListener('submit', registryLogin);
  window.addEventListener('hashchange', () => {
    hideKey();
    route();
    // Focus follows the route to the new view's heading, as a page load would.
    const heading = document.querySelector('section:not([hidden]) h1');
    if (heading && session.key) {
      heading.tabIndex = -1;
      heading.focus({ preventScroll: true });
    }
  });
}

async function start() {
  wire();
  const key = session.key;
  if (key) {
    try {
      state.admin = await checkKey(key);
      signedIn();
    } catch (e) {
      session.clear();
      showError(e);
    }
  }
  route();
}

start();
