//! kube-proxy's rule layouts for N Services of three endpoints each, generated as the text
//! `iptables-restore` and `nft -f` load: the peers lb is compared with.

use std::fmt::Write as _;

pub use lb_tests::generate::{BenchService, manifests, services};

/// A chain-name suffix as kube-proxy makes them: 16 characters from a hash.
fn chain_hash(text: &str) -> String {
    // FNV-1a: stable across runs and platforms, which is all a chain name needs.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016X}")
}

/// kube-proxy's iptables layout: KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*, the endpoint
/// picked by `statistic --mode random --probability 1/(n-i)`, then DNAT.
pub fn iptables(services: &[BenchService]) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for service in services {
        let svc = format!("KUBE-SVC-{}", chain_hash(&service.name));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"default/{}\" -m tcp --dport {} -j {svc}",
            service.vip, service.name, service.port
        );
        let n = service.endpoints.len();
        for (i, (ip, port)) in service.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{}/{ip}:{port}", service.name))
            );
            let _ = writeln!(chains, ":{sep} - [0:0]");
            if i + 1 < n {
                let probability = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    rules,
                    "-A {svc} -m statistic --mode random --probability {probability:.11} -j {sep}"
                );
            } else {
                let _ = writeln!(rules, "-A {svc} -j {sep}");
            }
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

/// kube-proxy's nftables layout: a verdict map from (daddr, protocol, port) to a chain per
/// Service, which picks an endpoint chain with `numgen random`, which DNATs.
pub fn nftables(services: &[BenchService]) -> String {
    let mut out = String::from(
        "table ip kube-proxy {\n\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n",
    );
    if !services.is_empty() {
        out += "\t\telements = {\n";
        for (index, service) in services.iter().enumerate() {
            let comma = if index + 1 < services.len() { "," } else { "" };
            let _ = writeln!(
                out,
                "\t\t\t{} . tcp . {} : goto service-{}{comma}",
                service.vip, service.port, service.name
            );
        }
        out += "\t\t}\n";
    }
    out += "\t}\n\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n";
    out += "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n";
    for service in services {
        let _ = writeln!(out, "\tchain service-{} {{", service.name);
        let arms: Vec<String> = (0..service.endpoints.len())
            .map(|i| format!("{i} : goto endpoint-{}-{i}", service.name))
            .collect();
        let _ = writeln!(
            out,
            "\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
            service.endpoints.len(),
            arms.join(", ")
        );
        for (i, (ip, port)) in service.endpoints.iter().enumerate() {
            let _ = writeln!(
                out,
                "\tchain endpoint-{}-{i} {{\n\t\tmeta l4proto tcp dnat to {ip}:{port}\n\t}}",
                service.name
            );
        }
    }
    out + "}\n"
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn three() -> Vec<(Ipv4Addr, u16)> {
        (10..13)
            .map(|i| (Ipv4Addr::new(10, 244, 0, i), 8888))
            .collect()
    }

    #[test]
    fn iptables_follows_kube_proxys_layout() {
        let rules = iptables(&services(2, &three()));
        let lines: Vec<&str> = rules.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines.last(), Some(&"COMMIT"));
        let svc = format!("KUBE-SVC-{}", chain_hash("svc-2"));
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m comment --comment \"default/svc-2\" -m tcp --dport 80 -j {svc}"
        )));
        // 1/3, then 1/2, then the rest.
        let picks: Vec<&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc} ")))
            .copied()
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(
            picks[0].contains("--probability 0.33333333333"),
            "{}",
            picks[0]
        );
        assert!(
            picks[1].contains("--probability 0.50000000000"),
            "{}",
            picks[1]
        );
        assert!(!picks[2].contains("statistic"));
        assert_eq!(
            rules
                .matches("-j DNAT --to-destination 10.244.0.12:8888")
                .count(),
            2
        );
        // The Service under test is the last one KUBE-SERVICES reaches.
        let last = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last.contains("10.96.0.2/32"));
        // Chain names fit iptables' 28 characters.
        assert!(
            lines.iter().filter(|l| l.starts_with(':')).all(|l| l
                .split_whitespace()
                .next()
                .unwrap()
                .len()
                <= 29)
        );
    }

    #[test]
    fn nftables_uses_a_verdict_map_and_numgen() {
        let rules = nftables(&services(2, &three()));
        assert!(rules.contains("10.96.0.1 . tcp . 80 : goto service-svc-1,"));
        assert!(rules.contains("10.96.0.2 . tcp . 80 : goto service-svc-2\n"));
        assert!(rules.contains("numgen random mod 3 vmap { 0 : goto endpoint-svc-2-0, 1 : goto endpoint-svc-2-1, 2 : goto endpoint-svc-2-2 }"));
        assert!(rules.contains("meta l4proto tcp dnat to 10.244.0.11:8888"));
        assert_eq!(rules.matches('{').count(), rules.matches('}').count());
    }

    #[test]
    fn vips_are_distinct_and_in_the_service_range() {
        let all = services(100_000, &three());
        assert_eq!(all[0].vip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(all[99_999].vip, Ipv4Addr::new(10, 97, 134, 160));
        let manifest = manifests(&all[..1]);
        assert!(manifest.contains("clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 8888}]"));
    }
}
