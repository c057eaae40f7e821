//! Data, load and checks for the DNS performance benchmark (`tests/bench/dns.sh`). Not a
//! test: the script runs it around dnsperf, Knot DNS and NSD.
//!
//! Every server gets the same data, derived from the service count alone:
//! service `i` is `svc<i>` with instances `svc<i>-0..2` on `10.0.0.0 + 4i + j`, port 8080;
//! every tenth service also has SRV records in the peers' zone (Waymark answers SRV for every
//! service) and those services are the SRV queries' targets.
//!
//! - `zone`: writes the zone file the peers load and the dnsperf query file (80% A of
//!   existing services, 10% SRV, 10% names that do not exist).
//! - `load`: registers the same services through Waymark's HTTP API (Consul agent API).
//! - `churn`: changes the registry at a fixed rate for a fixed time: a fourth instance is
//!   registered or deregistered, or the TTL check of an SRV service's first instance flips
//!   between passing and critical. Prints the rate it reached.
//! - `verify`: checks a sample of DNS answers against the registry while it changes: an answer
//!   counts only when the service's index (`X-Consul-Index` of the health endpoint) is the same
//!   before and after the DNS query, and then it must equal the registry's passing set.
//!
//! All traffic goes to the addresses given (loopback in the script); every loop is bounded in
//! count and time.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use waymark_e2e::dns;

const USAGE: &str = "usage:
  dnsbench zone    --services N --dir DIR [--queries Q]
  dnsbench load    --api URL --services N [--concurrency C]
  dnsbench churn   --api URL --services N --rate R --seconds S
  dnsbench verify  --api URL --dns ADDR --services N --samples K --seconds S";

const ZONE: &str = "mesh.internal";
const INSTANCES: usize = 3;
const PORT: u16 = 8080;
/// Every SRV_EVERY-th service is an SRV target (and has a TTL check that churn flips).
const SRV_EVERY: usize = 10;
/// Long enough never to expire during a run: churn flips it by hand.
const FLIP_TTL: &str = "24h";

fn service(i: usize) -> String {
    format!("svc{i}")
}

fn instance_id(i: usize, j: usize) -> String {
    format!("svc{i}-{j}")
}

fn address(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i * 4 + j) as u32)
}

fn has_srv(i: usize) -> bool {
    i.is_multiple_of(SRV_EVERY)
}

struct Args(Vec<String>);

impl Args {
    fn get(&self, flag: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == flag)
            .and_then(|p| self.0.get(p + 1))
            .map(String::as_str)
    }
    fn req(&self, flag: &str) -> anyhow::Result<&str> {
        self.get(flag)
            .with_context(|| format!("{flag} is required\n{USAGE}"))
    }
    fn num(&self, flag: &str, default: Option<usize>) -> anyhow::Result<usize> {
        match (self.get(flag), default) {
            (Some(v), _) => v.parse().with_context(|| format!("{flag} {v:?}")),
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("{flag} is required\n{USAGE}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        bail!("{USAGE}");
    };
    let args = Args(argv[1..].to_vec());
    match cmd.as_str() {
        "zone" => zone(
            args.num("--services", None)?,
            PathBuf::from(args.req("--dir")?),
            args.num("--queries", Some(1_000_000))?,
        ),
        "load" => {
            load(
                args.req("--api")?,
                args.num("--services", None)?,
                args.num("--concurrency", Some(32))?,
            )
            .await
        }
        "churn" => {
            churn(
                args.req("--api")?,
                args.num("--services", None)?,
                args.num("--rate", None)?,
                args.num("--seconds", None)?,
            )
            .await
        }
        "verify" => {
            verify(
                args.req("--api")?,
                args.req("--dns")?.parse().context("--dns")?,
                args.num("--services", None)?,
                args.num("--samples", None)?,
                args.num("--seconds", None)?,
            )
            .await
        }
        _ => bail!("unknown command {cmd:?}\n{USAGE}"),
    }
}

/// The zone file for Knot DNS and NSD, and the dnsperf query file.
fn zone(services: usize, dir: PathBuf, queries: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir)?;
    let mut z = String::with_capacity(services * 200);
    writeln!(z, "$ORIGIN {ZONE}.\n$TTL 5")?;
    writeln!(z, "@ SOA ns hostmaster 1 3600 600 86400 5")?;
    writeln!(z, "@ NS ns\nns A 127.0.0.1")?;
    for i in 0..services {
        let svc = service(i);
        for j in 0..INSTANCES {
            writeln!(z, "{svc} A {}", address(i, j))?;
        }
        if has_srv(i) {
            for j in 0..INSTANCES {
                let target = format!("{}.instance.{svc}", instance_id(i, j));
                writeln!(z, "_{svc}._tcp SRV 1 1 {PORT} {target}")?;
                writeln!(z, "{target} A {}", address(i, j))?;
            }
        }
    }
    std::fs::write(dir.join("mesh.internal.zone"), z)?;

    let mut rng = fastrand::Rng::with_seed(7);
    let mut q = String::with_capacity(queries * 32);
    let srv_services = services.div_ceil(SRV_EVERY);
    for _ in 0..queries {
        match rng.u32(0..10) {
            0 => writeln!(
                q,
                "_svc{}._tcp.{ZONE} SRV",
                rng.usize(..srv_services) * SRV_EVERY
            )?,
            1 => writeln!(q, "nosuch{}.{ZONE} A", rng.u64(..))?,
            _ => writeln!(q, "svc{}.{ZONE} A", rng.usize(..services))?,
        }
    }
    std::fs::write(dir.join("queries.txt"), q)?;
    println!(
        "wrote {} and {} ({services} services, {queries} queries)",
        dir.join("mesh.internal.zone").display(),
        dir.join("queries.txt").display()
    );
    Ok(())
}

fn registration(i: usize, j: usize) -> Value {
    let mut body = json!({
        "ID": instance_id(i, j),
        "Name": service(i),
        "Address": address(i, j).to_string(),
        "Port": PORT,
    });
    if has_srv(i) && j == 0 {
        body["Check"] = json!({"TTL": FLIP_TTL, "Status": "passing"});
    }
    body
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// PUTs and requires success; with `gone_ok`, a 404 counts too (a deregistration that
/// raced its registration) and is reported as `false`.
async fn put(
    http: &reqwest::Client,
    url: String,
    body: Option<&Value>,
    gone_ok: bool,
) -> anyhow::Result<bool> {
    let req = http.put(&url);
    let req = match body {
        Some(b) => req.json(b),
        None => req,
    };
    let resp = req.send().await.with_context(|| format!("PUT {url}"))?;
    let status = resp.status();
    if gone_ok && status == reqwest::StatusCode::NOT_FOUND {
        return Ok(false);
    }
    ensure!(
        status.is_success(),
        "PUT {url}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(true)
}

/// Registers every instance, `concurrency` requests at a time.
async fn load(api: &str, services: usize, concurrency: usize) -> anyhow::Result<()> {
    let http = client();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let total = (services * INSTANCES) as u64;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (http, next, api) = (http.clone(), next.clone(), api.to_string());
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    return anyhow::Ok(());
                }
                let (i, j) = (k as usize / INSTANCES, k as usize % INSTANCES);
                let url = format!("{api}/v1/agent/service/register");
                put(&http, url, Some(&registration(i, j)), false).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "registered {total} instances of {services} services in {secs:.1} s ({:.0}/s)",
        total as f64 / secs
    );
    Ok(())
}

/// What `churn` changes, and the fourth instances it has registered (so that it deregisters
/// only instances that exist).
struct Churn {
    api: String,
    services: usize,
    rng: fastrand::Rng,
    extra: Vec<usize>,
    has_extra: HashSet<usize>,
}

impl Churn {
    /// The next change: registering a fourth instance, deregistering one, or flipping the
    /// health of an SRV service's first instance.
    fn next(&mut self) -> (String, Option<Value>) {
        let api = &self.api;
        match self.rng.u32(0..3) {
            1 if !self.extra.is_empty() => {
                let i = self.extra.swap_remove(self.rng.usize(..self.extra.len()));
                self.has_extra.remove(&i);
                let id = instance_id(i, INSTANCES);
                (format!("{api}/v1/agent/service/deregister/{id}"), None)
            }
            0 | 1 => {
                let i = self.rng.usize(..self.services);
                if self.has_extra.insert(i) {
                    self.extra.push(i);
                }
                let body = json!({
                    "ID": instance_id(i, INSTANCES),
                    "Name": service(i),
                    "Address": address(i, INSTANCES).to_string(),
                    "Port": PORT,
                });
                (format!("{api}/v1/agent/service/register"), Some(body))
            }
            _ => {
                let i = self.rng.usize(..self.services.div_ceil(SRV_EVERY)) * SRV_EVERY;
                let verb = if self.rng.bool() { "pass" } else { "fail" };
                let check = format!("service:{}", instance_id(i, 0));
                (format!("{api}/v1/agent/check/{verb}/{check}"), None)
            }
        }
    }
}

/// Changes the registry `rate` times a second for `seconds`, paced in 10 ms ticks.
async fn churn(api: &str, services: usize, rate: usize, seconds: usize) -> anyhow::Result<()> {
    let http = client();
    let mut changes = Churn {
        api: api.to_string(),
        services,
        rng: fastrand::Rng::with_seed(11),
        extra: Vec::new(),
        has_extra: HashSet::new(),
    };
    let tick = Duration::from_millis(10);
    let per_tick = rate as f64 * tick.as_secs_f64();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds as u64);
    let mut due = 0.0;
    let (mut done, mut raced) = (0u64, 0u64);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    while Instant::now() < deadline {
        interval.tick().await;
        due += per_tick;
        while due >= 1.0 {
            due -= 1.0;
            let (url, body) = changes.next();
            let http = http.clone();
            inflight.spawn(async move { put(&http, url, body.as_ref(), true).await });
        }
        while let Some(r) = inflight.try_join_next() {
            done += 1;
            raced += u64::from(!r??);
        }
        ensure!(
            inflight.len() < 10_000,
            "the registry fell behind the churn"
        );
    }
    while let Some(r) = inflight.join_next().await {
        done += 1;
        raced += u64::from(!r??);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "churn: {done} changes in {secs:.1} s ({:.0}/s; {raced} deregistrations found the instance already gone)",
        done as f64 / secs
    );
    Ok(())
}

/// One UDP query with EDNS (1232 bytes), so that no answer here is truncated.
async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    dns::send_udp(server, &dns::query(name, qtype, Some(1232)))
        .await
        .0
}

/// The passing addresses of a service from the registry, and its index.
async fn registry_state(
    http: &reqwest::Client,
    api: &str,
    svc: &str,
) -> anyhow::Result<(BTreeSet<IpAddr>, u64)> {
    let resp = http
        .get(format!("{api}/v1/health/service/{svc}?passing"))
        .send()
        .await?;
    let index = resp.headers()["x-consul-index"].to_str()?.parse()?;
    let entries: Value = resp.json().await?;
    let ips = entries
        .as_array()
        .context("health entries")?
        .iter()
        .map(|e| e["Service"]["Address"].as_str().unwrap_or_default().parse())
        .collect::<Result<_, _>>()?;
    Ok((ips, index))
}

/// Checks `samples` answers (A and SRV of random services, and non-existent names) against
/// the registry, within `seconds`.
async fn verify(
    api: &str,
    dns_addr: SocketAddr,
    services: usize,
    samples: usize,
    seconds: usize,
) -> anyhow::Result<()> {
    let http = client();
    let mut rng = fastrand::Rng::with_seed(13);
    let deadline = Instant::now() + Duration::from_secs(seconds as u64);
    let (mut checked, mut raced, mut wrong) = (0usize, 0usize, 0usize);
    while checked < samples && Instant::now() < deadline {
        let kind = rng.u32(0..10);
        if kind == 0 {
            let name = format!("nosuch{}.{ZONE}.", rng.u64(..));
            let reply = ask(dns_addr, &name, RecordType::A).await;
            if reply.metadata.response_code != ResponseCode::NXDomain {
                wrong += 1;
                eprintln!("{name}: {:?}, not NXDOMAIN", reply.metadata.response_code);
            }
            checked += 1;
            continue;
        }
        // Half of the service samples go to SRV services, whose health flips.
        let i = if kind < 5 {
            rng.usize(..services.div_ceil(SRV_EVERY)) * SRV_EVERY
        } else {
            rng.usize(..services)
        };
        let svc = service(i);
        let (qname, qtype) = if kind.is_multiple_of(2) && has_srv(i) {
            (format!("_{svc}._tcp.{ZONE}."), RecordType::SRV)
        } else {
            (format!("{svc}.{ZONE}."), RecordType::A)
        };
        let (want, before) = registry_state(&http, api, &svc).await?;
        let reply = ask(dns_addr, &qname, qtype).await;
        let (_, after) = registry_state(&http, api, &svc).await?;
        if before != after {
            raced += 1;
            continue;
        }
        let got: BTreeSet<IpAddr> = match qtype {
            RecordType::SRV => reply
                .additionals
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect(),
            _ => dns::addresses(&reply).into_iter().collect(),
        };
        let srv_count = reply
            .answers
            .iter()
            .filter(|r| matches!(r.data, RData::SRV(_)))
            .count();
        let srv_ok = qtype != RecordType::SRV || srv_count == want.len();
        if got != want || !srv_ok {
            wrong += 1;
            eprintln!("{qname} {qtype}: DNS {got:?}, registry {want:?}");
        }
        checked += 1;
    }
    println!("verify: {checked} answers checked, {wrong} wrong, {raced} skipped (changed during the check)");
    ensure!(wrong == 0, "{wrong} wrong answers");
    ensure!(checked > 0, "no answer could be checked");
    Ok(())
}
