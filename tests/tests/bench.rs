//! `cargo xtask bench --quick` as a smoke test: every peer produces figures at every size,
//! and so does lb's control plane from every source.
//! Numbers are never judged here; `cargo xtask bench` measures, tests do not.

use std::process::Command;

use lb_tests::{binary, privileged, run};

#[test]
fn quick_bench_gives_every_peer_figures_at_every_size() {
    if !privileged("quick_bench_gives_every_peer_figures_at_every_size") {
        return;
    }
    let out = std::env::temp_dir().join(format!("lbt-bench-{}", std::process::id()));
    let output = run(Command::new(binary("xtask").unwrap())
        .args(["bench", "--quick", "--no-build", "--out"])
        .arg(&out))
    .unwrap();
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let svg = std::fs::read_to_string(out.join("p50.svg")).unwrap();
    drop(std::fs::remove_dir_all(&out));

    let control_plane = results["control_plane"].as_array().unwrap();
    for source in ["yaml", "list-json", "kubernetes"] {
        for services in [1, 100] {
            let m = control_plane
                .iter()
                .find(|m| m["source"] == source && m["services"] == services)
                .unwrap_or_else(|| panic!("no {source} at {services}: {control_plane:?}"));
            assert!(
                m["skipped"].is_null(),
                "{source} at {services} skipped: {m}"
            );
            for figure in [
                "sync_s",
                "change_p50_ms",
                "change_p99_ms",
                "rss_mib",
                "peak_rss_mib",
            ] {
                assert!(
                    m[figure].as_f64().is_some(),
                    "{source} at {services}: no {figure}: {m}"
                );
            }
            assert!(
                m["changes"].as_u64() > Some(0),
                "{source} at {services}: {m}"
            );
        }
        assert!(table.contains(source), "{table}");
    }
    let results = results["peers"].as_array().unwrap();
    let peers = [
        "direct",
        "lb",
        "iptables-nft",
        "iptables-legacy",
        "nftables",
    ];
    for peer in peers {
        for services in [1, 100] {
            let m = results
                .iter()
                .find(|m| m["peer"] == peer && m["services"] == services)
                .unwrap_or_else(|| panic!("no {peer} at {services}: {results:?}"));
            assert!(m["skipped"].is_null(), "{peer} at {services} skipped: {m}");
            for figure in ["connect_p50_us", "connect_p99_us", "conns_per_s", "setup_s"] {
                assert!(
                    m[figure].as_f64().is_some(),
                    "{peer} at {services}: no {figure}: {m}"
                );
            }
            // Every load balancer is compared with a direct client measured alongside it.
            assert_eq!(
                m["paired_direct_p50_us"].as_f64().is_some(),
                peer != "direct",
                "{peer} at {services}: paired_direct_p50_us: {m}"
            );
            if peer == "lb" {
                for figure in [
                    "bpf_ns_per_call",
                    "bpf_ns_per_connect6",
                    "bpf_ns_per_connect6_mapped",
                    "endpoint_change_to_map_ms",
                    "agent_rss_mib",
                ] {
                    assert!(
                        m[figure].as_f64().is_some(),
                        "lb at {services}: no {figure}: {m}"
                    );
                }
            }
        }
        assert!(table.contains(peer), "{table}");
        assert!(
            svg.contains(&format!(">\n{peer}\n<")) || svg.contains(peer),
            "{peer} not in the plot"
        );
    }
}
