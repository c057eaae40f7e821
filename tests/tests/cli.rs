//! What a person sees at the command line: refusals that say what is wrong, once, with a
//! non-zero exit; `check-config` that checks what `serve` checks; client commands that print
//! the resolver's message rather than its JSON; help that states the defaults; a gateway that
//! refuses a port in use and stops at once on SIGTERM when nothing is in flight.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_e2e::gateway::{gateway_bin, Gateway, GatewayOptions};
use waymark_e2e::process::Proc;
use waymark_e2e::{resolver_bin, Api, Resolver};

fn run(bin: std::path::PathBuf, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("run binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn an_error_says_its_cause_once_in_both_binaries() {
    let missing = "/nonexistent/waymark-cli-test.toml";
    let cause = "No such file or directory";
    for out in [
        run(resolver_bin(), &["check-config", missing]),
        run(resolver_bin(), &["serve", "--config", missing]),
        run(gateway_bin(), &["check-config", missing]),
        run(gateway_bin(), &["ingress", "--config", missing]),
    ] {
        let err = stderr(&out);
        assert!(!out.status.success(), "accepted: {err}");
        assert!(err.contains(missing), "names the file: {err}");
        assert_eq!(err.matches(cause).count(), 1, "the cause once: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn check_config_refuses_what_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("resolver.toml");
    let services = dir.path().join("services.toml");
    std::fs::write(
        &config,
        format!("[services_file]\npath = \"{}\"\n", services.display()),
    )
    .unwrap();
    // The services file does not exist: serve refuses, and so must check-config.
    let checked = run(resolver_bin(), &["check-config", config.to_str().unwrap()]);
    assert!(
        !checked.status.success(),
        "accepted a missing services file"
    );
    assert!(
        stderr(&checked).contains(services.to_str().unwrap()),
        "{}",
        stderr(&checked)
    );
    // A services file with an invalid entry: refused with the entry named.
    std::fs::write(
        &services,
        "[[service]]\nname = \"db\"\nport = 5432\n[[service.check]]\ninterval = \"5\"\ntcp = \"127.0.0.1:5432\"\n",
    )
    .unwrap();
    let checked = run(resolver_bin(), &["check-config", config.to_str().unwrap()]);
    assert!(
        !checked.status.success(),
        "accepted an interval without unit"
    );
    assert!(
        stderr(&checked).contains("unit is missing"),
        "{}",
        stderr(&checked)
    );
    // A good one passes, printed with its defaults.
    std::fs::write(
        &services,
        "[[service]]\nname = \"db\"\nport = 5432\n[[service.check]]\ninterval = \"5s\"\ntcp = \"127.0.0.1:5432\"\n",
    )
    .unwrap();
    let checked = run(resolver_bin(), &["check-config", config.to_str().unwrap()]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert!(stdout(&checked).contains("[dns]"), "{}", stdout(&checked));
    // An invalid value that only validate() catches.
    std::fs::write(&config, "[dns]\nttl = 100000\n").unwrap();
    let checked = run(resolver_bin(), &["check-config", config.to_str().unwrap()]);
    assert!(!checked.status.success(), "accepted dns.ttl over a day");
    assert!(stderr(&checked).contains("dns.ttl"), "{}", stderr(&checked));
}

#[test]
fn help_states_the_defaults() {
    let serve = stdout(&run(resolver_bin(), &["serve", "--help"]));
    for says in [
        "waymark-data",
        "127.0.0.1:8600",
        "127.0.0.1:8500",
        "resolv.conf",
    ] {
        assert!(
            serve.contains(says),
            "serve --help lacks {says:?}:\n{serve}"
        );
    }
    let register = stdout(&run(resolver_bin(), &["register", "--help"]));
    for says in [
        "--address",
        "IP address",
        "--port",
        "--meta",
        "KEY=VALUE",
        "unit",
    ] {
        assert!(
            register.contains(says),
            "register --help lacks {says:?}:\n{register}"
        );
    }
    let ingress = stdout(&run(gateway_bin(), &["ingress", "--help"]));
    for says in [
        "0.0.0.0:8080",
        "127.0.0.1:9901",
        "http://127.0.0.1:8500",
        "[default: text]",
    ] {
        assert!(
            ingress.contains(says),
            "ingress --help lacks {says:?}:\n{ingress}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_print_messages_meta_and_draining() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let addr = r.http.to_string();
    let client = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--addr", &addr]);
        run(resolver_bin(), &all)
    };

    // A unit-less interval is refused before anything is sent.
    let out = client(&[
        "register",
        "--name",
        "x",
        "--address",
        "127.0.0.1",
        "--port",
        "1",
        "--tcp-check",
        "127.0.0.1:1",
        "--interval",
        "5",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unit is missing"), "{}", stderr(&out));
    assert!(api.registered_ids().await.is_empty());

    // A refusal by the API prints its message, not its JSON.
    let out = client(&[
        "register",
        "--name",
        "x",
        "--address",
        "127.0.0.1",
        "--port",
        "1",
        "--http-check",
        "not a url",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("400"), "{err}");
    assert!(!err.contains("{\""), "raw JSON: {err}");

    // --meta reaches the registry.
    let out = client(&[
        "register",
        "--name",
        "web",
        "--id",
        "web-1",
        "--address",
        "127.0.0.1",
        "--port",
        "8080",
        "--meta",
        "gateway.host=web.test",
        "--meta",
        "team=a=b",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("registered web-1"));
    let services: Value = api.get("/v1/agent/services").await.json().await.unwrap();
    assert_eq!(
        services["web-1"]["Meta"],
        json!({"gateway.host": "web.test", "team": "a=b"})
    );

    // list: passing, then draining while in maintenance.
    let list = || stdout(&client(&["list"]));
    let line = |text: String| {
        text.lines()
            .find(|l| l.contains("web-1"))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line(list()).contains("passing"), "{}", list());
    let resp = api
        .put_empty("/v1/agent/service/maintenance/web-1?enable=true&reason=deploy")
        .await;
    assert_eq!(resp.status(), 200);
    let drained = line(list());
    assert!(drained.contains("draining"), "{drained}");
    assert!(!drained.contains("critical"), "{drained}");
}

#[test]
fn a_second_gateway_on_a_port_in_use_is_refused_at_once() {
    let r = Resolver::start();
    let first = Gateway::start(&r, GatewayOptions::default());
    let taken = first.http.to_string();
    let admin = "127.0.0.1:0";
    let started = Instant::now();
    let mut cmd = Command::new(gateway_bin());
    cmd.args(["ingress", "--listen", &taken, "--admin-addr", admin])
        .args(["--registry", &format!("http://{}", r.http)]);
    let out = cmd.output().expect("run the gateway");
    assert!(!out.status.success(), "a second gateway started");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!("http listener {taken}: the address is in use")),
        "{err}"
    );
    assert!(
        !stdout(&out).contains("listening"),
        "announced a listener it does not have: {}",
        stdout(&out)
    );
    // A plain listener holding the port is refused the same way.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap().to_string();
    let out = Command::new(gateway_bin())
        .args(["ingress", "--listen", &held_addr, "--admin-addr", admin])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the address is in use"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_gateway_announces_the_ports_it_bound_for_port_zero() {
    let r = Resolver::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(gateway_bin());
    cmd.args([
        "ingress",
        "--listen",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .args(["--registry", &format!("http://{}", r.http)]);
    let (mut proc, announced) = Proc::spawn(
        cmd,
        "waymark-gateway",
        &dir.path().join("gw.log"),
        "waymark-gateway listening ",
        Duration::from_secs(30),
    )
    .expect("gateway starts");
    let http = announced.need("http").unwrap();
    let admin = announced.need("admin").unwrap();
    assert_ne!(http.port(), 0);
    assert_ne!(admin.port(), 0);
    assert_eq!(announced.addr("tls"), None);
    // Announced only once it accepts: the first connection succeeds.
    std::net::TcpStream::connect(http).expect("http listener accepts");
    std::net::TcpStream::connect(admin).expect("admin listener accepts");
    assert!(proc.running());
}

#[test]
fn an_idle_gateway_stops_at_once_on_sigterm() {
    let r = Resolver::start();
    // A long grace period: the gateway must not sit it out when nothing is in flight.
    let mut gw = Gateway::start(
        &r,
        GatewayOptions::config("[shutdown]\ngrace_period = \"30s\"\ntimeout = \"5s\"\n"),
    );
    // An idle kept-alive connection does not hold the shutdown either.
    let _idle = std::net::TcpStream::connect(gw.http).unwrap();
    let (status, took) = gw
        .terminate(Duration::from_secs(20))
        .expect("exited after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
