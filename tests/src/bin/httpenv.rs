//! A small stand-in for the seeds' `jpetazzo/httpenv` image: an HTTP server that answers
//! every request with its environment as a JSON object (HOSTNAME names the pod).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8888")]
    listen: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen)?;
    let body = serde_json::to_string_pretty(
        &std::env::vars().collect::<std::collections::BTreeMap<_, _>>(),
    )?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let body = body.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, &body) {
                eprintln!("httpenv: {e}");
            }
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
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
    stream.flush()
}
