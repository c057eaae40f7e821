#!/usr/bin/env node
// Drives npm eureka-js-client against Waymark's Eureka API (/eureka/v2/apps/), one step per
// command: commands on stdin, one per line; one "@@ {json}" line on stdout for each
// ({"ok": true, ...} or {"ok": false, "error": ...}). The test (tests/tests/eureka.rs)
// decides the order and checks DNS between steps. Only the client's public API is used: it
// registers (and requires a 204 for it), heartbeats, and keeps its registry from full fetches
// and deltas (shouldUseDelta), asking for JSON.
//
// Commands:
//   start          client.start(): register, heartbeats, registry fetches
//   full APP       client.fetchFullRegistry(), then the UP instances of APP it holds
//   delta APP      client.fetchDelta(), then the UP instances of APP it holds
//   cache APP      the UP instances of APP it holds now
//   stop           client.stop(): stops heartbeats and cancels (DELETE)
//   exit           exits at once, without cancelling (a missed heartbeat follows)

'use strict';

const readline = require('readline');
const { Eureka } = require('eureka-js-client');

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) {
    if (dflt === undefined) throw new Error(`missing --${name}`);
    return dflt;
  }
  return process.argv[i + 1];
}

const port = Number(arg('port'));
const renew = Number(arg('renew', '1'));
const lease = Number(arg('lease', '2'));
const app = arg('app');
const host = arg('host');

// The library logs through the logger it is given: to stderr, so stdout is the protocol's.
const log = (level) => (...args) => console.error(`[eureka-js-client ${level}]`, ...args);
const logger = { error: log('error'), warn: log('warn'), info: log('info'), debug: () => {} };

const client = new Eureka({
  logger,
  cwd: __dirname,
  shouldUseDelta: true,
  instance: {
    app,
    instanceId: arg('id'),
    hostName: host,
    ipAddr: arg('ip'),
    port: { $: port, '@enabled': true },
    vipAddress: app.toLowerCase(),
    statusPageUrl: `http://${host}:${port}/info`,
    dataCenterInfo: {
      '@class': 'com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo',
      name: 'MyOwn',
    },
    leaseInfo: { renewalIntervalInSecs: renew, durationInSecs: lease },
    metadata: { team: 'green' },
  },
  eureka: {
    host: arg('server-host'),
    port: Number(arg('server-port')),
    servicePath: '/eureka/v2/apps/',
    heartbeatInterval: renew * 1000,
    registryFetchInterval: 1000,
    maxRetries: 0,
  },
});

function reply(fields) {
  process.stdout.write(`@@ ${JSON.stringify(fields)}\n`);
}

function instances(appId) {
  return (client.cache.app[appId.toUpperCase()] || []).map((i) => ({
    id: i.instanceId,
    status: i.status,
    ip: i.ipAddr,
    port: i.port && i.port.$,
    app: i.app,
    metadata: i.metadata,
  }));
}

// Calls `next` whatever happens; replies with the error, or runs `ok`.
function finish(next, ok) {
  return (err) => {
    if (err) reply({ ok: false, error: String((err && err.stack) || err) });
    else ok();
    next();
  };
}

const commands = {
  start: (rest, next) => client.start(finish(next, () => reply({ ok: true }))),
  full: (rest, next) => client.fetchFullRegistry(
    finish(next, () => reply({ ok: true, instances: instances(rest[0]) })),
  ),
  delta: (rest, next) => client.fetchDelta(
    finish(next, () => reply({ ok: true, instances: instances(rest[0]) })),
  ),
  cache: (rest, next) => { reply({ ok: true, instances: instances(rest[0]) }); next(); },
  stop: (rest, next) => client.stop(finish(next, () => reply({ ok: true }))),
  exit: () => { reply({ ok: true }); process.exit(0); },
};

// One command at a time, in order.
const queue = [];
let busy = false;
function pump() {
  if (busy || queue.length === 0) return;
  const [cmd, ...rest] = queue.shift();
  const run = commands[cmd];
  if (!run) {
    reply({ ok: false, error: `unknown command ${cmd}` });
    pump();
    return;
  }
  busy = true;
  try {
    run(rest, () => { busy = false; pump(); });
  } catch (e) {
    reply({ ok: false, error: `${cmd}: ${e.stack || e}` });
    busy = false;
    pump();
  }
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const words = line.trim().split(/\s+/).filter(Boolean);
  if (words.length) {
    queue.push(words);
    pump();
  }
});
reply({ ok: true, ready: true });
