//! `cargo xtask demo`: the seeds' first exercise through lb's datapath. A Deployment
//! `httpenv` of three pods is exposed as a ClusterIP Service on port 8888
//! (`kubectl expose deployment httpenv --port 8888`), and a client pod with the resolv.conf
//! kubelet writes curls it ten times by name (`curl httpenv:8888`), the name served by the
//! agent's cluster DNS (`--dns`); then a headless variant's name lists the three pods, and
//! an ExternalName Service is a CNAME.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context as _, ensure};

use crate::{NODE_IP, Testbed, run};

const CLUSTER_IP: &str = "10.107.92.157";
const PORT: u16 = 8888;
const PODS: [(&str, Ipv4Addr); 3] = [
    ("httpenv-7cc9888d59-s9sj6", Ipv4Addr::new(10, 244, 1, 11)),
    ("httpenv-7cc9888d59-k2x4p", Ipv4Addr::new(10, 244, 1, 12)),
    ("httpenv-7cc9888d59-q8wzm", Ipv4Addr::new(10, 244, 1, 13)),
];
const REQUESTS: usize = 10;

/// A headless Service of the same pods (`clusterIP: None`), and an ExternalName Service.
fn more_manifests() -> String {
    let endpoints: Vec<String> = PODS
        .iter()
        .map(|(_, ip)| format!("{{addresses: [\"{ip}\"]}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: httpenv-headless, namespace: default}}\n\
         spec: {{clusterIP: None, ports: [{{port: {PORT}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: httpenv-headless-1, namespace: default, labels: {{kubernetes.io/service-name: httpenv-headless}}}}\n\
         addressType: IPv4\nendpoints: [{}]\nports: [{{port: {PORT}}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: docs, namespace: default}}\n\
         spec: {{type: ExternalName, externalName: kubernetes.io}}\n",
        endpoints.join(", ")
    )
}

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
    testbed.write_manifest("more.yaml", &more_manifests())?;
    let dns = format!("{NODE_IP}:53");
    let manifests = testbed.manifests.clone();
    testbed.start_agent_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--dns".as_ref(),
        dns.as_ref(),
    ])?;
    testbed.set_resolver(&client, NODE_IP, "default")?;
    println!(
        "   lb agent --dns {dns}; pod tmp-shell's resolv.conf: search default.svc.cluster.local svc.cluster.local cluster.local, nameserver {NODE_IP}, ndots:5"
    );
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

    println!("\n== in pod tmp-shell: curl -s httpenv:{PORT} | jq .HOSTNAME  (x{REQUESTS})");
    let mut seen = BTreeSet::new();
    for i in 1..=REQUESTS {
        let output = run(testbed.resolving_command(&client, "curl").args([
            "-sS",
            "--max-time",
            "3",
            &format!("http://httpenv:{PORT}/"),
        ]))?;
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("request {i}: not httpenv's JSON"))?;
        let hostname = reply["HOSTNAME"].as_str().unwrap_or_default().to_owned();
        println!("   {i:>2}: \"{hostname}\"");
        seen.insert(hostname);
    }
    for (what, args) in [
        (
            "headless: one A record per pod",
            ["+short", "+search", "httpenv-headless"],
        ),
        ("ExternalName: a CNAME", ["+short", "+search", "docs"]),
    ] {
        println!("\n== in pod tmp-shell: dig {}  ({what})", args.join(" "));
        let output = run(testbed.resolving_command(&client, "dig").args(args))?;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            println!("   {line}");
        }
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
