//! Hot functions of the DNS fast path, side by side with the work it avoids:
//!
//! - `parse`: reading a query — the fast path's `wire::parse_query` vs hickory's full parse;
//! - `answer`: a whole UDP reply for an A and an SRV query — from the answer cache (a hit)
//!   vs computed and encoded with hickory every time (what a miss costs, and roughly what
//!   every query cost before the cache).
//!
//! `cargo bench -p waymark-resolver --bench dns`. The end-to-end comparison with Knot DNS
//! and NSD is `tests/bench/dns.sh`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use waymark_resolver::dns::fast::{FastPath, Scratch, Verdict};
use waymark_resolver::dns::forward::Forwarder;
use waymark_resolver::dns::server::Handler;
use waymark_resolver::dns::wire::{self, Key};
use waymark_resolver::dns::Zone;
use waymark_resolver::metrics::Metrics;
use waymark_shared::{Instance, Mirror};

const SERVICES: usize = 10_000;

fn handler() -> Arc<Handler> {
    let metrics = Arc::new(Metrics::new());
    let mirror = Arc::new(Mirror::new(0));
    for i in 0..SERVICES {
        for j in 0..3u32 {
            mirror.upsert(Instance {
                id: format!("svc{i}-{j}").into(),
                service: format!("svc{i}").into(),
                address: Ipv4Addr::from(0x0a00_0000 + (i as u32) * 4 + j)
                    .to_string()
                    .into(),
                port: 8080,
                tags: vec![],
                meta: Default::default(),
                weight_passing: 1,
                weight_warning: 1,
                checks: vec![],
                draining: false,
                node: None,
                create_index: 0,
                modify_index: 0,
                extra: None,
            });
        }
    }
    Arc::new(Handler {
        zone: Zone::new("mesh.internal", 5, 5, None),
        consul: None,
        mirror,
        forwarder: Forwarder::new(
            vec![],
            Duration::from_secs(2),
            vec!["127.0.0.0/8".parse().unwrap()],
            16,
            metrics.clone(),
        ),
        vips: waymark_resolver::dns::vips::VipAnswers {
            mode: waymark_resolver::dns::vips::VipMode::Off,
            ttl: 300,
            clients: vec![],
            local_forwarder: Default::default(),
        },
        max_udp_payload: 1232,
        local_clients: vec!["127.0.0.0/8".parse().unwrap()],
        remote_max_udp_payload: 512,
        rrl: None,
        metrics,
    })
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn parse(c: &mut Criterion) {
    let packet = query("svc1234.mesh.internal.", RecordType::A);
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fast path (wire::parse_query)", |b| {
        let mut key = Key::default();
        b.iter(|| {
            let q = wire::parse_query(std::hint::black_box(&packet), &mut key).unwrap();
            key.seal(q.qtype, q.edns_payload.is_some(), false, 512);
            key.as_bytes().len()
        })
    });
    g.bench_function("hickory (Message::from_vec)", |b| {
        b.iter(|| Message::from_vec(std::hint::black_box(&packet)).unwrap())
    });
    g.finish();
}

fn answer(c: &mut Criterion) {
    let handler = handler();
    let cached = FastPath::new(handler.clone(), 100_000);
    let uncached = FastPath::new(handler, 0);
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut g = c.benchmark_group("answer");
    g.throughput(Throughput::Elements(1));
    for (label, name, rtype) in [
        ("A", "svc1234.mesh.internal.", RecordType::A),
        ("SRV", "_svc1230._tcp.mesh.internal.", RecordType::SRV),
        ("NXDOMAIN", "nosuch.mesh.internal.", RecordType::A),
    ] {
        let packet = query(name, rtype);
        for (path, fast) in [("cache hit", &cached), ("computed", &uncached)] {
            let mut scratch = Scratch::default();
            let mut out = vec![0u8; 65_535];
            g.bench_with_input(BenchmarkId::new(path, label), &packet, |b, packet| {
                b.iter(
                    || match fast.answer(packet, client, &mut scratch, &mut out) {
                        Verdict::Reply(n) => n,
                        Verdict::Slow => panic!("a zone query takes the fast path"),
                    },
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, parse, answer);
criterion_main!(benches);
