// Waymark's gateway view. One event stream (/ui/api/events): the gateway sends the whole
// view once a second, built once for every open page. Every value goes into the page as text.
'use strict';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg'; // a namespace name, not an address
const HISTORY = 60; // seconds of rates kept for the sparklines
const history = new Map(); // key -> [{rps, eps}]

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function setLive(state, text) {
  const l = $('live');
  l.dataset.state = state;
  l.textContent = text;
}

function fmtRate(x) {
  if (x === 0) return '0';
  if (x < 10) return x.toFixed(2);
  if (x < 100) return x.toFixed(1);
  return Math.round(x).toString();
}

function fmtMs(x) {
  if (x === null || x === undefined) return '–';
  if (x < 10) return x.toFixed(2) + ' ms';
  if (x < 1000) return x.toFixed(0) + ' ms';
  return (x / 1000).toFixed(1) + ' s';
}

function remember(key, t) {
  let h = history.get(key);
  if (!h) { h = []; history.set(key, h); }
  h.push({ rps: t.rps, eps: t.errors_per_s });
  if (h.length > HISTORY) h.shift();
  return h;
}

function spark(h) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('viewBox', '0 0 ' + HISTORY + ' 20');
  svg.setAttribute('preserveAspectRatio', 'none');
  const top = Math.max(1, ...h.map((p) => p.rps));
  const line = (f, cls) => {
    const pl = document.createElementNS(SVG, 'polyline');
    const x0 = HISTORY - h.length;
    pl.setAttribute('points', h.map((p, i) => (x0 + i) + ',' + (19 - (f(p) / top) * 18).toFixed(2)).join(' '));
    if (cls) pl.setAttribute('class', cls);
    return pl;
  };
  svg.append(line((p) => p.rps), line((p) => p.eps, 'err'));
  return svg;
}

function cells(t, h) {
  return [
    el('td', { class: 'num', text: fmtRate(t.rps) }),
    el('td', { class: 'num' + (t.errors_per_s > 0 ? ' errors-now' : ''), text: fmtRate(t.errors_per_s) }),
    el('td', { class: 'num', text: fmtMs(t.mean_ms) }),
    el('td', { class: 'num', text: fmtMs(t.p99_ms) }),
    el('td', { class: 'num', text: t.requests }),
    el('td', { class: 'num', text: t.errors }),
    el('td', {}, spark(h)),
  ];
}

function render(v) {
  const reg = v.registry;
  // While connected the state is current (the change stream pushes every change); the age
  // says something only once the registry is away.
  $('registry').textContent = reg.connected ? 'connected'
    : 'unreachable' + (reg.age_ms === null ? '' : ', last heard ' + fmtMs(reg.age_ms) + ' ago');
  $('index').textContent = reg.index;
  $('route-count').textContent = v.routes.length;
  $('unrouted').textContent = v.unrouted.requests + ' (' + fmtRate(v.unrouted.rps) + '/s)';
  const rows = [];
  for (const r of v.routes) {
    const where = (r.host === '*' ? '' : r.host) + r.prefix + (r.header ? ' [' + r.header + ']' : '');
    rows.push(el('tr', {
      class: 'route',
      'data-route': r.name,
      'data-requests': r.traffic.requests,
      'data-errors': r.traffic.errors,
    },
      el('td', {},
        el('div', { class: 'name', text: r.name }),
        el('div', { class: 'mono muted', text: where }),
        el('div', { class: 'muted', text: r.backends.join(' · ') + (r.from_metadata ? ' · from registration metadata' : '') })),
      el('td', { class: 'mono', text: r.service }),
      cells(r.traffic, remember('r:' + r.name, r.traffic)),
    ));
    if (r.instances.length === 0) {
      rows.push(el('tr', { class: 'instance quiet' }, el('td', { colspan: 9, text: 'no instance registered' })));
    }
    for (const i of r.instances) {
      const state = i.draining ? 'maintenance' : i.health;
      rows.push(el('tr', {
        class: 'instance' + (i.traffic.rps === 0 ? ' quiet' : ''),
        'data-instance': i.id,
        'data-requests': i.traffic.requests,
        'data-errors': i.traffic.errors,
      },
      el('td', {},
        el('span', { class: 'pill ' + state, text: i.draining ? 'draining' : i.health }), ' ',
        el('b', { text: i.id }), ' ',
        el('span', { class: 'mono muted', text: i.address + ':' + i.port }),
        i.ejected ? el('span', { class: 'pill critical', text: 'ejected' }) : null),
      el('td', {}),
      cells(i.traffic, remember('i:' + r.name + ':' + i.id, i.traffic)),
      ));
    }
  }
  if (rows.length === 0) rows.push(el('tr', {}, el('td', { colspan: 9, class: 'empty', text: 'No route.' })));
  $('routes').replaceChildren(...rows);
}

function start() {
  const es = new EventSource('api/events');
  es.addEventListener('open', () => setLive('live', 'live'));
  es.addEventListener('error', () => setLive('down', 'reconnecting'));
  es.addEventListener('stats', (e) => {
    setLive('live', 'live');
    render(JSON.parse(e.data));
  });
}

document.addEventListener('DOMContentLoaded', start);
