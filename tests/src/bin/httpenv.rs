//! A small stand-in for the seeds' `jpetazzo/httpenv` image: an HTTP server that answers
//! every request with its environment as a JSON object (HOSTNAME names the pod), plus
//! REMOTE_ADDR, the client address as the server sees it. With `--udp` it also answers each
//! datagram on the same port with its HOSTNAME.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address to listen on; repeat for several (an IPv4 and an IPv6 one for a dual-stack
    /// pod).
    #[arg(long, default_value = "0.0.0.0:8888")]
    listen: Vec<String>,
    /// Also answer UDP datagrams on the same address.
    #[arg(long)]
    udp: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut listeners = Vec::new();
    for address in &args.listen {
        if args.udp {
            let socket = UdpSocket::bind(address)?;
            let hostname = env.get("HOSTNAME").cloned().unwrap_or_default();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 1500];
                while let Ok((_, from)) = socket.recv_from(&mut buffer) {
                    if let Err(e) = socket.send_to(hostname.as_bytes(), from) {
                        eprintln!("httpenv: udp reply to {from}: {e}");
                    }
                }
            });
        }
        listeners.push(TcpListener::bind(address)?);
    }
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let env = env.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let env = env.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = serve(stream, env) {
                            eprintln!("httpenv: {e}");
                        }
                    });
                }
            })
        })
        .collect();
    for thread in accepting {
        let _ = thread.join();
    }
    Ok(())
}

fn serve(stream: TcpStream, mut env: BTreeMap<String, String>) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    env.insert("REMOTE_ADDR".into(), stream.peer_addr()?.to_string());
    let body = serde_json::to_string_pretty(&env)?;
    let mut reader = BufReader::new(&stream);
    // Read the request head; the body of a GET is empty.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut stream = &stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}
