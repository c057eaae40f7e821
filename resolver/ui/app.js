// Waymark's registry view. Follows the change stream (/v1/waymark/events, server-sent
// events) and, after each event, fetches the whole picture once (/ui/api/snapshot, encoded
// once per change index on the server): one stream and one fetch per change per open page,
// however many services there are. Every value from the registry goes into the page as text.
'use strict';

const TOKEN_KEY = 'waymark-token';
const $ = (id) => document.getElementById(id);

const state = {
  snapshot: null,
  events: null,
  fetching: false,
  again: false,
  open: new Set(), // services the operator expanded
  closed: new Set(), // services the operator collapsed
  fetchedAt: 0,
  maintenanceFor: null, // the instance whose reason is being typed
  pendingRender: false,
};

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: 'Bearer ' + t } : {};
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (v === false && !k.startsWith('data-')) continue; // a boolean attribute left off
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true && !k.startsWith('data-') ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function notice(text, error) {
  const n = $('notice');
  n.textContent = text;
  n.classList.toggle('error', !!error);
  n.hidden = !text;
}

function setLive(s, text) {
  const l = $('live');
  l.dataset.state = s;
  l.textContent = text;
}

// --- data -------------------------------------------------------------------------------

async function refresh() {
  if (state.fetching) {
    state.again = true;
    return;
  }
  state.fetching = true;
  try {
    do {
      state.again = false;
      const resp = await fetch('api/snapshot', { headers: authHeaders(), cache: 'no-store' });
      if (resp.status === 403) {
        notice('This registry needs the API token for reads: enter it above.', true);
        setLive('down', 'token needed');
        return;
      }
      if (!resp.ok) throw new Error('snapshot: HTTP ' + resp.status);
      state.snapshot = await resp.json();
      state.fetchedAt = Date.now();
      render();
      follow();
    } while (state.again);
  } catch (e) {
    setLive('down', 'unreachable');
    notice('Cannot reach the registry: ' + e.message, true);
  } finally {
    state.fetching = false;
  }
}

// One EventSource for the page's life; it resumes from its last event ID by itself.
function follow() {
  if (state.events) return;
  const reg = state.snapshot.registry;
  let url = '/v1/waymark/events?index=' + state.snapshot.index;
  if (reg.token_for_reads && token()) url += '&token=' + encodeURIComponent(token());
  const es = new EventSource(url);
  state.events = es;
  es.addEventListener('open', () => {
    setLive('live', 'live');
    if ($('notice').classList.contains('error')) notice('');
    refresh();
  });
  es.addEventListener('changes', () => refresh());
  es.addEventListener('error', () => setLive('down', 'reconnecting'));
}

// --- actions ----------------------------------------------------------------------------

async function act(what, path) {
  try {
    const resp = await fetch(path, { method: 'PUT', headers: authHeaders() });
    if (resp.status === 403) {
      notice(what + ': refused, the API token is missing or wrong (enter it above).', true);
      return false;
    }
    if (!resp.ok) {
      let msg = 'HTTP ' + resp.status;
      try { msg = (await resp.json()).error || msg; } catch (_) { /* not JSON */ }
      notice(what + ': ' + msg, true);
      return false;
    }
    notice(what + ': done.');
    return true;
  } catch (e) {
    notice(what + ': ' + e.message, true);
    return false;
  }
}

function maintenance(id, enable, reason) {
  let path = '/v1/agent/service/maintenance/' + encodeURIComponent(id) + '?enable=' + enable;
  if (enable && reason) path += '&reason=' + encodeURIComponent(reason);
  return act((enable ? 'Maintenance on for ' : 'Maintenance off for ') + id, path);
}

function deregister(id) {
  return act('Deregistered ' + id, '/v1/agent/service/deregister/' + encodeURIComponent(id));
}

// --- rendering --------------------------------------------------------------------------

function fmtAge(ms) {
  if (ms < 1000) return ms + ' ms';
  const s = ms / 1000;
  if (s < 120) return s.toFixed(1) + ' s';
  return Math.round(s / 60) + ' min';
}

function renderHeader(snap) {
  const reg = snap.registry;
  $('index').textContent = snap.index;
  $('source').textContent = reg.source + (reg.connected === false ? ' (unreachable)' : '');
  $('zone').textContent = reg.zone;
  $('age-wrap').hidden = reg.age_ms === undefined;
  tickAge();
  const p = $('problems');
  p.textContent = reg.problems.join(' · ');
  p.hidden = reg.problems.length === 0;
}

function tickAge() {
  const snap = state.snapshot;
  if (!snap || snap.registry.age_ms === undefined) return;
  $('age').textContent = fmtAge(snap.registry.age_ms + (Date.now() - state.fetchedAt));
}

function instanceLabel(i) {
  if (i.maintenance !== null) return 'maintenance';
  if (i.draining) return 'draining';
  return i.health;
}

function matches(svc, q) {
  if (!q) return true;
  const hay = [svc.name, svc.dns.name];
  for (const i of svc.instances) hay.push(i.id, i.address, ...i.tags);
  return hay.some((s) => s.toLowerCase().includes(q));
}

function render() {
  const snap = state.snapshot;
  if (!snap) return;
  renderHeader(snap);
  // Typing a maintenance reason: the list waits, so the field keeps its text and focus.
  const active = document.activeElement;
  if (active && active.tagName === 'INPUT' && $('services').contains(active)) {
    state.pendingRender = true;
    return;
  }
  state.pendingRender = false;
  const services = snap.services;
  const instances = services.reduce((n, s) => n + s.total, 0);
  const notServing = services.reduce((n, s) => n + (s.total - s.healthy), 0);
  const down = services.filter((s) => s.glance === 'down').length;
  $('totals').textContent =
    services.length + ' services · ' + instances + ' instances · ' +
    notServing + ' not answered · ' + down + ' services down';
  const q = $('filter').value.trim().toLowerCase();
  const list = services.filter((s) => matches(s, q));
  const root = $('services');
  root.replaceChildren(
    ...(list.length
      ? list.map((s) => serviceCard(s, snap.registry))
      : [el('div', { class: 'empty', text: services.length ? 'No service matches.' : 'No service is registered.' })]),
  );
}

function serviceCard(s, reg) {
  // Open by default when something is wrong, unless the operator closed it.
  const open = state.open.has(s.name) || (s.glance !== 'healthy' && !state.closed.has(s.name));
  const card = el('details', {
    class: 'card',
    open,
    'data-service': s.name,
    'data-glance': s.glance,
    'data-healthy': s.healthy,
    'data-total': s.total,
  });
  card.addEventListener('toggle', () => {
    if (card.open) { state.open.add(s.name); state.closed.delete(s.name); }
    else { state.closed.add(s.name); state.open.delete(s.name); }
  });
  const summary = el('summary', {},
    el('span', { class: 'dot ' + s.glance, title: s.glance }),
    el('span', { class: 'name', text: s.name }),
    el('span', { class: 'count', text: s.healthy + '/' + s.total + ' healthy' }),
    el('span', { class: 'pill ' + s.glance, text: s.glance }),
    el('code', { class: 'muted', text: s.dns.name }),
    s.dns.vip ? el('span', { class: 'chip mono', text: 'VIP ' + s.dns.vip }) : null,
  );
  const names = el('dl', { class: 'names' },
    el('dt', { text: 'A, AAAA, SRV' }), el('dd', {}, el('code', { text: s.dns.name }),
      s.dns.vip ? el('span', { class: 'muted', text: '  → VIP ' + s.dns.vip + ' on hosts with a forwarder' }) : null),
    el('dt', { text: 'SRV (RFC 2782)' }), el('dd', {}, el('code', { text: s.dns.srv })),
    s.dns.tags.length ? [
      el('dt', { text: 'tag subsets' }),
      el('dd', {}, s.dns.tags.map((t) => el('span', { class: 'chip mono', text: t.name + (t.vip ? ' → ' + t.vip : '') }))),
    ] : null,
    s.dns.consul ? [el('dt', { text: 'Consul name' }), el('dd', {}, el('code', { text: s.dns.consul }))] : null,
  );
  const table = el('table', {},
    el('thead', {}, el('tr', {},
      ['Instance', 'Address', 'Tags and metadata', 'Checks', reg.source === 'etcd' ? 'Node' : null, 'Actions']
        .filter((h) => h !== null).map((h) => el('th', { text: h })))),
    el('tbody', {}, s.instances.map((i) => instanceRow(i, reg))),
  );
  card.append(summary, el('div', { class: 'body' }, names, table));
  return card;
}

function instanceRow(i, reg) {
  const label = instanceLabel(i);
  const cls = label === 'draining' ? 'maintenance' : label;
  const row = el('tr', {
    class: (i.serving ? '' : 'not-serving ') + cls,
    'data-instance': i.id,
    'data-health': i.health,
    'data-serving': i.serving,
    'data-maintenance': i.maintenance !== null,
  });
  const checks = i.checks.length
    ? el('ul', { class: 'checks' }, i.checks.map((c) => el('li', { 'data-check': c.id, 'data-status': c.status },
      el('span', { class: 'dot ' + c.status, title: c.status }),
      el('span', {}, el('span', { text: c.name }), el('span', { class: 'muted', text: ' (' + c.kind + ')' }),
        c.output ? el('div', { class: 'output mono', text: c.output }) : null,
        c.notes ? el('div', { class: 'output', text: c.notes }) : null))))
    : el('span', { class: 'muted', text: 'no checks (passing)' });
  const cells = [
    el('td', {},
      el('div', {}, el('span', { class: 'pill ' + cls, text: label }), ' ', el('b', { text: i.id })),
      el('div', { class: 'mono muted dns-name', text: i.dns }),
      i.maintenance !== null ? el('div', { class: 'reason', text: 'maintenance: ' + i.maintenance }) : null),
    el('td', { class: 'mono', text: i.address + ':' + i.port }),
    el('td', {},
      i.tags.map((t) => el('span', { class: 'chip', text: t })),
      Object.entries(i.meta).map(([k, v]) => el('span', { class: 'chip mono', text: k + '=' + v }))),
    el('td', {}, checks),
    reg.source === 'etcd' ? el('td', { class: 'mono', text: i.node || '' }) : null,
    el('td', { class: 'actions' }, i.local ? actions(i) : el('span', { class: 'muted', text: 'registered on another host' })),
  ];
  row.append(...cells.filter((c) => c !== null));
  return row;
}

function actions(i) {
  if (i.maintenance !== null) {
    return [
      el('button', { type: 'button', 'data-action': 'maintenance-off', onclick: () => maintenance(i.id, false) }, 'End maintenance'),
      deregisterButton(i),
    ];
  }
  if (state.maintenanceFor === i.id) {
    const reason = el('input', { type: 'text', placeholder: 'reason (optional)', 'data-action': 'maintenance-reason' });
    const done = () => { state.maintenanceFor = null; reason.blur(); };
    const enable = () => { const r = reason.value.trim(); done(); render(); maintenance(i.id, true, r); };
    reason.addEventListener('keydown', (e) => { if (e.key === 'Enter') enable(); if (e.key === 'Escape') { done(); render(); } });
    reason.addEventListener('blur', () => { if (state.pendingRender) setTimeout(render, 0); });
    setTimeout(() => reason.focus(), 0);
    return [
      reason,
      el('button', { type: 'button', 'data-action': 'maintenance-enable', onclick: enable }, 'Enable'),
      el('button', { type: 'button', onclick: () => { done(); render(); } }, 'Cancel'),
    ];
  }
  return [
    el('button', {
      type: 'button',
      'data-action': 'maintenance-on',
      onclick: () => { state.maintenanceFor = i.id; render(); },
    }, 'Maintenance'),
    deregisterButton(i),
  ];
}

// Deregistration takes two clicks: the first arms the button for a few seconds.
function deregisterButton(i) {
  const b = el('button', { type: 'button', class: 'danger', 'data-action': 'deregister' }, 'Deregister');
  let timer = null;
  b.addEventListener('click', () => {
    if (b.classList.contains('armed')) {
      clearTimeout(timer);
      deregister(i.id);
      return;
    }
    b.classList.add('armed');
    b.textContent = 'Click again to deregister';
    timer = setTimeout(() => { b.classList.remove('armed'); b.textContent = 'Deregister'; }, 4000);
  });
  return b;
}

// --- start ------------------------------------------------------------------------------

function start() {
  $('token').value = token();
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('token').value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
    notice(t ? 'Token kept for this tab.' : '');
    if (state.events === null) refresh();
  });
  $('token-clear').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $('token').value = '';
    notice('Token forgotten.');
  });
  $('filter').addEventListener('input', render);
  // The mirror's age moves between changes: counted here, with no request.
  setInterval(tickAge, 1000);
  // With etcd the source can come and go without a change: its state is asked for again
  // every 10 s (one small request per page, whatever the registry holds).
  setInterval(() => {
    if (state.snapshot && state.snapshot.registry.source !== 'embedded') refresh();
  }, 10000);
  refresh();
}

document.addEventListener('DOMContentLoaded', start);
