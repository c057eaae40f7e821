#!/usr/bin/env node
// Drives Waymark's catalog with npm `@creditkarma/consul-client` (public API only):
// registerEntity (PUT /v1/catalog/register) of an external service, listServices,
// listNodes, listNodesForService, resolveAddress, and watchAddress, which must fire again
// when the service changes (it keys on the instance's ModifyIndex and blocks with
// ?index=&wait=&passing&stale).
//
//   node tests/clients/creditkarma.js --addr 127.0.0.1:8500
//
// Prints one line per step; exits 0 on success, 1 on the first failure.
'use strict';

const { Catalog } = require('@creditkarma/consul-client');

function arg(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function expect(cond, msg) {
  if (!cond) throw new Error(msg);
}

function step(msg) {
  console.log(`ok: ${msg}`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const addr = arg('--addr');
  expect(addr, '--addr is required');
  const catalog = new Catalog([`http://${addr}`]);
  const entity = (address) => ({
    Node: 'ck-ext',
    Address: address,
    NodeMeta: { 'external-node': 'true' },
    Service: { ID: 'ck-search-1', Service: 'ck-search', Port: 9200, Tags: ['v7'] },
    Check: {
      Node: 'ck-ext',
      CheckID: 'ck-search-alive',
      Name: 'search alive',
      Status: 'passing',
      ServiceID: 'ck-search-1',
    },
  });

  const ok = await catalog.registerEntity(entity('192.0.2.30'));
  expect(ok === true, `registerEntity answered ${JSON.stringify(ok)}`);
  step('registerEntity');

  const services = await catalog.listServices();
  expect(services['ck-search'] && services['ck-search'].includes('v7'),
    `listServices: ${JSON.stringify(services)}`);
  const nodes = await catalog.listNodes();
  expect(nodes.some((n) => n.Node === 'ck-ext' && n.Address === '192.0.2.30'),
    `listNodes: ${JSON.stringify(nodes)}`);
  const entries = await catalog.listNodesForService('ck-search');
  expect(entries.length === 1 && entries[0].Service.ModifyIndex > 0,
    `listNodesForService: ${JSON.stringify(entries)}`);
  step('listServices, listNodes, listNodesForService (with ModifyIndex)');

  const resolved = await catalog.resolveAddress('ck-search');
  expect(resolved === '192.0.2.30:9200', `resolveAddress: ${resolved}`);
  step(`resolveAddress: ${resolved}`);

  // watchAddress: the first value, then a change must fire it again.
  const seen = [];
  let notify = null;
  const observer = catalog.watchAddress('ck-search');
  observer.onValue((value) => {
    seen.push(value);
    if (notify) notify();
  });
  observer.onError((err) => console.log(`watch error: ${err.message}`));
  const next = (count, what) => withTimeout(new Promise((resolve) => {
    const check = () => { if (seen.length >= count) resolve(); };
    notify = check;
    check();
  }), 20000, what);
  await next(1, 'the first watchAddress value');
  expect(seen[0] === '192.0.2.30:9200', `first watched value: ${seen[0]}`);
  step(`watchAddress: ${seen[0]}`);

  await catalog.registerEntity(entity('192.0.2.31'));
  await next(2, 'watchAddress to fire after the service moved');
  expect(seen[1] === '192.0.2.31:9200', `watched value after the change: ${seen[1]}`);
  step(`watchAddress fired on the change: ${seen[1]}`);

  catalog.ignoreAddress('ck-search');
  process.exit(0);
}

main().catch((err) => {
  console.log(`FAIL: ${err.message}`);
  process.exit(1);
});
