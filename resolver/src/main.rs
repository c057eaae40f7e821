//! `waymark-resolver`: the command line. Everything it runs lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use waymark_resolver::ca::{Created, MeshCa};
use waymark_resolver::config::Config;
use waymark_resolver::{app, client, demo};

#[derive(Parser)]
#[command(
    name = "waymark-resolver",
    version,
    about = "Waymark's DNS resolver and embedded service registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve DNS for the mesh zone and the registration API.
    Serve(ServeArgs),
    /// Run a local mesh: the resolver, demo services registered through the API, and (from
    /// the `waymark-gateway` binary) a forwarder and the ingress gateway.
    Demo(DemoArgs),
    /// Check a config file (and the services file it names) as `serve` would, and print it
    /// with every default filled in.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Register an instance with a running resolver.
    Register(client::RegisterArgs),
    /// Deregister an instance from a running resolver.
    Deregister {
        /// The instance (service) ID.
        id: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// List the registered instances and their health.
    List {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// The mesh certificate authority that signs forwarders' certificates.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The `waymark-gateway` binary that runs the forwarder and the gateway [default: the one
    /// beside this executable, else the one on the PATH].
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// The resolver and the demo services only: no forwarder, no gateway.
    #[arg(long, conflicts_with = "gateway_bin")]
    no_mesh: bool,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the mesh CA in the data dir (`serve` also creates it on its first start), or
    /// with --rotate add a new root beside the current one: peers trust both, and the new
    /// one signs from the resolver's next start.
    Init {
        /// The resolver's data dir [default: ./waymark-data].
        #[arg(long, default_value = "waymark-data")]
        data_dir: PathBuf,
        /// The SPIFFE trust domain of host identities [default: mesh.internal].
        #[arg(long, default_value = "mesh.internal")]
        trust_domain: String,
        /// Add a new root to an existing CA.
        #[arg(long)]
        rotate: bool,
    },
    /// Print the join token that forwarders present to have their certificates signed.
    JoinToken {
        /// The resolver's data dir [default: ./waymark-data].
        #[arg(long, default_value = "waymark-data")]
        data_dir: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// DNS listen address, UDP and TCP [default: 127.0.0.1:8600]. Port 0: any free port;
    /// the bound addresses are printed on the `waymark-resolver listening` line.
    #[arg(long)]
    dns_addr: Option<SocketAddr>,
    /// Registration API, admin and metrics listen address [default: 127.0.0.1:8500].
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// Where registrations are kept across restarts [default: ./waymark-data, relative to
    /// the working directory; the demo uses a temporary directory, removed when it stops].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The zone to answer for (default mesh.internal).
    #[arg(long)]
    zone: Option<String>,
    /// Upstream resolver for names outside the zone (repeatable) [default: the nameservers
    /// in /etc/resolv.conf].
    #[arg(long = "upstream")]
    upstreams: Vec<SocketAddr>,
    /// Log JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Require api.token for reads of the registry too, not only for writes.
    #[arg(long)]
    token_for_reads: bool,
    /// Where service VIPs are allocated from [default: 127.77.0.0/16].
    #[arg(long, value_name = "CIDR")]
    vip_range: Option<waymark_shared::vip::VipRange>,
    /// Who is answered a service's VIP rather than its instances' addresses: auto (clients
    /// on this host, while a forwarder on this host is ready), local, all, or off
    /// [default: auto].
    #[arg(long, value_name = "MODE")]
    vip_answers: Option<waymark_resolver::dns::vips::VipMode>,
    /// When the data dir is not consistent (a missing snapshot, a damaged log), start from
    /// what is readable instead of refusing to start: the damaged files are renamed with a
    /// `.damaged-<time>` suffix and what was dropped is logged.
    #[arg(long)]
    recover_readable: bool,
    /// etcd as the registry of record for many hosts: its members' client URLs
    /// (`http://10.0.0.1:2379,...`). Registrations made here are kept here and written to
    /// etcd; DNS answers what etcd holds [default: none, the embedded registry alone].
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Where in etcd the registry lives [default: /waymark/].
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// This host's name in the registry [default: the machine's host name].
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// etcd user, as `NAME` or `NAME:PASSWORD` (the password may also come from
    /// WAYMARK_ETCD_PASSWORD).
    #[arg(long, value_name = "NAME[:PASSWORD]")]
    etcd_user: Option<String>,
    /// The CA of etcd's certificates, for https endpoints (etcdctl's --cacert).
    #[arg(long, value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// A client certificate for etcd, and its key (etcdctl's --cert and --key).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(a) = self.dns_addr {
            c.dns.addr = a;
        }
        if let Some(a) = self.http_addr {
            c.api.addr = a;
        }
        if let Some(d) = &self.data_dir {
            c.store.data_dir = d.clone();
        }
        if let Some(z) = &self.zone {
            c.dns.zone = z.clone();
        }
        if !self.upstreams.is_empty() {
            c.dns.upstreams = self.upstreams.clone();
        }
        if let Some(r) = self.vip_range {
            c.vips.range = r;
        }
        if !self.etcd.is_empty() {
            c.etcd.endpoints = self.etcd.clone();
        }
        if let Some(p) = &self.etcd_prefix {
            c.etcd.prefix = p.clone();
        }
        if let Some(n) = &self.node_name {
            c.etcd.node_name = Some(n.clone());
        }
        if let Some(user) = &self.etcd_user {
            let (name, password) = match user.split_once(':') {
                Some((n, p)) => (n.to_string(), Some(p.to_string())),
                None => (user.clone(), std::env::var("WAYMARK_ETCD_PASSWORD").ok()),
            };
            c.etcd.username = Some(name);
            c.etcd.password = password;
        }
        if let Some(f) = &self.etcd_cacert {
            c.etcd.ca_file = Some(f.clone());
        }
        if let Some(f) = &self.etcd_cert {
            c.etcd.cert_file = Some(f.clone());
        }
        if let Some(f) = &self.etcd_key {
            c.etcd.key_file = Some(f.clone());
        }
        if let Some(m) = self.vip_answers {
            c.vips.answers = m;
        }
        c.log_json |= self.log_json;
        c.api.token_for_reads |= self.token_for_reads;
        c.store.recover_readable = self.recover_readable;
        c.validate()?;
        Ok(c)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "waymark-resolver: {}",
                waymark_shared::report::chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            waymark_shared::telemetry::init(config.log_json);
            let bound = app::build(config).await.context("cannot start")?;
            println!(
                "waymark-resolver listening dns={} http={}",
                bound.dns_addr, bound.http_addr
            );
            shutdown_signal().await;
            tracing::info!("shutting down");
            bound.shutdown(Duration::from_secs(10)).await;
            Ok(())
        }
        Command::Demo(DemoArgs {
            serve: args,
            gateway_bin,
            no_mesh,
        }) => {
            let mut config = args.config()?;
            // Without a data dir of its own, the demo keeps its state in a temporary one.
            let scratch = (args.data_dir.is_none() && args.config.is_none())
                .then(|| std::env::temp_dir().join(format!("waymark-demo-{}", std::process::id())));
            if let Some(dir) = &scratch {
                config.store.data_dir = dir.clone();
            }
            waymark_shared::telemetry::init(config.log_json);
            let gateway = if no_mesh {
                None
            } else {
                let found = demo::mesh::find_gateway(gateway_bin.as_deref());
                if found.is_none() {
                    eprintln!(
                        "waymark-resolver demo: waymark-gateway is neither beside this program \
                         nor on the PATH (cargo build --bins builds it): running without the \
                         forwarder and the gateway"
                    );
                }
                found
            };
            let running = demo::start(config, demo::Options { gateway }).await?;
            println!("{}", running.instructions());
            shutdown_signal().await;
            running.stop().await;
            if let Some(dir) = scratch {
                let _ = std::fs::remove_dir_all(dir);
            }
            Ok(())
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            config.validate()?;
            if let Some(sf) = &config.services_file {
                waymark_resolver::services_file::check(&sf.path)?;
            }
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Register(args) => client::register(args).await,
        Command::Deregister { id, conn } => client::deregister(&conn, &id).await,
        Command::List { conn } => client::list(&conn).await,
        Command::Ca(CaCommand::Init {
            data_dir,
            trust_domain,
            rotate,
        }) => {
            let dir = MeshCa::dir_of(&data_dir);
            match MeshCa::init(&dir, &trust_domain, rotate)? {
                Created::New => println!(
                    "created the mesh CA in {} (trust domain {trust_domain}); the join token \
                     is in {}",
                    dir.display(),
                    dir.join("join-token").display()
                ),
                Created::Rotated => println!(
                    "added a new root to the mesh CA in {}: peers trust both roots; the new \
                     one signs from the resolver's next start",
                    dir.display()
                ),
                Created::Existing => println!(
                    "a mesh CA already exists in {}: nothing changed (--rotate adds a root)",
                    dir.display()
                ),
            }
            Ok(())
        }
        Command::Ca(CaCommand::JoinToken { data_dir }) => {
            println!("{}", MeshCa::read_join_token(&MeshCa::dir_of(&data_dir))?);
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
