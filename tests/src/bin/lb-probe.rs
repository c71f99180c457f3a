//! The test client: asks `address` who it is (or, with `--mode bind-tcp|bind-udp`, binds
//! it), `--count` times, each time on a new socket
//! (or all on one with `--same-socket`, for unconnected UDP), and prints one JSON line per attempt: the pod that answered (HOSTNAME), the peer the
//! application sees (getpeername() for TCP and connected UDP, the reply's source for
//! unconnected UDP), the client address the server saw, and a CLOCK_MONOTONIC timestamp —
//! or the error.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// HTTP GET over TCP.
    Tcp,
    /// sendto()/recvfrom() on an unconnected UDP socket.
    Udp,
    /// connect() then send()/recv() on a UDP socket.
    ConnectedUdp,
    /// bind() (and listen()) a TCP socket to the address; the answer is the bound address.
    BindTcp,
    /// bind() a UDP socket to the address; the answer is the bound address.
    BindUdp,
}

#[derive(Parser)]
struct Args {
    /// Destination, e.g. a Service's clusterIP:port; an IPv6 one (`[::ffff:10.96.0.10]:80`)
    /// is reached from an AF_INET6 socket.
    address: SocketAddr,
    #[arg(long, value_enum, default_value_t = Mode::Tcp)]
    mode: Mode,
    /// Number of attempts, each on a new socket.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Pause between attempts, in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Connect and read timeout, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Stop after this many milliseconds even if `--count` attempts are not done.
    #[arg(long)]
    for_ms: Option<u64>,
    /// Send every attempt from one UDP socket (`--mode udp`, or `connected-udp`: connected
    /// once, before the first attempt).
    #[arg(long)]
    same_socket: bool,
}

struct Answer {
    peer: SocketAddr,
    hostname: String,
    remote_addr: String,
}

fn main() {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.timeout_ms);
    let deadline = args
        .for_ms
        .map(|ms| std::time::Instant::now() + Duration::from_millis(ms));
    let shared = match (args.same_socket, args.mode) {
        (false, _) => None,
        (true, Mode::Udp | Mode::ConnectedUdp) => {
            let socket = udp_socket(args.address, timeout).and_then(|socket| {
                if args.mode == Mode::ConnectedUdp {
                    socket.connect(args.address)?;
                }
                Ok(socket)
            });
            match socket {
                Ok(socket) => Some(socket),
                Err(e) => {
                    eprintln!("lb-probe: a UDP socket: {e}");
                    std::process::exit(1);
                }
            }
        }
        (true, _) => {
            eprintln!("lb-probe: --same-socket needs --mode udp or connected-udp");
            std::process::exit(2);
        }
    };
    for attempt in 0..args.count {
        if deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline) {
            break;
        }
        if attempt > 0 && args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let at_ns = monotonic_ns();
        let result = match args.mode {
            Mode::Tcp => tcp(args.address, timeout),
            Mode::Udp => udp(args.address, timeout, false, shared.as_ref()),
            Mode::ConnectedUdp => udp(args.address, timeout, true, shared.as_ref()),
            Mode::BindTcp => TcpListener::bind(args.address)
                .and_then(|listener| listener.local_addr())
                .map(bound),
            Mode::BindUdp => UdpSocket::bind(args.address)
                .and_then(|socket| socket.local_addr())
                .map(bound),
        };
        let line = match result {
            Ok(answer) => json!({
                "ok": true, "at_ns": at_ns, "peer": answer.peer.to_string(),
                "hostname": answer.hostname, "remote_addr": answer.remote_addr,
            }),
            Err(e) => json!({
                "ok": false, "at_ns": at_ns, "error": e.to_string(),
                "kind": format!("{:?}", e.kind()),
            }),
        };
        println!("{line}");
    }
}

/// A bind's answer: the address bound, no pod.
fn bound(local: SocketAddr) -> Answer {
    Answer {
        peer: local,
        hostname: String::new(),
        remote_addr: String::new(),
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or_default() * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or_default()
        })
        .unwrap_or_default()
}

fn tcp(address: SocketAddr, timeout: Duration) -> std::io::Result<Answer> {
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
    let field = |name: &str| env[name].as_str().unwrap_or_default().to_owned();
    Ok(Answer {
        peer,
        hostname: field("HOSTNAME"),
        remote_addr: field("REMOTE_ADDR"),
    })
}

/// A UDP socket of `to`'s family: an IPv6 destination (v4-mapped ones included) gets an
/// AF_INET6 socket, as a dual-stack runtime makes.
fn udp_socket(to: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let any: std::net::IpAddr = if to.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

fn udp(
    address: SocketAddr,
    timeout: Duration,
    connected: bool,
    shared: Option<&UdpSocket>,
) -> std::io::Result<Answer> {
    let own;
    let socket = match shared {
        Some(socket) => socket,
        None => {
            own = udp_socket(address, timeout)?;
            &own
        }
    };
    let mut buffer = [0u8; 1500];
    let (len, peer) = if connected {
        // A shared socket was connected once, when it was made.
        if shared.is_none() {
            socket.connect(address)?;
        }
        socket.send(b"who")?;
        let len = socket.recv(&mut buffer)?;
        (len, socket.peer_addr()?)
    } else {
        socket.send_to(b"who", address)?;
        socket.recv_from(&mut buffer)?
    };
    Ok(Answer {
        peer,
        hostname: String::from_utf8_lossy(&buffer[..len]).into_owned(),
        remote_addr: String::new(),
    })
}
