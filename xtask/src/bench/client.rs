//! The benchmark client, run as `xtask bench-client` inside the client pod: connect, one
//! HTTP request and response, close — timed one by one into an HDR histogram, then as many
//! as fit in a time window for the rate. Bounded in count and in time.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The destination: a Service's VIP:port; for `direct`, the backends' addresses, taken
    /// in turn, so that a direct client spreads over the same pods a load balancer would.
    #[arg(required = true, num_args = 1..)]
    addresses: Vec<SocketAddr>,
    /// Connections timed one by one.
    #[arg(long, default_value_t = 1000)]
    connects: u32,
    /// Window for the connection rate, in milliseconds (0: no rate measured).
    #[arg(long, default_value_t = 1000)]
    rate_ms: u64,
}

/// What one client run measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientResult {
    /// Each timed connection's latency, for histograms over several runs.
    pub latencies_us: Vec<u64>,
    /// `None` when no rate window was asked for.
    pub conns_per_s: Option<f64>,
    pub errors: u64,
}

const TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound of the rate loop, whatever the window: keeps it bounded in count too.
const MAX_RATE_CONNECTS: u32 = 200_000;

/// One connection: connect, GET, read the whole response, close. The close is a reset
/// (SO_LINGER 0), so no side keeps the 4-tuple in TIME_WAIT: tens of thousands of short
/// connections per run would otherwise collide with their own predecessors' ports and
/// measure the TIME_WAIT handling, not the load balancer.
fn one(address: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::with_capacity(4096);
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..n]);
        if complete(&response) {
            break;
        }
    }
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(std::io::Error::from)?;
    if response.starts_with(b"HTTP/1.1 200") && complete(&response) {
        Ok(())
    } else {
        Err(std::io::Error::other("no complete 200 response"))
    }
}

/// Whether `response` holds the head and the Content-Length bytes of body it announces.
fn complete(response: &[u8]) -> bool {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..head_end]);
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    length.is_some_and(|length| response.len() >= head_end + 4 + length)
}

/// A histogram for connection latencies in µs, from 1 µs to a minute.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

pub fn run(args: ClientArgs) -> anyhow::Result<()> {
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    let mut targets = args.addresses.iter().copied().cycle();
    for _ in 0..args.connects {
        let Some(address) = targets.next() else { break };
        let started = Instant::now();
        match one(address) {
            Ok(()) => latencies_us.push(
                u64::try_from(started.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
            Err(_) => errors += 1,
        }
    }
    let conns_per_s = (args.rate_ms > 0).then(|| {
        let window = Duration::from_millis(args.rate_ms);
        let started = Instant::now();
        let mut done = 0u32;
        while let Some(address) = targets.next()
            && started.elapsed() < window
            && done < MAX_RATE_CONNECTS
        {
            match one(address) {
                Ok(()) => done += 1,
                Err(_) => errors += 1,
            }
        }
        f64::from(done) / started.elapsed().as_secs_f64()
    });
    let result = ClientResult {
        latencies_us,
        conns_per_s,
        errors,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
