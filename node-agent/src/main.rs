//! `dsr-agent`: the node agent. Its Kubernetes side (watchers, backend
//! preparation, VIP announcement) is built by the node-agent issue; today
//! the binary only says so. The dataplane it will drive lives in
//! `kube_dsr_agent::dataplane` and is tested on its own.

fn main() {
    eprintln!("dsr-agent is not implemented yet; see the node-agent issue");
    std::process::exit(2);
}
