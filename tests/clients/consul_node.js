#!/usr/bin/env node
// Drive Waymark's Consul agent API with the real npm `consul` client (node-consul by
// silas), public API only:
//
//   node tests/clients/consul_node.js --addr 127.0.0.1:8500 --backend-port 18081
//
// Prints one line per step; exits 0 on success, 1 on the first failure. The HTTP check
// target is served by this script on --backend-port (0: any free port; unless the port is already taken,
// in which case whatever listens there must answer GET /health with 200).
"use strict";

const http = require("http");
const Consul = require("consul"); // from tests/clients/node_modules (see install.sh)

const TAGS = ["v1", "primary"];
const META = { team: "pay", Version: "1.2" };
const TTL = "30s";
const NAME1 = "nodeclient", SID1 = "nodeclient-1", CID1 = `service:${SID1}`;
const NAME2 = "nodeclient-http", SID2 = "nodeclient-http-1";
const backend = { hits: 0, status: 200, server: null };
let current = "parse arguments";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ok = (detail) => console.log(`[node-consul] ok   ${current}${detail ? " -- " + detail : ""}`);
const step = (name) => { current = name; };
// Order-insensitive for object keys: Consul (Go) returns map keys sorted, not as sent.
const canon = (v) => Array.isArray(v) ? v.map(canon)
  : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])]))
  : v;
const same = (a, b) => JSON.stringify(canon(a)) === JSON.stringify(canon(b));
function expect(cond, msg) { if (!cond) throw new Error(msg); }

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  expect(out.addr && out["backend-port"], "usage: consul_node.js --addr HOST:PORT --backend-port P");
  return out;
}

async function eventually(what, fn, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await fn();
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000}s waiting until ${what}`);
    await sleep(200);
  }
}

function startBackend(port) {
  return new Promise((resolve) => {
    const srv = http.createServer((req, res) => {
      if (req.url.split("?")[0] === "/health") backend.hits++;
      res.writeHead(backend.status, { "content-type": "text/plain" });
      res.end(backend.status === 200 ? "ok\n" : "down\n");
    });
    srv.once("error", (err) => resolve(`port in use (${err.code}); using the server already there`));
    srv.listen(port, "127.0.0.1", () => { backend.server = srv; resolve(""); });
  });
}

// Runs consul.watch() on health.service (the library's blocking-query API), recording
// every underlying call, until stopWhen(calls, changes) is true.
function watchHealth(consul, options, stopWhen, onChange, timeoutMs) {
  const calls = [], changes = [];
  return new Promise((resolve, reject) => {
    let finished = false;
    const finish = (err) => {
      if (finished) return;
      finished = true; clearTimeout(timer); watch.end();
      err ? reject(err) : resolve({ calls, changes });
    };
    const watch = consul.watch({
      method: async (opts) => {
        const call = { index: String(opts.index), t0: Date.now() };
        calls.push(call);
        const [res, data] = await consul.health.service(opts);
        call.took = (Date.now() - call.t0) / 1000;
        call.newIndex = res.headers["x-consul-index"];
        setImmediate(() => { if (stopWhen(calls, changes)) finish(); });
        return [res, data];
      },
      options,
      maxAttempts: 0,
    });
    const timer = setTimeout(() => finish(new Error(`watch gave no result within ${timeoutMs / 1000}s`)), timeoutMs);
    watch.on("change", (data, res) => {
      changes.push({ data, index: res.headers["x-consul-index"], at: Date.now() });
      if (onChange) onChange(changes);
    });
    watch.on("error", (err) => finish(new Error(`watch error: ${err.message}`)));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const [host, port] = [args.addr.slice(0, args.addr.lastIndexOf(":")), args.addr.slice(args.addr.lastIndexOf(":") + 1)];
  let backendPort = Number(args["backend-port"]);
  let url = `http://127.0.0.1:${backendPort}/health`;
  const consul = new Consul({ host, port });
  const passing = async (service) =>
    Object.fromEntries((await consul.health.service({ service, passing: true })).map((e) => [e.Service.ID, e]));
  const statuses = async (service, sid) => Object.fromEntries((await consul.health.service({ service }))
    .filter((e) => e.Service.ID === sid).flatMap((e) => e.Checks.map((c) => [c.CheckID, c.Status])));

  try {
    step(`start HTTP check backend on 127.0.0.1:${backendPort}`);
    ok(await startBackend(backendPort));
    // Port 0: the port the system picked.
    if (backend.server) backendPort = backend.server.address().port;
    url = `http://127.0.0.1:${backendPort}/health`;

    step(`register ${SID1} with TTL check, tags and meta`);
    await consul.agent.service.register({
      name: NAME1, id: SID1, address: "127.0.0.1", port: 18082, tags: TAGS, meta: META, check: { ttl: TTL },
    });
    ok();

    step(`check.pass ${CID1} (sent as service%3A${SID1})`);
    await consul.agent.check.pass({ id: CID1, note: "client says ok" });
    ok();

    step("agent.service.list() shows the service");
    const svc = (await consul.agent.service.list())[SID1];
    expect(svc, `${SID1} missing from /v1/agent/services`);
    expect(svc.Service === NAME1 && svc.Port === 18082 && svc.Address === "127.0.0.1", `wrong fields: ${JSON.stringify(svc)}`);
    expect(same([...svc.Tags].sort(), [...TAGS].sort()) && same(svc.Meta, META), `tags/meta: ${JSON.stringify(svc)}`);
    ok(`${svc.Service} ${svc.Address}:${svc.Port} tags=${svc.Tags} meta=${JSON.stringify(svc.Meta)}`);

    step("catalog.service.list() lists the name with its tags");
    const cat = await consul.catalog.service.list();
    expect(same([...(cat[NAME1] || [])].sort(), [...TAGS].sort()), `catalog services: ${JSON.stringify(cat)}`);
    ok();

    step("health.service({passing: true}) returns the instance");
    const e = (await eventually(`${SID1} is passing`, async () => { const p = await passing(NAME1); return p[SID1] && p; }))[SID1];
    expect(e.Service.Port === 18082 && same([...e.Service.Tags].sort(), [...TAGS].sort()), `entry ${JSON.stringify(e.Service)}`);
    expect(same(e.Service.Meta, META), `meta ${JSON.stringify(e.Service.Meta)}`);
    expect(e.Node && e.Node.Node, `entry has no Node object: ${JSON.stringify(e.Node)}`);
    const st = Object.fromEntries(e.Checks.map((c) => [c.CheckID, c.Status]));
    expect(st[CID1] === "passing", `checks ${JSON.stringify(st)}`);
    ok(`checks=${JSON.stringify(st)}`);

    step("consul.watch(health.service, wait '1s'): blocking call times out after ~1s");
    const blocking = (calls) => calls.filter((c) => c.index !== "0" && c.took !== undefined);
    const w1 = await watchHealth(consul, { service: NAME1, passing: true, wait: "1s" },
      (calls) => blocking(calls).some((c) => c.took >= 0.8) || blocking(calls).length >= 3, null, 10000);
    expect(w1.calls[0].index === "0" && BigInt(w1.calls[0].newIndex) > 0n, `first call must get index > 0: ${JSON.stringify(w1.calls[0])}`);
    for (const c of w1.calls.filter((c) => c.took !== undefined)) {
      expect(BigInt(c.newIndex) >= BigInt(c.index), `index went backwards: ${c.index} -> ${c.newIndex}`);
    }
    const b = blocking(w1.calls).pop();
    expect(b.took >= 0.8, `blocking call never blocked: ${JSON.stringify(blocking(w1.calls))}`);
    expect(b.took < 1.5, `blocking call took ${b.took}s (node-consul aborts wait=1s calls at 1.5s)`);
    ok(`${b.took.toFixed(2)}s, index ${b.index} -> ${b.newIndex}`);

    step("check.warn wakes the watch and drops the instance from passing");
    let warnedAt = 0;
    const w2 = await watchHealth(consul, { service: NAME1, passing: true, wait: "10s" }, (calls, changes) => changes.length >= 2,
      (changes) => {
        if (changes.length === 1) {
          setTimeout(() => { warnedAt = Date.now(); consul.agent.check.warn({ id: CID1, note: "warming" }).catch(() => {}); }, 500);
        }
      }, 15000);
    const woke = w2.changes[1];
    expect(warnedAt && woke.at - warnedAt < 5000, `watch woke ${(woke.at - warnedAt) / 1000}s after warn`);
    expect(BigInt(woke.index) > BigInt(w2.changes[0].index), `index did not grow: ${w2.changes[0].index} -> ${woke.index}`);
    await eventually(`${SID1} leaves passing`, async () => !(await passing(NAME1))[SID1]);
    await eventually("check status is warning", async () => (await statuses(NAME1, SID1))[CID1] === "warning");
    ok(`woke ${((woke.at - warnedAt) / 1000).toFixed(2)}s after warn, index ${w2.changes[0].index} -> ${woke.index}`);

    step("check.fail keeps it out of passing (critical)");
    await consul.agent.check.fail({ id: CID1, note: "broken" });
    await eventually("check status is critical", async () => (await statuses(NAME1, SID1))[CID1] === "critical");
    expect(!(await passing(NAME1))[SID1], "critical instance still in passing results");
    ok();

    step("check.pass brings it back");
    await consul.agent.check.pass(CID1);
    await eventually(`${SID1} is passing again`, async () => (await passing(NAME1))[SID1]);
    ok();

    step(`register ${SID2} with checks: [HTTP ${url} every 1s, TTL]`);
    await consul.agent.service.register({
      name: NAME2, id: SID2, address: "127.0.0.1", port: backendPort, tags: TAGS, meta: META,
      checks: [{ http: url, interval: "1s", timeout: "1s" }, { ttl: TTL }],
    });
    const httpId = `service:${SID2}:1`, ttlId = `service:${SID2}:2`; // Consul numbers unnamed checks
    await consul.agent.check.pass(ttlId);
    ok(`check ids ${httpId}, ${ttlId}`);

    step(`${SID2} becomes passing once Waymark runs the HTTP check`);
    await eventually(`${SID2} is passing`, async () => (await passing(NAME2))[SID2], 10000);
    const st2 = await statuses(NAME2, SID2);
    expect(st2[httpId] === "passing" && st2[ttlId] === "passing", `checks ${JSON.stringify(st2)}`);
    expect(!backend.server || backend.hits > 0, "backend never received GET /health");
    ok(`checks=${JSON.stringify(st2)} backend hits=${backend.server ? backend.hits : "n/a"}`);

    if (backend.server) {
      step("backend answering 503 makes the HTTP check critical, 200 makes it pass again");
      backend.status = 503;
      await eventually(`${SID2} leaves passing`, async () => !(await passing(NAME2))[SID2], 10000);
      backend.status = 200;
      await eventually(`${SID2} is passing again`, async () => (await passing(NAME2))[SID2], 10000);
      ok();
    }

    step(`maintenance on ${SID1} removes it from passing; off restores it`);
    await consul.agent.service.maintenance({ id: SID1, enable: true, reason: "client test" });
    await eventually(`${SID1} leaves passing`, async () => !(await passing(NAME1))[SID1]);
    await consul.agent.service.maintenance({ id: SID1, enable: false });
    await eventually(`${SID1} is passing again`, async () => (await passing(NAME1))[SID1]);
    ok();

    step("deregister both services");
    for (const [name, sid] of [[NAME1, SID1], [NAME2, SID2]]) {
      await consul.agent.service.deregister(sid);
      await eventually(`${sid} gone from agent services`, async () => !(await consul.agent.service.list())[sid]);
      await eventually(`${sid} gone from health.service`, async () => (await consul.health.service(name)).length === 0);
      await eventually(`${name} gone from catalog services`, async () => !(name in (await consul.catalog.service.list())));
    }
    ok();
  } catch (err) {
    console.error(`[node-consul] FAIL ${current}: ${err && err.stack ? err.message : err}`);
    for (const sid of [SID1, SID2]) await consul.agent.service.deregister(sid).catch(() => {});
    return 1;
  } finally {
    if (backend.server) backend.server.close();
    consul.destroy();
  }
  console.log("[node-consul] all steps passed");
  return 0;
}

main().then((code) => process.exit(code), (err) => {
  console.error(`[node-consul] FAIL ${current}: ${err && err.message ? err.message : err}`);
  process.exit(1);
});
