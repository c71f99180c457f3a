//! The test client: GETs `/` from an address, `--count` times, one fresh connection each,
//! and prints one JSON line per attempt: the pod that answered (HOSTNAME), the peer the
//! socket is connected to, or the error.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Destination, e.g. a Service's clusterIP:port.
    address: SocketAddr,
    /// Number of requests, each on a new connection.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Connect and read timeout, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

fn main() {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.timeout_ms);
    for _ in 0..args.count {
        let line = match get(args.address, timeout) {
            Ok((peer, hostname)) => {
                json!({"ok": true, "peer": peer.to_string(), "hostname": hostname})
            }
            Err(e) => {
                json!({"ok": false, "error": e.to_string(), "kind": format!("{:?}", e.kind())})
            }
        };
        println!("{line}");
    }
}

fn get(address: SocketAddr, timeout: Duration) -> std::io::Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| std::io::Error::other("no HTTP response"))?;
    let env: serde_json::Value = serde_json::from_str(body).map_err(std::io::Error::other)?;
    let hostname = env["HOSTNAME"].as_str().unwrap_or_default().to_owned();
    Ok((peer, hostname))
}
