//! A line-echo TCP server for the forwarder's end-to-end tests, run as its own process so
//! tests can kill and restart it. Every line it reads comes back as `<id> <line>`; when the
//! client ends its side (a half-close), it answers `<id> bye` and closes.
//!
//! - `--addr IP:PORT` (default `127.0.0.1:0`), `--id NAME`.
//!
//! Prints `line_echo listening ADDR` once it accepts connections.

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    #[arg(long, default_value = "echo")]
    id: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.addr).await?;
    println!("line_echo listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => continue,
        };
        let id = args.id.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if w.write_all(format!("{id} {line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = w.write_all(format!("{id} bye\n").as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}
