//! Measurements for the many-hosts benchmark (`tests/bench/etcd.sh`). Not a test.
//!
//! - `propagation`: how long a change made on one host takes to show in another host's DNS
//!   answers, through etcd. Per sample: a new service is registered on host A (with a TTL
//!   check, passing) and host B's DNS is polled until it answers it; then the check fails on
//!   A and B is polled until it answers nothing. Both times run from just before A's API call
//!   (which returns once the registration is durable on A). Prints percentiles as JSON.
//! - `preload`: writes instances straight into etcd, in the registry's key layout, under a
//!   node of its own (no lease), as a large mesh would have them; prints the revision after
//!   the last write.
//!
//! All traffic goes to the addresses given (loopback in the script); every loop is bounded in
//! count and time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hickory_proto::rr::RecordType;
use serde_json::json;
use waymark_e2e::dns;
use waymark_shared::etcd::client::{PutOptions, Txn, TxnOp};
use waymark_shared::etcd::keys::{encode_instance, Layout};
use waymark_shared::etcd::{connect, EtcdConfig};
use waymark_shared::Instance;

const USAGE: &str = "usage:
  etcdbench propagation --api URL --dns ADDR --samples N
  etcdbench preload     --etcd URL[,URL...] --instances N [--per-service K] [--prefix P]";

/// How long one sample may wait for a change to show.
const SAMPLE_LIMIT: Duration = Duration::from_secs(10);

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> anyhow::Result<String> {
    arg(args, name).with_context(|| format!("{name} is needed\n{USAGE}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("propagation") => {
            let api = need(&args, "--api")?;
            let dns_addr: SocketAddr = need(&args, "--dns")?.parse().context("--dns")?;
            let samples: usize = need(&args, "--samples")?.parse().context("--samples")?;
            propagation(&api, dns_addr, samples).await
        }
        Some("preload") => {
            let endpoints = need(&args, "--etcd")?;
            let instances: usize = need(&args, "--instances")?.parse()?;
            let per_service: usize = arg(&args, "--per-service")
                .map_or(Ok(10), |v| v.parse())
                .context("--per-service")?;
            let prefix = arg(&args, "--prefix").unwrap_or_else(|| "/waymark/".into());
            preload(&endpoints, &prefix, instances, per_service).await
        }
        _ => bail!("{USAGE}"),
    }
}

/// Polls `name` on `server` every 200 µs until `done` holds for its answer; the time it took
/// from `since`.
async fn wait_dns(
    server: SocketAddr,
    name: &str,
    since: Instant,
    done: impl Fn(usize) -> bool,
) -> anyhow::Result<Duration> {
    loop {
        let answers = dns::addresses(&dns::udp(server, name, RecordType::A).await).len();
        if done(answers) {
            return Ok(since.elapsed());
        }
        if since.elapsed() > SAMPLE_LIMIT {
            bail!("{name}: no change within {SAMPLE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn propagation(api: &str, server: SocketAddr, samples: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let run = std::process::id();
    let (mut appear, mut vanish) = (Vec::new(), Vec::new());
    for n in 0..samples {
        let service = format!("prop{run}x{n}");
        let name = format!("{service}.mesh.internal");
        let check = format!("{service}-ttl");
        let t0 = Instant::now();
        let resp = http
            .put(format!("{api}/v1/agent/service/register"))
            .json(&json!({
                "ID": service, "Name": service, "Address": "10.77.1.1", "Port": 80,
                "Check": {"CheckID": check, "TTL": "600s", "Status": "passing"}
            }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("register {service}: {}", resp.status());
        }
        appear.push(wait_dns(server, &name, t0, |n| n > 0).await?);
        let t1 = Instant::now();
        let resp = http
            .put(format!("{api}/v1/agent/check/fail/{check}"))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("fail {check}: {}", resp.status());
        }
        vanish.push(wait_dns(server, &name, t1, |n| n == 0).await?);
        // Leave the registry as it was.
        http.put(format!("{api}/v1/agent/service/deregister/{service}"))
            .send()
            .await?;
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        json!({"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0)})
    };
    println!(
        "{}",
        json!({"samples": samples, "registered": stats(&mut appear), "failed": stats(&mut vanish)})
    );
    Ok(())
}

async fn preload(
    endpoints: &str,
    prefix: &str,
    instances: usize,
    per_service: usize,
) -> anyhow::Result<()> {
    let config = EtcdConfig {
        endpoints: endpoints.split(',').map(String::from).collect(),
        prefix: prefix.into(),
        ..EtcdConfig::default()
    };
    let layout = Layout::new(prefix)?;
    let (client, _) = connect(&config, 0).await?;
    let started = Instant::now();
    let per_txn = 100;
    let batches: Vec<Vec<usize>> = (0..instances)
        .collect::<Vec<_>>()
        .chunks(per_txn)
        .map(<[usize]>::to_vec)
        .collect();
    // Eight transactions in flight at a time.
    let mut revision = 0;
    for group in batches.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for batch in group {
            let (mut c, layout, batch) = (client.clone(), layout.clone(), batch.clone());
            set.spawn(async move {
                let ops: Vec<TxnOp> = batch
                    .iter()
                    .map(|&i| {
                        let service = format!("load{}", i / per_service.max(1));
                        let id = format!("load-{i}");
                        let ip = std::net::Ipv4Addr::from(0x0a40_0000u32 + i as u32);
                        let inst = Instance::new(&service, &id, &ip.to_string(), 8080);
                        TxnOp::put(
                            layout.instance_key("bench-preload", &service, &id),
                            encode_instance(&inst),
                            None::<PutOptions>,
                        )
                    })
                    .collect();
                c.txn(Txn::new().and_then(ops)).await
            });
        }
        while let Some(done) = set.join_next().await {
            let resp = done??;
            revision = revision.max(resp.header().map_or(0, |h| h.revision()));
        }
    }
    println!(
        "{}",
        json!({"instances": instances, "revision": revision, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}
