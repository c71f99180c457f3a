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
    /// The destination: a Service's VIP:port, or a backend's address for `direct`.
    address: SocketAddr,
    /// Connections timed one by one.
    #[arg(long, default_value_t = 1000)]
    connects: u32,
    /// Window for the connection rate, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    rate_ms: u64,
}

/// What one client run measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientResult {
    pub p50_us: f64,
    pub p99_us: f64,
    pub conns_per_s: f64,
    pub samples: u64,
    pub errors: u64,
}

const TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound of the rate loop, whatever the window: keeps it bounded in count too.
const MAX_RATE_CONNECTS: u32 = 200_000;

fn one(address: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut sink = Vec::with_capacity(4096);
    stream.read_to_end(&mut sink)?;
    if sink.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not a 200 response"))
    }
}

pub fn run(args: ClientArgs) -> anyhow::Result<()> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for _ in 0..args.connects {
        let started = Instant::now();
        match one(args.address) {
            Ok(()) => {
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                histogram.saturating_record(us.max(1));
            }
            Err(_) => errors += 1,
        }
    }
    let window = Duration::from_millis(args.rate_ms);
    let started = Instant::now();
    let mut done = 0u32;
    while started.elapsed() < window && done < MAX_RATE_CONNECTS {
        match one(args.address) {
            Ok(()) => done += 1,
            Err(_) => errors += 1,
        }
    }
    let result = ClientResult {
        p50_us: histogram.value_at_quantile(0.5) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        conns_per_s: f64::from(done) / started.elapsed().as_secs_f64(),
        samples: histogram.len(),
        errors,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
