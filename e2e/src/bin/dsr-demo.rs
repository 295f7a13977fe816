//! `make demo`: kube-dsr's dataplane with real traffic, in network
//! namespaces on this machine (removed again at the end).
//!
//! Until the one-host cluster exists this drives the node agent's dataplane
//! library directly: it programs a VIP with three backends on the ingress
//! node, sends real HTTP requests with curl from a client behind a router,
//! and shows that every backend serves, that replies bypass the ingress node,
//! and what draining a backend does.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Result, bail};
use kube_dsr_agent::dataplane::{BackendSpec, PortSpec, Protocol, ServiceSpec};
use kube_dsr_e2e::topology::{Lab, TCP_PORT, VIP, forwarded};

const NAME: &str = "demo/web/v4";
const REQUESTS: usize = 60;

fn main() -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    println!(
        "kube-dsr demo: building client, router, ingress node and 3 backends in network namespaces…"
    );
    let lab = Lab::new(3)?;
    let (pins, mut dp) = lab.open_dataplane()?;
    println!(
        "ingress node: XDP attached to eth0 in {} mode; pins under {}",
        dp.attached().as_str(),
        pins.path.display()
    );
    let mut spec = ServiceSpec {
        name: NAME.into(),
        vip: VIP.into(),
        ports: vec![PortSpec { port: TCP_PORT, protocol: Protocol::Tcp }],
        table_size: 65537,
        backends: lab.backends.iter().map(|b| BackendSpec::new(b.addr.into(), b.mac)).collect(),
        pin_all_flows: false,
    };
    dp.upsert_service(&spec)?;
    println!(
        "programmed VIP {VIP}:{TCP_PORT}/TCP -> {} backends (VIP on their lo, ARP suppressed)\n",
        spec.backends.len()
    );

    let rx0 = lab.ingress_rx_packets()?;
    let fwd0 = forwarded(&dp)?;
    let served = curl_many(&lab, REQUESTS)?;
    let (rx, fwd) = (lab.ingress_rx_packets()? - rx0, forwarded(&dp)? - fwd0);
    println!("{REQUESTS} requests with curl from the client (10.20.0.2) to http://{VIP}/:");
    for (name, n) in &served {
        println!("  {name:<10} {n:>3} {}", "#".repeat(*n));
    }
    println!(
        "\nDirect Server Return: the ingress node's eth0 received {rx} packets and XDP forwarded {fwd} \
         of them (client -> VIP only).\nThe backends' replies (SYN-ACK, response, FIN for each request) \
         went straight to the router: they never reached the ingress node.\n"
    );

    let drained = lab.backends[2].name.clone();
    spec.backends[2].draining = true;
    dp.upsert_service(&spec)?;
    let served = curl_many(&lab, REQUESTS / 2)?;
    println!("{drained} set to draining (existing connections would continue, no new ones):");
    for (name, n) in &served {
        println!("  {name:<10} {n:>3} {}", "#".repeat(*n));
    }
    if served.contains_key(&drained) {
        bail!("a draining backend received a new connection");
    }

    println!("\nper-backend counters on the ingress node (packets/bytes forwarded):");
    for b in &spec.backends {
        let t = dp.backend_traffic(NAME, b.addr)?;
        let name = lab.backends.iter().find(|x| x.addr == b.addr).map_or("?", |x| &x.name);
        println!("  {name:<10} {:>6} pkts {:>8} bytes", t.packets, t.bytes);
    }
    println!("verdict reasons on the ingress node:");
    for (reason, n) in dp.reason_counts()? {
        if n > 0 {
            println!("  {reason:<22} {n}");
        }
    }
    drop(dp);
    println!("\ncleaning up namespaces and pins. Run `make test` for the full test suite.");
    Ok(())
}

/// Runs `n` real curl requests from the client namespace; counts answers
/// per backend.
fn curl_many(lab: &Lab, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let out = lab.client.exec(&format!("curl -sS --max-time 3 http://{VIP}:{TCP_PORT}/"))?;
        let name = out.trim().trim_start_matches("served by ").to_string();
        *served.entry(name).or_insert(0) += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(served)
}
