//! `waymark-gateway ingress` (pingora owns the process) and `waymark-gateway forwarder`
//! (the per-host forwarder); in both, flags override the config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use waymark_gateway::config::{AccessLog, Config, DataPath};

/// mimalloc: the proxy path allocates and frees many small buffers per request, which
/// glibc's malloc serves several times slower (see tests/bench/results/gateway.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "waymark-gateway",
    version,
    about = "Waymark's ingress gateway and per-host forwarder"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Public HTTP(S) in, to healthy instances of registered services.
    Ingress(IngressArgs),
    /// The per-host forwarder: every service's VIP:port, to healthy instances.
    Forwarder(ForwarderArgs),
    /// Parses and validates a config file; prints it with every default filled in.
    CheckConfig {
        /// The file is a forwarder's config (`forwarder --config`), not the ingress's.
        #[arg(long)]
        forwarder: bool,
        /// The TOML config file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct IngressArgs {
    /// TOML config file; flags override it. Without one, every setting has its default.
    #[arg(long, env = "WAYMARK_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Plain HTTP listener [default: 0.0.0.0:8080]. Port 0: any free port; the bound
    /// addresses are printed on the `waymark-gateway listening` line.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TLS listener (HTTP/1.1 and HTTP/2 by ALPN); needs --tls-dir [default: none].
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// Directory of <server-name>.crt / <server-name>.key pairs, picked by SNI.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// The registry's HTTP address (a resolver's --http-addr) [default: http://127.0.0.1:8500].
    #[arg(long)]
    registry: Option<String>,
    /// Admin listener: /metrics, /healthz/live, /healthz/ready [default: 127.0.0.1:9901].
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Accept HTTP/2 without TLS on the plain listener.
    #[arg(long)]
    h2c: bool,
    /// Access log format: text, json or off [default: text].
    #[arg(long)]
    access_log: Option<String>,
    /// The HTTP/1.1 data path: lean or pingora [default: lean].
    #[arg(long)]
    data_path: Option<String>,
    /// Logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Args)]
struct ForwarderArgs {
    /// TOML config file; flags override it. Without one, every setting has its default.
    #[arg(long, env = "WAYMARK_FORWARDER_CONFIG")]
    config: Option<PathBuf>,
    /// The local registry's HTTP address [default: http://127.0.0.1:8500].
    #[arg(long)]
    registry: Option<String>,
    /// Admin listener: /metrics, /healthz/live, /healthz/ready [default: 127.0.0.1:9902].
    /// Port 0: any free port, printed on the `waymark-gateway forwarder listening` line.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// This host's name in the mesh (a DNS label) [default: the machine's host name].
    #[arg(long)]
    host_name: Option<String>,
    /// The address it registers with [default: 127.0.0.1].
    #[arg(long)]
    advertise_address: Option<std::net::IpAddr>,
    /// The mesh's mutual-TLS listener that other hosts' forwarders call
    /// [default: 0.0.0.0:15008]. Port 0: any free port, printed as `inbound=`.
    #[arg(long)]
    inbound_addr: Option<SocketAddr>,
    /// The registry's join token (`waymark-resolver ca join-token`): puts the forwarder in
    /// the mesh.
    #[arg(long, env = "WAYMARK_JOIN_TOKEN", conflicts_with = "join_token_file")]
    join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Where the host's key and certificate are kept [default: /var/lib/waymark/forwarder].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Ingress(args) => {
            waymark_shared::telemetry::init(args.log_json);
            ingress(args)
        }
        Command::Forwarder(args) => {
            waymark_shared::telemetry::init(args.log_json);
            forwarder(args)
        }
        Command::CheckConfig {
            forwarder: true,
            file,
        } => check_forwarder_config(&file),
        Command::CheckConfig { file, .. } => check_config(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "waymark-gateway: {}",
                waymark_shared::report::chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Everything `ingress` checks before it binds: the file, its values, the certificates.
fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    config.validate()?;
    if let (Some(dir), Some(_)) = (&config.tls_dir, config.tls_listen) {
        waymark_gateway::tls::CertStore::load(dir)
            .with_context(|| format!("loading certificates from {}", dir.display()))?;
    }
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(())
}

/// Everything `forwarder` checks before it binds.
fn check_forwarder_config(file: &std::path::Path) -> anyhow::Result<()> {
    use waymark_gateway::forwarder::config::ForwarderConfig;
    let config = ForwarderConfig::load(file)?.with_host_name_default();
    config.validate()?;
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(())
}

fn ingress(args: IngressArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(a) = args.listen {
        config.listen = Some(a);
    }
    if let Some(a) = args.tls_listen {
        config.tls_listen = Some(a);
    }
    if let Some(d) = args.tls_dir {
        config.tls_dir = Some(d);
    }
    if let Some(r) = args.registry {
        config.registry = r;
    }
    if let Some(a) = args.admin_addr {
        config.admin_addr = a;
    }
    if args.h2c {
        config.h2c = true;
    }
    if let Some(f) = args.access_log {
        config.access_log = match f.as_str() {
            "text" => AccessLog::Text,
            "json" => AccessLog::Json,
            "off" => AccessLog::Off,
            other => anyhow::bail!("--access-log {other:?}: expected text, json or off"),
        };
    }
    if let Some(p) = args.data_path {
        config.data_path = match p.as_str() {
            "pingora" => DataPath::Pingora,
            "lean" => DataPath::Lean,
            other => anyhow::bail!("--data-path {other:?}: expected pingora or lean"),
        };
    }
    waymark_gateway::run(config, args.config)
}

fn forwarder(args: ForwarderArgs) -> anyhow::Result<()> {
    use waymark_gateway::forwarder::config::ForwarderConfig;
    let mut config = match &args.config {
        Some(path) => ForwarderConfig::load(path)?,
        None => ForwarderConfig::default(),
    };
    if let Some(r) = args.registry {
        config.registry = r;
    }
    if let Some(a) = args.admin_addr {
        config.admin_addr = a;
    }
    if let Some(h) = args.host_name {
        config.host_name = h;
    }
    if let Some(a) = args.advertise_address {
        config.advertise_address = a;
    }
    if let Some(a) = args.inbound_addr {
        config.mesh.inbound_addr = a;
    }
    if let Some(t) = args.join_token {
        config.mesh.join_token = t;
        config.mesh.join_token_file = None;
    }
    if let Some(f) = args.join_token_file {
        config.mesh.join_token_file = Some(f);
        config.mesh.join_token.clear();
    }
    if let Some(d) = args.state_dir {
        config.mesh.state_dir = d;
    }
    waymark_gateway::forwarder::run(config.with_host_name_default())
}
