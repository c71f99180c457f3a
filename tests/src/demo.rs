//! `cargo xtask demo`: the seeds' first exercise through lb's datapath. A Deployment
//! `httpenv` of three pods is exposed as a ClusterIP Service on port 8888
//! (`kubectl expose deployment httpenv --port 8888`), and a client pod curls it ten times
//! through the kubelet-style `HTTPENV_SERVICE_HOST`/`HTTPENV_SERVICE_PORT` variables.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context as _, ensure};

use crate::{Testbed, run};

const CLUSTER_IP: &str = "10.107.92.157";
const PORT: u16 = 8888;
const PODS: [(&str, Ipv4Addr); 3] = [
    ("httpenv-7cc9888d59-s9sj6", Ipv4Addr::new(10, 244, 1, 11)),
    ("httpenv-7cc9888d59-k2x4p", Ipv4Addr::new(10, 244, 1, 12)),
    ("httpenv-7cc9888d59-q8wzm", Ipv4Addr::new(10, 244, 1, 13)),
];
const REQUESTS: usize = 10;

/// The Service and EndpointSlice as `kubectl get -o yaml` shows them after the expose.
fn manifest() -> String {
    let endpoints: String = PODS
        .iter()
        .map(|(name, ip)| {
            format!(
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-1\n  targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: httpenv
  namespace: default
  labels: {{app: httpenv}}
spec:
  clusterIP: {CLUSTER_IP}
  clusterIPs: [{CLUSTER_IP}]
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  ports:
  - port: {PORT}
    protocol: TCP
    targetPort: {PORT}
  selector: {{app: httpenv}}
  sessionAffinity: None
  type: ClusterIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: httpenv-x7k2q
  namespace: default
  labels:
    kubernetes.io/service-name: httpenv
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
{endpoints}ports:
- name: ""
  port: {PORT}
  protocol: TCP
"#
    )
}

pub fn run_demo() -> anyhow::Result<()> {
    let mut testbed = Testbed::new()?;
    println!(
        "== a private node: pod netns on a bridge, cgroup {}",
        testbed.cgroup.display()
    );
    for (name, ip) in PODS {
        let pod = testbed.add_pod(&name[name.len() - 5..], ip)?;
        let pod = crate::Pod {
            name: name.to_owned(),
            ..pod
        };
        testbed.serve_httpenv(&pod, PORT)?;
        println!("   pod {name} at {ip}:{PORT} (httpenv)");
    }
    let client = testbed.add_pod("tmp-shell", Ipv4Addr::new(10, 244, 2, 2))?;
    println!("   pod tmp-shell at {} (client)", client.ip);

    testbed.write_manifest("httpenv.yaml", &manifest())?;
    println!(
        "\n== kubectl expose deployment httpenv --port {PORT}  (as manifests in {})",
        testbed.manifests.display()
    );
    testbed.start_agent()?;
    testbed.wait_for_frontend(
        &format!("{CLUSTER_IP}:{PORT}/TCP"),
        Some(
            &PODS
                .map(|(_, ip)| format!("{ip}:{PORT}"))
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
    )?;
    println!("\n== lb services");
    print!("{}", testbed.lb(&["services"])?);

    println!(
        "\n== in pod tmp-shell: curl -s http://$HTTPENV_SERVICE_HOST:$HTTPENV_SERVICE_PORT/ | jq .HOSTNAME  (x{REQUESTS})"
    );
    let mut seen = BTreeSet::new();
    for i in 1..=REQUESTS {
        let output = run(testbed
            .pod_command(&client, "sh")?
            .args([
                "-c",
                "curl -sS --max-time 3 http://$HTTPENV_SERVICE_HOST:$HTTPENV_SERVICE_PORT/",
            ])
            .env("HTTPENV_SERVICE_HOST", CLUSTER_IP)
            .env("HTTPENV_SERVICE_PORT", PORT.to_string()))?;
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("request {i}: not httpenv's JSON"))?;
        let hostname = reply["HOSTNAME"].as_str().unwrap_or_default().to_owned();
        println!("   {i:>2}: \"{hostname}\"");
        seen.insert(hostname);
    }
    println!("\n== lb stats");
    print!("{}", testbed.lb(&["stats"])?);
    testbed.stop_agent()?;
    ensure!(
        seen.len() >= 2,
        "only {seen:?} answered {REQUESTS} requests through {CLUSTER_IP}:{PORT}"
    );
    println!(
        "\n{} distinct pods answered {REQUESTS} requests to {CLUSTER_IP}:{PORT}, translated at connect() with no NAT; cleaning up.",
        seen.len()
    );
    Ok(())
}
