//! `lb explain ADDRESS:PORT[/PROTO]`: what the datapath does with a connect() or sendmsg()
//! to that destination — the frontend it matches, the slot table, each candidate endpoint and
//! why it is or is not a backend — computed with the lb-common code the programs run.
//! `lb explain [NAMESPACE/]NAME` does so for every frontend of a Service.

use std::net::SocketAddr;

use lb_common::{FLAG_HOST_NETNS_ONLY, FLAG_NODE_LOCAL, backend_slot};
use serde::Serialize;

use super::{CliError, Format, Pins, emit, open, state};
use crate::model::{EndpointState, Frontend, Protocol};

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The destination, e.g. 10.96.0.10:80 or 10.96.0.10:53/UDP (TCP if no protocol); an
    /// AF_INET6 socket's v4-mapped [::ffff:10.96.0.10]:80 is the same frontend. Or a
    /// Service, `NAMESPACE/NAME` (or `NAME` in `default`): each of its frontends.
    #[arg(value_name = "ADDRESS:PORT[/PROTO] | [NAMESPACE/]NAME", value_parser = parse_target)]
    pub destination: Target,
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub pins: Pins,
}

/// What `lb explain` is asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Destination(Frontend),
    /// A Service, `namespace/name`.
    Service(String),
}

/// A destination, else a Service name (`[NAMESPACE/]NAME`, DNS labels as the API has
/// them), else the destination's error.
fn parse_target(text: &str) -> Result<Target, DestinationError> {
    let destination_error = match parse_destination(text) {
        Ok(frontend) => return Ok(Target::Destination(frontend)),
        Err(e) => e,
    };
    let (namespace, name) = text.split_once('/').unwrap_or(("default", text));
    let is_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if is_label(namespace) && is_label(name) && !name.bytes().all(|b| b.is_ascii_digit()) {
        Ok(Target::Service(format!("{namespace}/{name}")))
    } else {
        Err(destination_error)
    }
}

/// Why `lb explain`'s destination is not one.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error(transparent)]
    Protocol(#[from] crate::model::Invalid),
    #[error(
        "{0:?} is not an ADDRESS:PORT (IPv4, or IPv6 in brackets: [fd00::10]:80) nor a Service's [NAMESPACE/]NAME"
    )]
    Address(String),
}

fn parse_destination(text: &str) -> Result<Frontend, DestinationError> {
    let (address, protocol) = match text.rsplit_once('/') {
        Some((address, protocol)) => (address, protocol.to_ascii_uppercase()),
        None => (text, "TCP".to_owned()),
    };
    let protocol = Protocol::from_api(Some(&protocol))?;
    let not_one = || DestinationError::Address(address.to_owned());
    let destination = address.parse::<SocketAddr>().map_err(|_| not_one())?;
    // The datapath translates a v4-mapped destination through the IPv4 frontends.
    let ip = match destination.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    Ok(Frontend {
        address: ip,
        port: destination.port(),
        protocol,
    })
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub destination: String,
    /// What happens, in one sentence.
    pub verdict: String,
    pub frontend: Option<FrontendView>,
    /// Frontends on the same address and port with another protocol.
    pub other_protocols: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct FrontendView {
    pub service: Option<String>,
    pub kind: Option<String>,
    pub port_name: Option<String>,
    pub frontend_id: u32,
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: u32,
    pub slots: Vec<SlotView>,
    /// Every endpoint of the Service port and why it is or is not a backend.
    pub endpoints: Vec<EndpointState>,
}

#[derive(Debug, Serialize)]
pub struct SlotView {
    pub slot: u16,
    pub backend_id: u32,
    /// `ip:port`, or `null` if the id does not resolve.
    pub backend: Option<String>,
    /// The share of random draws `lb_common::backend_slot` sends to this slot.
    pub share: f64,
}

/// The share of draws that `backend_slot` maps to each slot, over a run of consecutive
/// entropy values (as good as any run of `bpf_get_prandom_u32` values for a modulo).
fn slot_shares(count: u16) -> Vec<f64> {
    const SAMPLES: u32 = 1 << 16;
    let mut hits = vec![0u32; usize::from(count)];
    for entropy in 0..SAMPLES {
        if let Some(slot) = backend_slot(count, entropy) {
            hits[usize::from(slot - 1)] += 1;
        }
    }
    hits.into_iter()
        .map(|h| f64::from(h) / f64::from(SAMPLES))
        .collect()
}

pub fn run(args: ExplainArgs) -> Result<(), CliError> {
    let maps = open(&args.pins)?;
    let state = state(&args.pins)?;
    let programmed = maps.read()?.programmed;
    let cluster_ips = maps.cluster_ips()?;
    let explain = |wanted: Frontend| explain(wanted, &programmed, state.as_ref(), &cluster_ips);
    match args.destination {
        Target::Destination(wanted) => {
            let explanation = explain(wanted);
            emit(args.format.output, &explanation, |wide| {
                text(&explanation, wide)
            })
        }
        Target::Service(service) => {
            let explanations: Vec<Explanation> = state
                .iter()
                .flat_map(|s| &s.frontends)
                .filter(|n| n.service == service)
                .map(|n| explain(n.frontend))
                .collect();
            if explanations.is_empty() {
                return Err(CliError::NoService {
                    service,
                    state_dir: args.pins.state_dir,
                });
            }
            emit(args.format.output, &explanations, |wide| {
                explanations
                    .iter()
                    .map(|e| text(e, wide))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

/// What the datapath does with a connect() or sendmsg() to `wanted`, given the maps
/// (`programmed`, `cluster_ips`) and the agent's names for them (`state`).
fn explain(
    wanted: Frontend,
    programmed: &crate::plan::Programmed,
    state: Option<&crate::state::State>,
    cluster_ips: &std::collections::BTreeSet<std::net::IpAddr>,
) -> Explanation {
    let destination = wanted.to_string();
    let other_protocols = programmed
        .frontends
        .keys()
        .filter(|f| {
            f.address == wanted.address && f.port == wanted.port && f.protocol != wanted.protocol
        })
        .map(ToString::to_string)
        .collect();

    match programmed.frontends.get(&wanted) {
        None => Explanation {
            // As the programs decide: a clusterIP on a port none of its Services has is
            // refused; any other destination is not theirs.
            verdict: if cluster_ips.contains(&wanted.address) {
                format!(
                    "a clusterIP on a port none of its Services has: a connect() or sendmsg() to {}:{} fails at once with ECONNREFUSED (unknown_port)",
                    wanted.address, wanted.port
                )
            } else {
                format!(
                    "not a frontend: a connect() or sendmsg() to {}:{} is left as it is",
                    wanted.address, wanted.port
                )
            },
            destination,
            frontend: None,
            other_protocols,
        },
        Some(master) => {
            let names = state
                .iter()
                .flat_map(|s| &s.frontends)
                .find(|n| n.frontend == wanted);
            let count = u16::try_from(master.slots.len()).unwrap_or(u16::MAX);
            let shares = slot_shares(count);
            let slots: Vec<SlotView> = master
                .slots
                .iter()
                .zip(shares)
                .enumerate()
                .map(|(index, (id, share))| SlotView {
                    slot: u16::try_from(index + 1).unwrap_or(u16::MAX),
                    backend_id: *id,
                    backend: programmed.backends.get(id).map(ToString::to_string),
                    share,
                })
                .collect();
            let mut flags = Vec::new();
            if master.flags & FLAG_NODE_LOCAL != 0 {
                flags.push("node-local");
            }
            if master.flags & FLAG_HOST_NETNS_ONLY != 0 {
                flags.push("host-netns-only");
            }
            let verdict = verdict(&wanted, master.flags, master.affinity_timeout_s, &slots);
            Explanation {
                destination,
                verdict,
                frontend: Some(FrontendView {
                    service: names.map(|n| n.service.clone()),
                    kind: names.map(|n| n.kind.to_string()),
                    port_name: names.map(|n| n.port_name.clone()),
                    frontend_id: master.id,
                    flags,
                    affinity_timeout_s: master.affinity_timeout_s,
                    slots,
                    endpoints: names.map(|n| n.endpoints.clone()).unwrap_or_default(),
                }),
                other_protocols,
            }
        }
    }
}

fn verdict(frontend: &Frontend, flags: u16, affinity_timeout_s: u32, slots: &[SlotView]) -> String {
    let scope = if flags & FLAG_HOST_NETNS_ONLY != 0 {
        "from the node's own network namespace only (in a pod, 127.0.0.1 is the pod's own): "
    } else {
        ""
    };
    if slots.is_empty() {
        let why = if flags & FLAG_NODE_LOCAL != 0 {
            "no usable endpoint on this node (internalTrafficPolicy: Local)"
        } else {
            "no usable endpoint"
        };
        return format!("{scope}refused at once with ECONNREFUSED: {why}");
    }
    if let Some(broken) = slots.iter().find(|s| s.backend.is_none()) {
        return format!(
            "{scope}slot {} names backend {}, which does not exist: connects that draw it are left untranslated (backend_missing)",
            broken.slot, broken.backend_id
        );
    }
    let n = slots.len();
    let affinity = if affinity_timeout_s == 0 && frontend.protocol == Protocol::Udp && n > 1 {
        "; an unconnected socket keeps the backend of its first datagram while that backend stays"
            .to_owned()
    } else if affinity_timeout_s == 0 {
        String::new()
    } else {
        format!(
            "; a client network namespace that connected within {affinity_timeout_s}s keeps its backend"
        )
    };
    let what = if frontend.protocol == Protocol::Tcp {
        "connect()"
    } else {
        "connect() or sendmsg()"
    };
    if n == 1 {
        format!("{scope}a {what} is rewritten to its only backend{affinity}")
    } else {
        format!(
            "{scope}a {what} is rewritten to one of {n} backends, each drawn with probability 1/{n}{affinity}"
        )
    }
}

fn text(explanation: &Explanation, wide: bool) -> String {
    let mut out = format!("{}\n  {}\n", explanation.destination, explanation.verdict);
    if !explanation.other_protocols.is_empty() {
        out += &format!(
            "  other protocols on this address and port: {}\n",
            explanation.other_protocols.join(", ")
        );
    }
    let Some(frontend) = &explanation.frontend else {
        return out;
    };
    out += &format!(
        "\nservice   {}{}\nkind      {}\n",
        frontend.service.as_deref().unwrap_or("?"),
        frontend
            .port_name
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(|p| format!(" (port {p})"))
            .unwrap_or_default(),
        frontend.kind.as_deref().unwrap_or("?"),
    );
    if wide {
        out += &format!(
            "frontend  id {}, flags [{}], affinity {}s\n",
            frontend.frontend_id,
            frontend.flags.join(", "),
            frontend.affinity_timeout_s
        );
    }
    let mut slots = super::table(["SLOT", "BACKEND", "ID", "SHARE"]);
    for slot in &frontend.slots {
        slots.add_row([
            slot.slot.to_string(),
            slot.backend.clone().unwrap_or_else(|| "(missing)".into()),
            slot.backend_id.to_string(),
            format!("{:.1}%", slot.share * 100.0),
        ]);
    }
    out += &format!("\n{slots}\n");
    if !frontend.endpoints.is_empty() {
        let mut endpoints = super::table([
            "ENDPOINT",
            "READY",
            "SERVING",
            "TERMINATING",
            "NODE",
            "BACKEND?",
        ]);
        for e in &frontend.endpoints {
            endpoints.add_row([
                format!("{}:{}", e.address, e.port),
                e.ready.to_string(),
                e.serving.to_string(),
                e.terminating.to_string(),
                e.node_name.clone().unwrap_or_else(|| "-".into()),
                match &e.excluded {
                    None => "yes".into(),
                    Some(why) => format!("no: {why}"),
                },
            ]);
        }
        out += &format!("\n{endpoints}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn a_service_name_is_explained_by_its_frontends() {
        assert_eq!(
            parse_target("web").unwrap(),
            Target::Service("default/web".into())
        );
        assert_eq!(
            parse_target("shop/web-2").unwrap(),
            Target::Service("shop/web-2".into())
        );
        assert!(matches!(
            parse_target("10.96.0.10:80/udp").unwrap(),
            Target::Destination(_)
        ));
        for bad in ["10.96.0.10", "Web", "shop/", "-web", "80"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn destinations_parse_with_and_without_protocol() {
        assert_eq!(
            parse_destination("10.96.0.10:53/udp").unwrap(),
            Frontend {
                address: IpAddr::from([10, 96, 0, 10]),
                port: 53,
                protocol: Protocol::Udp
            }
        );
        assert_eq!(
            parse_destination("10.96.0.10:80").unwrap().protocol,
            Protocol::Tcp
        );
        assert!(
            parse_destination("10.96.0.10")
                .unwrap_err()
                .to_string()
                .contains("not an ADDRESS:PORT")
        );
        assert_eq!(
            parse_destination("[::ffff:10.96.0.10]:53/UDP").unwrap(),
            parse_destination("10.96.0.10:53/UDP").unwrap()
        );
        assert_eq!(
            parse_destination("[fd00::10]:80").unwrap().address,
            "fd00::10".parse::<IpAddr>().unwrap()
        );
        assert!(
            parse_destination("10.96.0.10:80/ICMP")
                .unwrap_err()
                .to_string()
                .contains("unknown protocol")
        );
    }

    #[test]
    fn slot_shares_are_even_and_sum_to_one() {
        for count in [1u16, 2, 3, 7] {
            let shares = slot_shares(count);
            assert_eq!(shares.len(), usize::from(count));
            let sum: f64 = shares.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{shares:?}");
            for share in shares {
                assert!(
                    (share - 1.0 / f64::from(count)).abs() < 0.01,
                    "{count}: {share}"
                );
            }
        }
    }
}
