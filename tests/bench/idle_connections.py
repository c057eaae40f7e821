# The gateway under 5,000 idle client connections: its descriptors (/proc/PID/fd) and RSS
# (/proc/PID/status) once they are open, and again after WAIT_SECONDS, with how many the
# gateway closed meanwhile (and, for HTTP/2, how many got GOAWAY first). Starts its own
# resolver, gw_backend and gateway (default config: limits.idle_timeout 75 s) on loopback.
# h1: each connection sends one request, reads the answer and stays kept-alive; h2: each
# sends the HTTP/2 preface and SETTINGS (h2c) and nothing more. Needs `ulimit -n` > 5,100.
#
#   python3 tests/bench/idle_connections.py target/debug/waymark-gateway \
#       target/debug/waymark-resolver target/debug/gw_backend 80 h1
# Results: tests/bench/results/idle-connections.md.
import json, os, socket, subprocess, sys, tempfile, time, urllib.request
gw_bin, res_bin, be_bin, wait = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
proto = sys.argv[5] if len(sys.argv) > 5 else "h1"
N = 5000
tmp = tempfile.mkdtemp()
def start(cmd, prefix):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, os.path.basename(cmd[0]) + ".log"), "w"), text=True)
    while True:
        line = p.stdout.readline()
        if not line: raise SystemExit(f"{cmd[0]} exited")
        if line.startswith(prefix): return p, line[len(prefix):].strip()
res, line = start([res_bin, "serve", "--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir", tmp + "/data"], "waymark-resolver listening ")
api = dict(kv.split("=") for kv in line.split())["http"]
be, be_addr = start([be_bin, "--id", "web-1"], "gw_backend listening ")
host, port = be_addr.rsplit(":", 1)
reg = {"ID": "web-1", "Name": "web", "Address": host, "Port": int(port), "Meta": {"waymark-public-host": "open.test"}}
urllib.request.urlopen(urllib.request.Request(f"http://{api}/v1/agent/service/register", data=json.dumps(reg).encode(), method="PUT")).read()
args = [gw_bin, "ingress", "--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--registry", f"http://{api}", "--access-log", "off"]
if proto == "h2": args.append("--h2c")
gw, line = start(args, "waymark-gateway listening ")
addrs = dict(kv.split("=") for kv in line.split())
gh, gp = addrs["http"].rsplit(":", 1)
def stat():
    fds = len(os.listdir(f"/proc/{gw.pid}/fd"))
    rss = [l for l in open(f"/proc/{gw.pid}/status") if l.startswith("VmRSS")][0].split()[1]
    return fds, int(rss) // 1024
req = b"GET / HTTP/1.1\r\nHost: open.test\r\n\r\n"
for _ in range(100):
    s = socket.create_connection((gh, int(gp))); s.sendall(req)
    if s.recv(100).startswith(b"HTTP/1.1 200"): s.close(); break
    s.close(); time.sleep(0.1)
print("idle gateway: fds=%d rss=%dMiB" % stat())
conns = []
t0 = time.time()
preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
for i in range(N):
    s = socket.create_connection((gh, int(gp)))
    if proto == "h1":
        s.sendall(req)
        got = b""
        while b"\r\n\r\n" not in got: got += s.recv(4096)
    else:
        s.sendall(preface)
        s.recv(4096)
    conns.append(s)
print("%d %s connections opened in %.1fs: fds=%d rss=%dMiB" % ((N, proto, time.time() - t0) + stat()))
time.sleep(wait)
closed = 0
goaway = 0
for s in conns:
    s.setblocking(False)
    got = b""
    eof = False
    try:
        while True:
            d = s.recv(65536)
            if not d: eof = True; break
            got += d
    except BlockingIOError: pass
    except OSError: eof = True
    closed += eof
    # An HTTP/2 GOAWAY frame header: type 7 on stream 0.
    goaway += any(got[i+3] == 7 for i in range(0, max(0, len(got) - 8)) if got[i:i+3] == b"\x00\x00\x08" or got[i:i+3] == b"\x00\x00\x0c")
print("GOAWAY received on %d" % goaway)
print("after %.0fs idle: %d of %d closed by the gateway; fds=%d rss=%dMiB" % ((wait, closed, N) + stat()))
for p in (gw, be, res): p.kill()
