//! Eureka clients register with Waymark unchanged: PyPI `py-eureka-client` (no Accept
//! header: XML) and npm `eureka-js-client` (JSON; requires 204 on register), each driven
//! step by step by a script in tests/clients/ (installed by tests/clients/install.sh),
//! while the test watches the resolver's DNS: register, heartbeats keep the instance, it is
//! answered, an OUT_OF_SERVICE override takes it out and its removal brings it back, full
//! and delta fetches see the other client's instances (and a Consul registration of the
//! same service), a missed heartbeat removes it within the lease plus 100 ms, cancel removes
//! it at once. Plus the API's answers to bad input and a restart.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_e2e::{dns, root, Api, Resolver};

/// Every lease in these tests is renewed every second and lasts two seconds; py-eureka-client's
/// three: it renews, then fetches a delta (each request on a new HTTP client), then sleeps a
/// renewal interval, so on a busy machine its heartbeats can come two seconds apart.
const RENEW_SECS: u64 = 1;
const LEASE: Duration = Duration::from_secs(2);
const PY_LEASE: Duration = Duration::from_secs(3);
/// How late a lease may end: the issue's bound.
const LATE: Duration = Duration::from_millis(100);

/// One client script, driven over its stdin; its protocol lines ("@@ {json}") come back on
/// a channel, everything else it prints is kept for failure messages.
struct Client {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<Value>,
    output: Arc<Mutex<String>>,
}

impl Client {
    fn spawn(name: &'static str, mut cmd: Command) -> Client {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir(root().join("tests/clients"));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, replies) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.strip_prefix("@@ ") {
                    Some(json) => {
                        let v: Value = serde_json::from_str(json).expect("a JSON reply");
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    None => push(&out, &line),
                }
            }
        });
        let stderr = child.stderr.take().expect("piped");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                push(&out, &line);
            }
        });
        let stdin = child.stdin.take();
        let mut c = Client {
            name,
            child,
            stdin,
            replies,
            output,
        };
        c.reply("(start)");
        c
    }

    fn reply(&mut self, what: &str) -> Value {
        match self.replies.recv_timeout(Duration::from_secs(60)) {
            Ok(v) if v["ok"] == true => v,
            Ok(v) => panic!("{} {what}: {v}\n{}", self.name, self.output()),
            Err(e) => panic!("{} {what}: no reply ({e})\n{}", self.name, self.output()),
        }
    }

    /// Runs one command and returns its reply; panics unless it succeeded.
    fn cmd(&mut self, line: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("running");
        writeln!(stdin, "{line}").expect("the script reads commands");
        stdin.flush().expect("flush");
        self.reply(line)
    }

    /// The IDs of the instances of a command's reply (`full`, `delta`, `cache`), sorted, with
    /// their status and (for deltas) action.
    fn instances(&mut self, line: &str) -> Vec<(String, String, String)> {
        let v = self.cmd(line);
        let mut out: Vec<(String, String, String)> = v["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap_or("").to_string(),
                    i["status"].as_str().unwrap_or("").to_string(),
                    i["action"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the process at once (SIGKILL): no cancel, no more heartbeats.
    fn kill(&mut self) -> Instant {
        self.child.kill().expect("kill the client");
        let at = Instant::now();
        self.child.wait().expect("reap the client");
        at
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(out: &Mutex<String>, line: &str) {
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    out.push_str(line);
    out.push('\n');
}

fn py_deps() -> PathBuf {
    let deps = root().join("tests/clients/.deps/py-eureka-client");
    assert!(
        deps.exists(),
        "{} is missing: run `bash tests/clients/install.sh` (.ci/run does)",
        deps.display()
    );
    deps
}

/// `py-eureka-client` registering `PYAPP` as `py-1:127.0.0.21:8081` (an ID it sends
/// percent-encoded).
fn py_client(r: &Resolver) -> Client {
    py_client_at(&format!("http://{}/eureka/", r.http))
}

fn py_client_at(server: &str) -> Client {
    let mut cmd = Command::new("python3");
    cmd.arg("eureka_py.py")
        .args(["--server", server])
        .args(["--app", "pyapp", "--id", PY_ID, "--host", "py-host"])
        .args(["--ip", "127.0.0.21", "--port", "8081"])
        .args(["--renew", &RENEW_SECS.to_string()])
        .args(["--lease", &PY_LEASE.as_secs().to_string()])
        .env("PYTHONPATH", py_deps());
    Client::spawn("py-eureka-client", cmd)
}

const PY_ID: &str = "py-1:127.0.0.21:8081";
const PY_IP: &str = "127.0.0.21";
const JS_IP: &str = "127.0.0.22";

/// `eureka-js-client` registering `JSAPP` as `js-1`, through `/eureka/v2/apps/`.
fn js_client(r: &Resolver) -> Client {
    assert!(
        root()
            .join("tests/clients/node_modules/eureka-js-client")
            .exists(),
        "eureka-js-client is missing: run `bash tests/clients/install.sh` (.ci/run does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg("eureka_js.js")
        .args(["--server-host", "127.0.0.1"])
        .args(["--server-port", &r.http.port().to_string()])
        .args(["--app", "jsapp", "--id", "js-1", "--host", "js-host"])
        .args(["--ip", JS_IP, "--port", "8082"])
        .args(["--renew", &RENEW_SECS.to_string()])
        .args(["--lease", &LEASE.as_secs().to_string()]);
    Client::spawn("eureka-js-client", cmd)
}

/// Asks the resolver's DNS for `name`'s A records.
struct Dns {
    rt: tokio::runtime::Runtime,
    server: std::net::SocketAddr,
}

impl Dns {
    fn new(r: &Resolver) -> Dns {
        Dns {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            server: r.dns,
        }
    }

    fn a(&self, name: &str) -> Vec<IpAddr> {
        self.rt.block_on(dns::a_records(self.server, name))
    }

    fn answers(&self, name: &str, ip: &str) -> bool {
        self.a(name).contains(&ip.parse().expect("an IP"))
    }

    /// Polls (every 10 ms) until `name` answers `ip` (`present`) or stops answering it;
    /// returns when, or panics after `within`.
    fn until(&self, name: &str, ip: &str, present: bool, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if self.answers(name, ip) == present {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{name} {} {ip} within {within:?}: it answers {:?}",
                if present {
                    "never answered"
                } else {
                    "still answers"
                },
                self.a(name)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Checks that `name` answers `ip` on every poll for `span` (heartbeats keep it).
    fn stays(&self, name: &str, ip: &str, span: Duration) {
        let end = Instant::now() + span;
        while Instant::now() < end {
            assert!(
                self.answers(name, ip),
                "{name} stopped answering {ip}: {:?}",
                self.a(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Polls a client command until `cond` holds (within 15 s: a few fetch rounds).
fn until_client(
    c: &mut Client,
    line: &str,
    cond: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = c.instances(line);
        if cond(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{line}: still {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has(list: &[(String, String, String)], id: &str, status: &str) -> bool {
    list.iter().any(|(i, s, _)| i == id && s == status)
}

/// The registry's view of a Eureka instance over the Eureka API (XML, as Eureka answers
/// clients that do not ask for JSON): its status, or `None` on 404.
fn eureka_status(api: &Api, rt: &tokio::runtime::Runtime, path: &str) -> Option<String> {
    rt.block_on(async {
        let resp = api.get(path).await;
        if resp.status() == 404 {
            return None;
        }
        assert_eq!(resp.status(), 200, "{path}");
        let body = resp.text().await.unwrap();
        let status = body
            .split("<status>")
            .nth(1)
            .and_then(|s| s.split("</status>").next())
            .unwrap_or_else(|| panic!("{path}: no <status> in {body}"));
        Some(status.to_string())
    })
}

/// The percent-encoded path of py-1 (its ID has colons).
fn py_path(prefix: &str) -> String {
    format!("{prefix}/apps/PYAPP/{}", PY_ID.replace(':', "%3A"))
}

#[test]
fn py_and_js_eureka_clients_register_heartbeat_expire_and_cancel() {
    let r = Resolver::start();
    let dns = Dns::new(&r);
    let api = Api::new(&r);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Register; the instance is answered, and heartbeats keep it past several leases.
    let mut py = py_client(&r);
    py.cmd("start");
    dns.until("pyapp.mesh.internal", PY_IP, true, Duration::from_secs(5));
    let mut js = js_client(&r);
    js.cmd("start"); // fails unless the registration got a 204
    dns.until("jsapp.mesh.internal", JS_IP, true, Duration::from_secs(5));
    dns.stays("pyapp.mesh.internal", PY_IP, PY_LEASE * 2);
    assert!(dns.answers("jsapp.mesh.internal", JS_IP));

    // A Consul registration of the same name is the same service, and the same application.
    rt.block_on(api.register(json!({
        "Name": "pyapp", "ID": "pyapp-consul", "Address": "127.0.0.23", "Port": 8083
    })));
    dns.until(
        "pyapp.mesh.internal",
        "127.0.0.23",
        true,
        Duration::from_secs(5),
    );
    assert!(dns.answers("pyapp.mesh.internal", PY_IP));

    // Full and delta fetches (py: XML, the library's own parsing; js: JSON) see the other
    // client's instances.
    let full = py.cmd("full JSAPP");
    assert_eq!(full["instances"][0]["id"], "js-1", "{full}");
    assert_eq!(full["instances"][0]["port"], 8082, "{full}");
    assert_eq!(full["hashcode"], "UP_3_", "{full}");
    let delta = py.cmd("delta JSAPP");
    assert_eq!(delta["hashcode"], full["hashcode"], "{delta}");
    assert!(has(&py.instances("delta JSAPP"), "js-1", "UP"), "{delta}");
    let pyapp = py.instances("full PYAPP");
    assert!(
        has(&pyapp, PY_ID, "UP") && has(&pyapp, "pyapp-consul", "UP"),
        "one application of both registrations: {pyapp:?}"
    );
    // The client's own registry copy, kept up to date from deltas in its heartbeat thread.
    until_client(&mut py, "cache JSAPP", |l| has(l, "js-1", "UP"));
    let js_full = js.instances("full PYAPP");
    assert!(has(&js_full, PY_ID, "UP"), "{js_full:?}");
    // js fetched everything at start; what came since reaches it through deltas.
    rt.block_on(api.register(json!({
        "Name": "jsapp", "ID": "jsapp-consul", "Address": "127.0.0.24", "Port": 8084
    })));
    let js_delta = until_client(&mut js, "delta JSAPP", |l| has(l, "jsapp-consul", "UP"));
    assert!(has(&js_delta, "js-1", "UP"), "{js_delta:?}");

    // OUT_OF_SERVICE: out of DNS, still registered (heartbeats go on); back when the
    // override goes. py through its own API; js (which has none) as an operator would.
    py.cmd("override OUT_OF_SERVICE");
    dns.until("pyapp.mesh.internal", PY_IP, false, Duration::from_secs(2));
    // For longer than its lease: renewed through the override, not expired, not answered.
    let end = Instant::now() + PY_LEASE + Duration::from_millis(500);
    while Instant::now() < end {
        assert!(!dns.answers("pyapp.mesh.internal", PY_IP));
        assert_eq!(
            eureka_status(&api, &rt, &py_path("/eureka")).as_deref(),
            Some("OUT_OF_SERVICE")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    py.cmd("delete_override");
    dns.until("pyapp.mesh.internal", PY_IP, true, Duration::from_secs(2));

    let js_status = "/eureka/v2/apps/JSAPP/js-1/status";
    let resp = rt.block_on(async {
        let url = api.url(&format!("{js_status}?value=OUT_OF_SERVICE"));
        api.client.put(url).send().await
    });
    assert_eq!(resp.unwrap().status(), 200);
    dns.until("jsapp.mesh.internal", JS_IP, false, Duration::from_secs(2));
    let resp = rt.block_on(async { api.client.delete(api.url(js_status)).send().await });
    assert_eq!(resp.unwrap().status(), 200);
    dns.until("jsapp.mesh.internal", JS_IP, true, Duration::from_secs(2));

    // A missed heartbeat: the process stops without cancelling. The instance leaves DNS
    // when its lease runs out: within the lease (plus 100 ms) of the last heartbeat, which
    // came before the kill. (How much before depends on the client's timing: py-eureka-client
    // renews, fetches a delta, then sleeps a renewal interval.)
    for (client, name, ip, lease) in [
        (&mut js, "jsapp.mesh.internal", JS_IP, LEASE),
        (&mut py, "pyapp.mesh.internal", PY_IP, PY_LEASE),
    ] {
        assert!(dns.answers(name, ip));
        let killed = client.kill();
        // Not at once: the lease the last heartbeat renewed runs on.
        assert!(
            dns.answers(name, ip),
            "{}: gone with the process",
            client.name
        );
        let gone = dns.until(name, ip, false, lease + Duration::from_secs(2));
        let after = gone.duration_since(killed);
        println!(
            "{}: out of DNS {after:?} after the kill (lease {lease:?})",
            client.name
        );
        assert!(
            after <= lease + LATE,
            "{}: {after:?} after the kill, over the lease {lease:?} + {LATE:?}",
            client.name
        );
    }
    // Gone from Eureka's reads as from DNS.
    assert_eq!(eureka_status(&api, &rt, "/eureka/apps/JSAPP/js-1"), None);
    assert_eq!(eureka_status(&api, &rt, &py_path("/eureka/v2")), None);
    // Other clients see it leave: DELETED in a delta.
    let mut py2 = py_client(&r);
    let delta = py2.instances("delta JSAPP");
    assert!(
        delta
            .iter()
            .any(|(id, _, action)| id == "js-1" && action == "DELETED"),
        "{delta:?}"
    );

    // Cancel: a client that stops cleanly is gone at once.
    py2.cmd("start");
    dns.until("pyapp.mesh.internal", PY_IP, true, Duration::from_secs(5));
    py2.cmd("stop");
    assert!(!dns.answers("pyapp.mesh.internal", PY_IP));
    assert_eq!(eureka_status(&api, &rt, &py_path("/eureka")), None);
    let mut js2 = js_client(&r);
    js2.cmd("start");
    dns.until("jsapp.mesh.internal", JS_IP, true, Duration::from_secs(5));
    js2.cmd("stop");
    assert!(!dns.answers("jsapp.mesh.internal", JS_IP));
    assert_eq!(eureka_status(&api, &rt, "/eureka/v2/apps/JSAPP/js-1"), None);
    // The Consul registrations are untouched.
    assert!(dns.answers("pyapp.mesh.internal", "127.0.0.23"));
    assert!(dns.answers("jsapp.mesh.internal", "127.0.0.24"));
}

/// A registration in Eureka's XML, as the Java client can send it.
fn xml_instance(app: &str, id: &str, ip: &str, status: &str) -> String {
    format!(
        r#"<instance><instanceId>{id}</instanceId><hostName>{id}.host</hostName><app>{app}</app>
        <ipAddr>{ip}</ipAddr><status>{status}</status><port enabled="true">9000</port>
        <dataCenterInfo class="com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"><name>MyOwn</name></dataCenterInfo>
        <leaseInfo><durationInSecs>60</durationInSecs></leaseInfo>
        <metadata><team>red</team></metadata><vipAddress>{app}.vip</vipAddress>
        <secureVipAddress>{app}.secure</secureVipAddress></instance>"#
    )
}

#[tokio::test]
async fn the_eureka_api_answers_bad_input_with_400_and_keeps_registrations_across_a_restart() {
    let mut r = Resolver::start();
    let api = Api::new(&r);
    let post = |path: &str, body: String, kind: &'static str| {
        let req = api
            .client
            .post(api.url(path))
            .header("content-type", kind)
            .body(body);
        async move { req.send().await.expect("API reachable") }
    };
    // Bad bodies: a 400 that says what is wrong, and the registry unchanged.
    let bad: &[(&str, &str)] = &[
        ("<instance><hostName>h</hostName>", "XML"),
        ("{\"instance\": ", "JSON"),
        ("{\"instance\": {\"ipAddr\": \"10.0.0.1\"}}", "hostName"),
        (
            "{\"instance\": {\"hostName\": \"h\", \"ipAddr\": \"not an ip!\", \"dataCenterInfo\": {\"name\": \"MyOwn\"}}}",
            "not an ip",
        ),
        ("<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY x \"y\">]><instance/>", "XML"),
        ("plain text", "neither JSON nor XML"),
    ];
    for (body, want) in bad {
        let resp = post("/eureka/apps/BAD", body.to_string(), "application/json").await;
        assert_eq!(resp.status(), 400, "{body}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(want), "{body}: {text}");
    }
    let huge = format!(
        "{{\"instance\": {{\"hostName\": \"{}\"}}}}",
        "h".repeat((1 << 20) + 1024)
    );
    let resp = post("/eureka/apps/BAD", huge, "application/json").await;
    assert_eq!(resp.status(), 413, "a body over api.max_body_bytes");
    assert!(api.registered_ids().await.is_empty());

    // Unknown instances: 404, which makes a client register again.
    for (method, path) in [
        ("PUT", "/eureka/apps/NOPE/x"),
        ("DELETE", "/eureka/apps/NOPE/x"),
        ("PUT", "/eureka/v2/apps/NOPE/x/status?value=OUT_OF_SERVICE"),
        ("GET", "/eureka/apps/NOPE"),
        ("GET", "/eureka/instances/x"),
    ] {
        let resp = api
            .client
            .request(method.parse().unwrap(), api.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{method} {path}");
    }

    // XML in, the app name mapped to a DNS name, a STARTING instance not answered yet.
    let resp = post(
        "/eureka/v2/apps/My_App",
        xml_instance("MY_APP", "m-1", "127.0.0.31", "STARTING"),
        "application/xml",
    )
    .await;
    assert_eq!(resp.status(), 204, "{}", resp.text().await.unwrap());
    assert!(dns::a_records(r.dns, "my-app.mesh.internal")
        .await
        .is_empty());
    let up = xml_instance("MY_APP", "m-1", "127.0.0.31", "UP");
    assert_eq!(
        post("/eureka/apps/MY_APP", up, "application/xml")
            .await
            .status(),
        204
    );
    assert_eq!(
        dns::a_records(r.dns, "my-app.mesh.internal").await,
        ["127.0.0.31".parse::<IpAddr>().unwrap()]
    );
    // A Consul ID is not Eureka's to replace.
    api.register(json!({"Name": "other", "ID": "c-1", "Address": "127.0.0.32", "Port": 1}))
        .await;
    let resp = post(
        "/eureka/apps/OTHER",
        xml_instance("OTHER", "c-1", "127.0.0.33", "UP"),
        "application/xml",
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        api.get("/eureka/apps/OTHER/c-1").await.status(),
        200,
        "readable as Eureka's"
    );
    assert_eq!(
        api.client
            .put(api.url("/eureka/apps/OTHER/c-1"))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "but no heartbeat of Eureka's"
    );
    // Metadata updates, read back as JSON when asked.
    let resp = api
        .client
        .put(api.url("/eureka/apps/MY_APP/m-1/metadata?build=42"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let read = |path: &'static str| {
        let req = api
            .client
            .get(api.url(path))
            .header("accept", "application/json");
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let i = read("/eureka/apps/MY_APP/m-1").await;
    assert_eq!(i["instance"]["metadata"]["build"], "42", "{i}");
    assert_eq!(i["instance"]["metadata"]["team"], "red", "{i}");
    assert_eq!(i["instance"]["app"], "MY_APP", "{i}");
    for path in ["/eureka/vips/my_app.vip", "/eureka/v2/svips/MY_APP.SECURE"] {
        let found = read(path).await;
        assert_eq!(
            found["applications"]["application"][0]["instance"][0]["instanceId"], "m-1",
            "{path}: {found}"
        );
    }
    let by_id = read("/eureka/v2/instances/m-1").await;
    assert_eq!(by_id["instance"]["ipAddr"], "127.0.0.31", "{by_id}");

    // A restart keeps the registration, its status and its metadata.
    r.restart();
    assert_eq!(
        dns::a_records(r.dns, "my-app.mesh.internal").await,
        ["127.0.0.31".parse::<IpAddr>().unwrap()]
    );
    let i = read("/eureka/apps/MY_APP/m-1").await;
    assert_eq!(i["instance"]["metadata"]["build"], "42", "{i}");
    assert_eq!(i["instance"]["status"], "UP", "{i}");
    let apps = read("/eureka/apps").await;
    assert_eq!(apps["applications"]["apps__hashcode"], "UP_2_", "{apps}");
    assert_eq!(
        api.client
            .put(api.url("/eureka/apps/MY_APP/m-1"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "its lease goes on"
    );
}

/// With `api.token` set, Eureka writes need it too; Eureka clients carry it as the password
/// of the server URL's credentials (Basic), as py-eureka-client and Spring do.
#[test]
fn a_token_guards_eureka_writes_and_clients_carry_it_in_the_server_url() {
    let token = "s3cret-token";
    let r = Resolver::with(waymark_e2e::Options {
        config: Some(format!("[api]\ntoken = \"{token}\"\n")),
        ..Default::default()
    });
    let dns = Dns::new(&r);
    let api = Api::new(&r);
    let body = xml_instance("TOKENAPP", "t-1", "127.0.0.41", "UP");
    let post = |auth: Option<&str>| {
        let mut req = api
            .client
            .post(api.url("/eureka/apps/TOKENAPP"))
            .body(body.clone());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        dns.rt
            .block_on(async { req.send().await.unwrap().status() })
    };
    assert_eq!(post(None), 403);
    assert_eq!(post(Some("Basic ZXVyZWthOndyb25n")), 403, "eureka:wrong");
    assert_eq!(post(Some(&format!("Bearer {token}"))), 204);
    assert!(dns.answers("tokenapp.mesh.internal", "127.0.0.41"));

    // Without the token the client cannot register; with it in the URL, it can.
    let refused = || -> u64 {
        let metrics = dns
            .rt
            .block_on(async { api.get("/metrics").await.text().await.unwrap() });
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("waymark_api_requests_total{method=\"POST\",status=\"403\"} ")
            })
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    assert_eq!(refused(), 2);
    let mut without = py_client(&r);
    without.cmd("start");
    // Its registration was refused (the library only logs that).
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused() < 3 {
        assert!(Instant::now() < deadline, "no refused registration");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dns.answers("pyapp.mesh.internal", PY_IP));
    drop(without);
    let mut with = py_client_at(&format!("http://eureka:{token}@{}/eureka/", r.http));
    with.cmd("start");
    dns.until("pyapp.mesh.internal", PY_IP, true, Duration::from_secs(5));
    with.cmd("stop");
    assert!(!dns.answers("pyapp.mesh.internal", PY_IP));
}
