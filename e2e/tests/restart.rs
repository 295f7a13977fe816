//! The process that owns the dataplane is SIGKILLed and restarted twice
//! while UDP flows through the VIP: once adopting the running program, once
//! replacing it on the pinned link. Not one datagram may be lost.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use kube_dsr_e2e::{
    netns::PinDir,
    require_root,
    topology::{Lab, UDP_PORT, VIP},
};

const DATAGRAMS: u64 = 30_000;

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Starts the dataplane owner and waits for its `ready` line.
fn start_owner(lab: &Lab, pins: &Path, force_reload: bool) -> (Child, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dataplane-ctl"));
    cmd.args(["--netns", &lab.ingress.name, "--pin-dir"]).arg(pins).args([
        "--vip",
        &VIP.to_string(),
        "--port",
        &UDP_PORT.to_string(),
        "--proto",
        "udp",
    ]);
    for b in &lab.backends {
        cmd.arg("--backend").arg(format!("{}={}", b.addr, mac(b.mac)));
    }
    if force_reload {
        cmd.arg("--force-reload");
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn dataplane-ctl");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).expect("dataplane-ctl became ready");
    assert!(line.starts_with("ready"), "unexpected first line {line:?}");
    (child, line.trim().to_string())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn sigkill_and_restart_of_the_dataplane_owner_loses_no_packet() {
    require_root();
    let lab = Lab::new(2).unwrap();
    let pins = PinDir::new().unwrap();
    let (mut first, line) = start_owner(&lab, &pins.path, false);
    assert!(line.contains("start=Fresh"), "{line}");

    // ~20k datagrams/s for ~1.5 s, each carrying its sequence number.
    let sender = {
        let ns = lab.client.name.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: switches this thread's network namespace only.
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            let to = SocketAddr::from((VIP, UDP_PORT));
            let start = Instant::now();
            for seq in 0..DATAGRAMS {
                let mut payload = [0u8; 64];
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                sock.send_to(&payload, to).unwrap();
                if seq % 20 == 19 {
                    let due = Duration::from_micros(seq * 50);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        })
    };

    std::thread::sleep(Duration::from_millis(400));
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    // Nobody owns the dataplane now; the pinned link keeps it forwarding.
    std::thread::sleep(Duration::from_millis(200));
    let (mut second, line) = start_owner(&lab, &pins.path, false);
    assert!(line.contains("start=Adopted"), "a restart adopts the running dataplane: {line}");

    std::thread::sleep(Duration::from_millis(300));
    second.kill().unwrap();
    second.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (mut third, line) = start_owner(&lab, &pins.path, true);
    assert!(
        line.contains("start=Upgraded"),
        "a new build replaces the program on the link: {line}"
    );

    sender.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while (lab.udp_received() as u64) < DATAGRAMS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    third.kill().unwrap();
    third.wait().unwrap();
    let got = lab.udp_received() as u64;
    let rcvbuf = lab.udp_rcvbuf_errors().unwrap();
    assert_eq!(
        got,
        DATAGRAMS,
        "{} datagrams lost across two SIGKILLs ({rcvbuf} of them dropped by the receiving socket)",
        DATAGRAMS - got
    );
}
