#!/usr/bin/env python3
"""Drive Waymark's Consul agent API with a real Python Consul client, public API only.

Works with PyPI `python-consul` (1.1.0) and `py-consul` (1.8.0); both install the
module `consul`, so pick one with PYTHONPATH (see tests/clients/README.md):

  PYTHONPATH=tests/clients/.deps/py-consul python3 tests/clients/consul_py.py \
      --addr 127.0.0.1:8500 --lib py-consul --backend-port 18080

Prints one line per step; exits 0 on success, 1 on the first failure.
The HTTP check target is served by this script on --backend-port (0: any free port; unless that port is
already taken, in which case whatever listens there must answer GET /health with 200).
"""
import argparse
import importlib.util
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TAGS = ["v1", "primary"]
META = {"team": "pay", "Version": "1.2"}
TTL = "30s"
POLL = 5.0  # seconds to wait for a state change to show up


class Failure(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise Failure(msg)


def eventually(what, fn, timeout=POLL):
    """Poll fn() until it returns a truthy value; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.2)


class Backend(BaseHTTPRequestHandler):
    hits = 0
    status = 200

    def do_GET(self):
        Backend.hits += self.path.split("?")[0] == "/health"
        self.send_response(Backend.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", required=True, help="Waymark HTTP address, host:port")
    ap.add_argument("--lib", required=True, choices=["python-consul", "py-consul"])
    ap.add_argument("--backend-port", type=int, required=True)
    args = ap.parse_args()
    host, port = args.addr.rsplit(":", 1)
    lib = args.lib
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY"):
        os.environ.pop(var, None)  # python-consul lets these override the address we pass

    state = {"step": "import library"}

    def ok(detail=""):
        print(f"[{lib}] ok   {state['step']}" + (f" -- {detail}" if detail else ""), flush=True)

    def step(name):
        state["step"] = name

    try:
        import consul
        from consul import Check
        is_py_consul = importlib.util.find_spec("consul.callback") is not None  # only py-consul has it
        expect(is_py_consul == (lib == "py-consul"),
               f"--lib {lib} but PYTHONPATH gave {'py-consul' if is_py_consul else 'python-consul'} ({consul.__file__})")
    except (ImportError, Failure) as e:
        print(f"[{lib}] FAIL {state['step']}: {e} (run tests/clients/install.sh, set PYTHONPATH)", file=sys.stderr)
        return 2
    ok(f"consul {getattr(consul, '__version__', '?')} from {os.path.dirname(consul.__file__)}")

    c = consul.Consul(host=host, port=int(port))
    name1, sid1 = f"pyclient-{lib}", f"pyclient-{lib}-1"
    name2, sid2 = f"pyclient-{lib}-http", f"pyclient-{lib}-http-1"
    cid1 = f"service:{sid1}"
    enc_id = f"{sid2} chk+\u00fc"  # sent as ...%20chk%2B%C3%BC
    url = f"http://127.0.0.1:{args.backend_port}/health"

    def passing(name):
        idx, entries = c.health.service(name, passing=True)
        return idx, {e["Service"]["ID"]: e for e in entries}

    def up(name, sid):
        return sid in passing(name)[1]

    def statuses(name, sid):
        _, entries = c.health.service(name)
        return {ch["CheckID"]: ch["Status"] for e in entries if e["Service"]["ID"] == sid for ch in e["Checks"]}

    backend = None
    try:
        step(f"start HTTP check backend on 127.0.0.1:{args.backend_port}")
        try:
            backend = ThreadingHTTPServer(("127.0.0.1", args.backend_port), Backend)
            threading.Thread(target=backend.serve_forever, daemon=True).start()
            # Port 0: the port the system picked.
            args.backend_port = backend.server_address[1]
            url = f"http://127.0.0.1:{args.backend_port}/health"
            ok(f"port {args.backend_port}")
        except OSError as e:
            ok(f"port in use ({e.strerror}); using the server already there")

        step(f"register {sid1} with TTL check" + (" and meta" if is_py_consul else " (python-consul has no meta parameter)"))
        kw = dict(service_id=sid1, address="127.0.0.1", port=18081, tags=TAGS, check=Check.ttl(TTL))
        if is_py_consul:
            kw["meta"] = META
        res = c.agent.service.register(name1, **kw)
        expect(res is True, f"register returned {res!r}; the library returns True only for HTTP 200")
        ok()

        step(f"ttl_pass {cid1}")
        expect(c.agent.check.ttl_pass(cid1, notes="client says ok") is True, "ttl_pass did not get HTTP 200")
        ok()

        step("agent.services() shows the service")
        svc = c.agent.services().get(sid1)
        expect(svc is not None, f"{sid1} missing from /v1/agent/services")
        expect(svc["Service"] == name1 and svc["Port"] == 18081 and svc["Address"] == "127.0.0.1",
               f"wrong fields: {svc}")
        expect(sorted(svc["Tags"]) == sorted(TAGS), f"tags {svc['Tags']}")
        expect(not is_py_consul or svc.get("Meta") == META, f"meta {svc.get('Meta')}")
        ok(f"{svc['Service']} {svc['Address']}:{svc['Port']} tags={svc['Tags']} meta={svc.get('Meta')}")

        step("catalog.services() lists the name with its tags")
        idx, cat = c.catalog.services()
        expect(sorted(cat.get(name1) or []) == sorted(TAGS), f"catalog services: {cat}")
        ok(f"index={idx}")

        step("health.service(passing=True) returns the instance")
        eventually(f"{sid1} is passing", lambda: up(name1, sid1))
        idx, inst = passing(name1)
        e = inst[sid1]
        expect(e["Service"]["Port"] == 18081 and sorted(e["Service"]["Tags"]) == sorted(TAGS), f"entry {e['Service']}")
        expect(not is_py_consul or e["Service"].get("Meta") == META, f"meta {e['Service'].get('Meta')}")
        expect(isinstance(e.get("Node"), dict) and e["Node"].get("Node"), f"entry has no Node object: {e.get('Node')}")
        st = {ch["CheckID"]: ch["Status"] for ch in e["Checks"]}
        expect(st.get(cid1) == "passing", f"checks {st}")
        ok(f"index={idx} checks={st}")

        step("blocking health.service(index, wait='1s') times out after ~1s")
        for _ in range(3):
            t0 = time.monotonic()
            nidx, _ = c.health.service(name1, index=idx, wait="1s", passing=True)
            took = time.monotonic() - t0
            expect(int(nidx) >= int(idx), f"index went backwards: {idx} -> {nidx}")
            if took >= 0.8:
                break
            expect(int(nidx) > int(idx), f"returned after {took:.2f}s with the same index {nidx}")
            idx = nidx  # something changed meanwhile; block again from the new index
        else:
            raise Failure("blocking query never blocked (index kept changing)")
        expect(took < 2.5, f"blocking query took {took:.2f}s for wait=1s")
        ok(f"{took:.2f}s, index {idx} -> {nidx}")

        step("ttl_warn wakes a blocking query and drops the instance from passing")
        bg, out = consul.Consul(host=host, port=int(port)), {}

        def watch():
            t = time.monotonic()
            out["r"] = bg.health.service(name1, index=nidx, wait="10s", passing=True)
            out["t"] = time.monotonic() - t
        (th := threading.Thread(target=watch, daemon=True)).start()
        time.sleep(0.5)
        expect(c.agent.check.ttl_warn(cid1, notes="warming") is True, "ttl_warn did not get HTTP 200")
        th.join(12)
        expect("r" in out, "blocking query did not return")
        widx = out["r"][0]
        expect(out["t"] < 5, f"blocking query returned only after {out['t']:.2f}s")
        expect(int(widx) > int(nidx), f"index did not grow: {nidx} -> {widx}")
        eventually(f"{sid1} leaves passing", lambda: not up(name1, sid1))
        eventually("check status is warning", lambda: statuses(name1, sid1).get(cid1) == "warning")
        ok(f"woke after {out['t']:.2f}s, index {nidx} -> {widx}")

        step("ttl_fail keeps it out of passing (critical)")
        expect(c.agent.check.ttl_fail(cid1, notes="broken") is True, "ttl_fail did not get HTTP 200")
        eventually("check status is critical", lambda: statuses(name1, sid1).get(cid1) == "critical")
        expect(not up(name1, sid1), "critical instance still in passing results")
        ok()

        step("ttl_pass brings it back")
        expect(c.agent.check.ttl_pass(cid1) is True, "ttl_pass did not get HTTP 200")
        eventually(f"{sid1} is passing again", lambda: up(name1, sid1))
        ok()

        ttl2 = Check.ttl(TTL)
        if is_py_consul:
            step(f"register {sid2} with checks=[HTTP {url} every 1s, TTL] (check + extra_checks)")
            res = c.agent.service.register(name2, service_id=sid2, address="127.0.0.1", port=args.backend_port,
                                           tags=TAGS, meta=META, check=Check.http(url, "1s", timeout="1s"),
                                           extra_checks=[ttl2])
            http_id, ttl2_id = f"service:{sid2}:1", f"service:{sid2}:2"  # Consul numbers unnamed checks
        else:
            step(f"register {sid2} with HTTP check {url} every 1s, plus a TTL check via agent.check.register")
            res = c.agent.service.register(name2, service_id=sid2, address="127.0.0.1", port=args.backend_port,
                                           tags=TAGS, check=Check.http(url, "1s", timeout="1s"))
            http_id, ttl2_id = f"service:{sid2}", f"{sid2}:ttl"
            expect(res is True, f"register returned {res!r}")
            res = c.agent.check.register("second check", check=ttl2, check_id=ttl2_id, service_id=sid2)
        expect(res is True, f"register returned {res!r}")
        expect(c.agent.check.ttl_pass(ttl2_id) is True, f"ttl_pass {ttl2_id} did not get HTTP 200")
        ok(f"check ids {http_id}, {ttl2_id}")

        step("ttl_pass on a check id that needs percent-encoding")
        expect(c.agent.check.register("encoded", check=Check.ttl(TTL), check_id=enc_id, service_id=sid2) is True,
               "agent.check.register did not get HTTP 200")
        expect(c.agent.check.ttl_pass(enc_id, notes="encoded ok") is True, f"ttl_pass {enc_id!r} did not get HTTP 200")
        chk = c.agent.checks().get(enc_id)
        expect(chk is not None, f"{enc_id!r} missing from /v1/agent/checks")
        expect(chk["Status"] == "passing" and chk.get("Output") == "encoded ok", f"check {chk}")
        expect(c.agent.check.deregister(enc_id) is True, "check deregister did not get HTTP 200")
        expect(enc_id not in c.agent.checks(), f"{enc_id!r} still in /v1/agent/checks")
        ok(f"sent PUT /v1/agent/check/pass/{sid2}%20chk%2B%C3%BC")

        step(f"{sid2} becomes passing once Waymark runs the HTTP check")
        eventually(f"{sid2} is passing", lambda: up(name2, sid2), timeout=10)
        st = statuses(name2, sid2)
        expect(st.get(http_id) == "passing" and st.get(ttl2_id) == "passing", f"checks {st}")
        expect(backend is None or Backend.hits > 0, "backend never received GET /health")  # else external server
        ok(f"checks={st} backend hits={Backend.hits if backend else 'n/a'}")

        if backend is not None:
            step("backend answering 503 makes the HTTP check critical, 200 makes it pass again")
            Backend.status = 503
            eventually(f"{sid2} leaves passing", lambda: not up(name2, sid2), timeout=10)
            Backend.status = 200
            eventually(f"{sid2} is passing again", lambda: up(name2, sid2), timeout=10)
            ok()

        step(f"maintenance on {sid1} removes it from passing; off restores it")
        expect(c.agent.service.maintenance(sid1, "true", reason="client test") is True, "maintenance enable failed")
        eventually(f"{sid1} leaves passing", lambda: not up(name1, sid1))
        expect(c.agent.service.maintenance(sid1, "false") is True, "maintenance disable failed")
        eventually(f"{sid1} is passing again", lambda: up(name1, sid1))
        ok()

        step("deregister both services")
        for name, sid in ((name1, sid1), (name2, sid2)):
            expect(c.agent.service.deregister(sid) is True, f"deregister {sid} did not get HTTP 200")
            eventually(f"{sid} gone from agent services", lambda: sid not in c.agent.services())
            eventually(f"{sid} gone from health.service", lambda: not c.health.service(name)[1])
            eventually(f"{name} gone from catalog services", lambda: name not in c.catalog.services()[1])
        ok()
    except Exception as e:  # noqa: BLE001 - report any library or assertion error the same way
        print(f"[{lib}] FAIL {state['step']}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        for sid in (sid1, sid2):  # best-effort cleanup
            try:
                c.agent.service.deregister(sid)
            except Exception:  # noqa: BLE001
                pass
        return 1
    finally:
        if backend is not None:
            backend.shutdown()
    print(f"[{lib}] all steps passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
