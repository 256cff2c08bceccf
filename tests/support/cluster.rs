//! The local control plane: found or started, its kubectl, the CRDs, an admin client.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use super::{eventually, repo};

struct Cluster {
    kubeconfig: PathBuf,
    _private: Option<Child>,
}

static CLUSTER: OnceLock<Mutex<Cluster>> = OnceLock::new();

/// The kubeconfig of the local control plane, starting one if none runs.
pub fn kubeconfig() -> PathBuf {
    let cluster = CLUSTER.get_or_init(|| Mutex::new(find_or_start_cluster()));
    cluster.lock().unwrap().kubeconfig.clone()
}

fn find_or_start_cluster() -> Cluster {
    if let Ok(path) = std::env::var("LLMPROXY_KUBECONFIG") {
        return Cluster { kubeconfig: path.into(), _private: None };
    }
    let script = repo().join("tests/cluster/cluster.sh");
    let shared = repo().join(".cluster/kubeconfig");
    if shared.exists() && Command::new(&script).arg("status").status().is_ok_and(|s| s.success()) {
        return Cluster { kubeconfig: shared, _private: None };
    }
    start_private(&[])
}

/// Makes this test binary use a control plane of its own, whose API server runs with
/// `apiserver_args` besides its usual flags, instead of the shared one. Call it before
/// anything else of the support module, in a binary of one test.
pub fn use_private_cluster(apiserver_args: &[&str]) {
    let args: Vec<String> = apiserver_args.iter().map(|arg| format!("--apiserver-arg={arg}")).collect();
    let chosen = CLUSTER.set(Mutex::new(start_private(&args)));
    assert!(chosen.is_ok(), "the control plane was already chosen");
}

/// Makes this test binary use a control plane of its own with one real node (kubelet,
/// containerd, kube-proxy, CoreDNS: tests/cluster/node), removed when the test ends.
/// One node runs per machine: a node already running (`just cluster-up-node`, the node
/// demo) is not taken over, since the test installs the chart under fixed names.
pub fn use_node_cluster() {
    // A socket that answers is a live node; a stale file is what a killed one left,
    // which the new node removes before it starts.
    let live = std::os::unix::net::UnixStream::connect("/run/llmproxy-node/containerd.sock").is_ok();
    assert!(!live, "a node runs already on this machine: stop it first (just cluster-down)");
    let cluster = start_private(&["--node".to_string()]);
    assert!(CLUSTER.set(Mutex::new(cluster)).is_ok(), "the control plane was already chosen");
}

/// Starts a control plane that stops with this process.
fn start_private(flags: &[String]) -> Cluster {
    let script = repo().join("tests/cluster/cluster.sh");
    let node = flags.iter().any(|flag| flag == "--node");
    let built = Command::new(&script)
        .arg("build")
        .args(node.then_some("--node"))
        .output()
        .expect("running tests/cluster/cluster.sh build");
    assert!(built.status.success(), "building the control plane failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let binary = String::from_utf8(built.stdout).unwrap().trim().to_string();
    remove_stale_clusters();
    let dir = std::env::temp_dir().join(format!("llmproxy-cluster-{}", std::process::id()));
    let mut child = Command::new(binary)
        .args(["up", "--exit-with-parent", "--dir"])
        .arg(&dir)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .expect("starting the control plane");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(!line.trim().is_empty(), "control plane did not start; see {}", dir.with_extension("log").display());
    Cluster { kubeconfig: line.trim().into(), _private: Some(child) }
}

/// Removes what the private control planes of finished test processes left in the
/// temporary folder (etcd's data, certificates, logs: over 100 MB each), named for the
/// process that started them.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("llmproxy-cluster-").map(|rest| rest.trim_end_matches(".log")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// The Kubernetes release of the local control plane, e.g. `1.34.4` (named only in
/// tests/cluster/go.mod; `cluster.sh version` reads it from there).
pub fn kubernetes_version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(repo().join("tests/cluster/cluster.sh")).arg("version").output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .clone()
}

/// The kubectl built with the control plane (same Kubernetes release).
pub fn kubectl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let built =
            Command::new(repo().join("tests/cluster/cluster.sh")).arg("build").output().expect("cluster.sh build");
        PathBuf::from(String::from_utf8(built.stdout).unwrap().trim()).with_file_name("kubectl")
    })
    .clone()
}

/// Runs the local kubectl against the local control plane.
pub fn run_kubectl(args: &[&str]) -> std::process::Output {
    Command::new(kubectl()).env("KUBECONFIG", kubeconfig()).args(args).output().expect("running kubectl")
}

/// A client for the local control plane, as cluster admin.
pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).expect("reading the kubeconfig");
    let config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig is valid");
    Client::try_from(config).expect("building the client")
}

/// Applies `crds/llmproxy.io.yaml` and waits until every CRD in it is established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = std::fs::read_to_string(repo().join("crds/llmproxy.io.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &PatchParams::apply("llm-proxy-tests").force(), &Patch::Apply(&crd)).await.unwrap();
        eventually(Duration::from_secs(20), || async {
            let crd = crds.get(&name).await.ok()?;
            let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }
}

/// The API server's host:port from the kubeconfig.
pub fn api_server_address() -> String {
    let text = std::fs::read_to_string(kubeconfig()).unwrap();
    let server = text.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap();
    server.trim_start_matches("https://").to_string()
}
