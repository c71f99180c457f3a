//! `lb services`: what the pinned maps translate, read straight from the kernel, so it works
//! whether or not the agent runs.

use std::path::PathBuf;

use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::{
    OutputFormat,
    datapath::ServiceMaps,
    model::{BackendAddr, Frontend},
};

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// bpffs directory the agent pinned its maps in.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// One frontend as printed; field names are stable for scripts.
#[derive(Debug, Serialize)]
pub struct ServiceEntry {
    #[serde(flatten)]
    pub frontend: Frontend,
    pub backends: Vec<BackendAddr>,
}

pub fn entries(maps: &ServiceMaps) -> anyhow::Result<Vec<ServiceEntry>> {
    let programmed = maps.read()?.programmed;
    Ok(programmed
        .frontends
        .keys()
        .map(|frontend| ServiceEntry {
            frontend: *frontend,
            backends: programmed.backends_of(frontend),
        })
        .collect())
}

pub fn run(args: ServicesArgs) -> anyhow::Result<()> {
    let maps = ServiceMaps::open_pinned(&args.bpffs)?;
    let entries = entries(&maps)?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        OutputFormat::Table => println!("{}", table(&entries)),
    }
    Ok(())
}

/// `lb stats`: the datapath's per-reason counters.
pub fn stats(args: ServicesArgs) -> anyhow::Result<()> {
    let maps = ServiceMaps::open_pinned(&args.bpffs)?;
    let counters = maps.stats()?;
    match args.output {
        OutputFormat::Json => {
            let object: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(reason, value)| (reason.name().to_owned(), (*value).into()))
                .collect();
            println!("{}", serde_json::to_string_pretty(&object)?);
        }
        OutputFormat::Table => {
            let mut table = Table::new();
            table.load_preset(NOTHING).set_header(["REASON", "COUNT"]);
            for (reason, value) in counters {
                table.add_row([reason.name().to_owned(), value.to_string()]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

fn table(entries: &[ServiceEntry]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_header(["FRONTEND", "BACKENDS"]);
    for entry in entries {
        let backends = if entry.backends.is_empty() {
            "<none>".to_owned()
        } else {
            entry
                .backends
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        table.add_row([entry.frontend.to_string(), backends]);
    }
    table
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    fn entry() -> ServiceEntry {
        ServiceEntry {
            frontend: Frontend {
                address: Ipv4Addr::new(10, 96, 0, 10),
                port: 8888,
                protocol: Protocol::Tcp,
            },
            backends: vec![
                BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, 11),
                    port: 8888,
                },
                BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, 12),
                    port: 8888,
                },
            ],
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let json = serde_json::to_value([entry()]).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "address": "10.96.0.10", "port": 8888, "protocol": "TCP",
                "backends": [
                    {"address": "10.244.0.11", "port": 8888},
                    {"address": "10.244.0.12", "port": 8888},
                ],
            }])
        );
    }

    #[test]
    fn table_lists_every_backend() {
        let text = table(&[entry()]).to_string();
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["FRONTEND", "BACKENDS"]
        );
        assert!(lines[1].contains("10.96.0.10:8888/TCP") && lines[1].contains("10.244.0.11:8888"));
        assert!(lines[2].trim() == "10.244.0.12:8888", "{text}");
    }
}
