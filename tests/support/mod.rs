//! Shared by the integration tests: the real local API server, one namespace pair per
//! test, the operator's real processes, and polling helpers.
//!
//! The control plane is the one `tests/cluster/cluster.sh up` started (or
//! `LLMPROXY_KUBECONFIG`); when none runs, one is started for this test binary and
//! stops with it (`--exit-with-parent`).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use llm_proxy::api::{
    AllowedNamespaces, NamespacesFrom, Project, ProjectRef, ProjectSpec, ProxyToken, ProxyTokenSpec, SecretKeyRef,
    TokenPhase, Upstream,
};
use llm_proxy::fake_upstream::FakeUpstream;

/// Label that ties a test's Projects and ProxyTokens to its own controller and proxy.
pub const TEST_LABEL: &str = "llmproxy.io/test";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

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
    let built = Command::new(&script).arg("build").output().expect("running tests/cluster/cluster.sh build");
    assert!(built.status.success(), "building the control plane failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let binary = String::from_utf8(built.stdout).unwrap().trim().to_string();
    let dir = std::env::temp_dir().join(format!("llmproxy-cluster-{}", std::process::id()));
    let mut child = Command::new(binary)
        .args(["up", "--exit-with-parent", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .expect("starting the control plane");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(!line.trim().is_empty(), "control plane did not start; see {}", dir.with_extension("log").display());
    Cluster { kubeconfig: line.trim().into(), _private: Some(child) }
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

/// Applies `crds/llmproxy.io.yaml` and waits until both CRDs are established.
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

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < timeout, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn short_id() -> String {
    let mut bytes = [0u8; 3];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API key every test project starts with: recognisable, so leak checks can find it.
pub const TEST_KEY: &str = "sk-test-LEAKCHECK0123456789abcdefAb12";

/// One test's world: its namespaces, fake upstream, controller and proxy processes.
pub struct Env {
    pub client: Client,
    /// Unique per test; also the value of [`TEST_LABEL`].
    pub id: String,
    /// The operator's namespace (key Secrets, Lease).
    pub ops: String,
    /// A namespace for workloads' ProxyTokens.
    pub apps: String,
    pub upstream: FakeUpstream,
    pub proxy_port: u16,
    pub proxy_admin_port: u16,
    children: Vec<(String, Child)>,
    log_dir: PathBuf,
}

impl Env {
    /// Creates the namespaces and the fake upstream; starts nothing else.
    pub async fn new(name: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let id = format!("{name}-{}", short_id());
        let ops = format!("{id}-ops");
        let apps = format!("{id}-apps");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for ns in [&ops, &apps] {
            let object: Namespace = serde_json::from_value(serde_json::json!({
                "metadata": { "name": ns, "labels": { TEST_LABEL: &id } }
            }))
            .unwrap();
            namespaces.create(&PostParams::default(), &object).await.unwrap();
        }
        let log_dir = repo().join("target/test-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        Self {
            client,
            upstream: FakeUpstream::start().await.unwrap(),
            proxy_port: free_port(),
            proxy_admin_port: free_port(),
            id,
            ops,
            apps,
            children: Vec::new(),
            log_dir,
        }
    }

    /// A new world with its controller and proxy already running.
    pub async fn running(name: &str) -> Self {
        let mut env = Self::new(name).await;
        env.start_controller();
        env.start_proxy().await;
        env
    }

    /// `http://127.0.0.1:<proxy port>`.
    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy_port)
    }

    fn spawn(&mut self, role: &str, args: &[&str]) {
        self.spawn_with(role, args, &kubeconfig());
    }

    fn spawn_with(&mut self, role: &str, args: &[&str], kubeconfig: &Path) {
        let log = self.log_path(role);
        // A restarted role appends to its log, so nothing it said before is lost.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_llm-proxy"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {role}: {e}"));
        self.children.push((role.to_string(), child));
    }

    /// A kubeconfig that acts as `user` (impersonated by the cluster admin), e.g.
    /// `system:serviceaccount:ns:name`.
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let admin = std::fs::read_to_string(kubeconfig()).unwrap();
        let text = admin.replacen("  user:\n", &format!("  user:\n    as: {user}\n"), 1);
        assert_ne!(text, admin, "unexpected kubeconfig layout");
        let path = self.log_dir.join(format!("{}-{}.kubeconfig", self.id, user.replace(':', "_")));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Where the process `role` writes its log.
    pub fn log_path(&self, role: &str) -> PathBuf {
        self.log_dir.join(format!("{}-{role}.log", self.id))
    }

    /// Starts the controller for this test's objects.
    pub fn start_controller(&mut self) {
        self.start_controller_as("controller", &[], &kubeconfig());
    }

    /// Starts a controller process named `role` with `extra` flags, as the identity of
    /// `kubeconfig`. Every controller of a test competes for the same Lease.
    pub fn start_controller_as(&mut self, role: &str, extra: &[&str], kubeconfig: &Path) {
        let selector = format!("{TEST_LABEL}={}", self.id);
        let admin = format!("127.0.0.1:{}", free_port());
        let (ops, proxy_url, lease) = (self.ops.clone(), self.proxy_url(), format!("llm-proxy-{}", self.id));
        let mut args = vec![
            "controller",
            "--namespace",
            &ops,
            "--label-selector",
            &selector,
            "--proxy-url",
            &proxy_url,
            "--lease-name",
            &lease,
            "--admin-addr",
            &admin,
            "--identity",
            role,
        ];
        args.extend_from_slice(extra);
        self.spawn_with(role, &args, kubeconfig);
    }

    /// Starts a proxy for this test's objects and waits until it is ready.
    pub async fn start_proxy(&mut self) {
        let (port, admin) = (self.proxy_port, self.proxy_admin_port);
        self.start_proxy_as("proxy", port, admin, &[]).await;
    }

    /// Starts another proxy process named `role` on `port` (admin on `admin`) with
    /// `extra` flags, and waits until it is ready.
    pub async fn start_proxy_as(&mut self, role: &str, port: u16, admin: u16, extra: &[&str]) {
        self.start_proxy_with(role, port, admin, extra, &kubeconfig()).await;
    }

    /// Like [`Env::start_proxy_as`], as the identity of `kubeconfig`.
    pub async fn start_proxy_with(&mut self, role: &str, port: u16, admin: u16, extra: &[&str], kubeconfig: &Path) {
        let selector = format!("{TEST_LABEL}={}", self.id);
        let listen = format!("127.0.0.1:{port}");
        let admin_addr = format!("127.0.0.1:{admin}");
        let ops = self.ops.clone();
        let mut args = vec![
            "proxy",
            "--namespace",
            &ops,
            "--label-selector",
            &selector,
            "--listen-addr",
            &listen,
            "--admin-addr",
            &admin_addr,
        ];
        args.extend_from_slice(extra);
        self.spawn_with(role, &args, kubeconfig);
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        eventually(Duration::from_secs(20), || async {
            let status = http_get_status(&ready).await?;
            (status == 200).then_some(())
        })
        .await;
    }

    /// Sends `signal` (e.g. "KILL", "TERM") to the process `role` and waits for it to exit.
    pub fn signal(&mut self, role: &str, signal: &str) {
        let index = self.children.iter().position(|(r, _)| r == role).unwrap_or_else(|| panic!("no process {role}"));
        let (_, mut child) = self.children.remove(index);
        Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        child.wait().unwrap();
    }

    /// A Project for this test: key Secret in the operator namespace, fake upstream,
    /// open to every namespace.
    pub fn project(&self, name: &str) -> Project {
        let mut project = Project::new(
            &self.scoped(name),
            ProjectSpec {
                display_name: Some(format!("Test {name}")),
                active: true,
                api_key_secret_ref: SecretKeyRef { name: format!("{name}-key"), key: "apiKey".into() },
                upstream: Upstream { url: self.upstream.url.clone() },
                allowed_namespaces: Some(AllowedNamespaces { from: NamespacesFrom::All, selector: None }),
                tokens_not_before: None,
            },
        );
        project.metadata.labels = Some([(TEST_LABEL.to_string(), self.id.clone())].into());
        project
    }

    /// Cluster-scoped names carry the test id so parallel tests never collide.
    pub fn scoped(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    /// Creates (or replaces the data of) the key Secret `name` in the operator namespace.
    pub async fn put_key(&self, name: &str, key: &str) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ops);
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": name, "namespace": self.ops },
            "stringData": { "apiKey": key }
        }))
        .unwrap();
        secrets.patch(name, &PatchParams::apply("llm-proxy-tests").force(), &Patch::Apply(&secret)).await.unwrap();
    }

    /// Every line the operator's processes have logged so far.
    pub fn logs(&self) -> String {
        self.children.iter().map(|(role, _)| std::fs::read_to_string(self.log_path(role)).unwrap_or_default()).collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Status of a plain GET, or `None` when nothing answers.
pub async fn http_get_status(url: &str) -> Option<u16> {
    let output = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url])
        .output()
        .await
        .ok()?;
    String::from_utf8(output.stdout).ok()?.parse().ok().filter(|s| *s != 0)
}

/// A response as curl saw it.
pub struct CurlResponse {
    pub status: u16,
    pub body: String,
}

impl CurlResponse {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// `error.code` of an OpenAI-style error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// Sends a request with curl (a real client over a real socket).
pub async fn curl(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> CurlResponse {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-s", "-X", method, "-w", "\n%{http_code}", "--max-time", "10", url]);
    for (name, value) in headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    if let Some(body) = body {
        command.args(["-H", "content-type: application/json", "--data-binary", body]);
    }
    let output = command.output().await.expect("running curl");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    CurlResponse { status: status.trim().parse().unwrap_or(0), body: body.to_string() }
}

/// The Python with the official `openai` SDK, from `just setup` (or `LLMPROXY_PYTHON`).
pub fn sdk_python() -> PathBuf {
    if let Ok(path) = std::env::var("LLMPROXY_PYTHON") {
        return path.into();
    }
    let cache = std::env::var("LLMPROXY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap()).join(".cache/llm-proxy"));
    let python = cache.join("venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `just setup` (or tests/setup.sh) to install the openai SDK",
        python.display()
    );
    python
}

/// How long tests wait for the system to converge.
pub const WAIT: Duration = Duration::from_secs(10);

/// A 720h token for `project`.
pub fn token_spec(project: &str) -> ProxyTokenSpec {
    ProxyTokenSpec {
        project_ref: ProjectRef { name: project.into() },
        duration: "720h".into(),
        max_requests: None,
        revoked: false,
        secret_name: None,
    }
}

/// A chat request on the proxy at `port`: the error code, or "" for 200.
pub async fn chat_on(port: u16, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let response = curl("POST", &url, &[("authorization", &auth)], Some(r#"{"model":"m","messages":[]}"#)).await;
    if response.status == 200 { String::new() } else { response.error_code() }
}

/// Object helpers.
impl Env {
    pub async fn create_project(&self, name: &str) -> Project {
        self.put_key(&format!("{name}-key"), TEST_KEY).await;
        let project = self.project(name);
        Api::<Project>::all(self.client.clone()).create(&PostParams::default(), &project).await.unwrap()
    }

    pub async fn create_token(&self, name: &str, spec: ProxyTokenSpec) -> ProxyToken {
        let mut token = ProxyToken::new(name, spec);
        token.metadata.labels = Some([(TEST_LABEL.to_string(), self.id.clone())].into());
        Api::<ProxyToken>::namespaced(self.client.clone(), &self.apps)
            .create(&PostParams::default(), &token)
            .await
            .unwrap()
    }

    pub async fn wait_token(&self, name: &str, phase: TokenPhase) -> ProxyToken {
        let tokens: Api<ProxyToken> = Api::namespaced(self.client.clone(), &self.apps);
        eventually(WAIT, || async {
            let token = tokens.get(name).await.ok()?;
            (token.status.as_ref()?.phase == Some(phase)).then_some(token)
        })
        .await
    }

    /// The token Secret's data as text.
    pub async fn token_secret(&self, name: &str) -> std::collections::BTreeMap<String, String> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.apps).get(name).await.unwrap();
        secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8(v.0).unwrap())).collect()
    }

    pub async fn minted(&self, project: &str, token: &str) -> String {
        self.create_token(token, token_spec(&self.scoped(project))).await;
        self.wait_token(token, TokenPhase::Active).await;
        self.token_secret(token).await["token"].clone()
    }

    pub async fn chat(&self, token: &str) -> CurlResponse {
        let auth = format!("Bearer {token}");
        curl(
            "POST",
            &format!("{}/v1/chat/completions", self.proxy_url()),
            &[("authorization", &auth)],
            Some(r#"{"model":"fake-model","messages":[]}"#),
        )
        .await
    }
}

/// The chart's pieces, rendered by the helm that `hack/setup.sh` builds.
impl Env {
    /// Renders `template` of the chart with `--set` values, as parsed YAML documents.
    pub fn render_chart(&self, release: &str, template: &str, set: &[String]) -> Vec<serde_json::Value> {
        let helm = std::env::var("LLMPROXY_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap()).join(".cache/llm-proxy"))
            .join("bin/helm");
        let mut command = Command::new(&helm);
        command.args(["template", release]).arg(repo().join("charts/llm-proxy"));
        command.args(["--namespace", &self.ops, "--kube-version", &kubernetes_version(), "--show-only", template]);
        for value in set {
            command.args(["--set", value]);
        }
        let output = command.output().unwrap_or_else(|e| panic!("running {} (run hack/setup.sh): {e}", helm.display()));
        assert!(output.status.success(), "helm template failed: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| <Option<serde_json::Value> as serde::Deserialize>::deserialize(doc).unwrap())
            .collect()
    }

    /// Installs the chart's Project-deletion policy, limited to this test's Projects, and
    /// waits until it denies deleting `project` (checked with dry-run deletes).
    pub async fn install_deletion_policy(&self, project: &str) {
        let selector = format!("projectDeletionPolicy.objectSelector.matchLabels.llmproxy\\.io/test={}", self.id);
        let docs = self.render_chart(&format!("t-{}", self.id), "templates/project-deletion-policy.yaml", &[selector]);
        assert_eq!(docs.len(), 2, "a policy and its binding");
        let vap: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy> =
            Api::all(self.client.clone());
        let binding: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding> =
            Api::all(self.client.clone());
        let apply = PatchParams::apply("llm-proxy-tests").force();
        for doc in docs {
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            match doc["kind"].as_str() {
                Some("ValidatingAdmissionPolicy") => vap.patch(&name, &apply, &Patch::Apply(&doc)).await.map(drop),
                Some("ValidatingAdmissionPolicyBinding") => {
                    binding.patch(&name, &apply, &Patch::Apply(&doc)).await.map(drop)
                }
                other => panic!("unexpected {other:?}"),
            }
            .unwrap();
        }
        let projects: Api<Project> = Api::all(self.client.clone());
        let dry_run = kube::api::DeleteParams { dry_run: true, ..Default::default() };
        let name = self.scoped(project);
        eventually(Duration::from_secs(20), || async { projects.delete(&name, &dry_run).await.is_err().then_some(()) })
            .await;
    }
}

/// Sends `count` chat requests with `token` at once, round-robin over `ports`, with a
/// real HTTP client; returns each response's status and `error.code`.
pub async fn burst(ports: &[u16], token: &str, count: usize) -> Vec<(u16, String)> {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let requests = (0..count).map(|i| {
        let client = client.clone();
        let request = hyper::Request::post(format!("http://127.0.0.1:{}/v1/chat/completions", ports[i % ports.len()]))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"model":"m","messages":[]}"#)))
            .unwrap();
        async move {
            match client.request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let code = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    (status, code)
                }
                Err(_) => (0, "connection_failed".to_string()),
            }
        }
    });
    futures::future::join_all(requests).await
}

/// A TCP relay in front of the API server that a test can cut and restore, to take the
/// control plane away from one process while the others keep it.
pub struct Relay {
    /// Local port of the relay.
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to `target` (host:port).
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (accept_open, accept_connections) = (open.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the API server is "down"
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections.lock().unwrap().push(task);
            }
        });
        Self { port, open, connections }
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Relays again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The API server's host:port from the kubeconfig.
pub fn api_server_address() -> String {
    let text = std::fs::read_to_string(kubeconfig()).unwrap();
    let server = text.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap();
    server.trim_start_matches("https://").to_string()
}

impl Env {
    /// A kubeconfig that reaches the API server through `relay`.
    pub fn kubeconfig_via(&self, relay: &Relay) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig()).unwrap();
        let text = text.replace(&api_server_address(), &format!("127.0.0.1:{}", relay.port));
        let path = self.log_dir.join(format!("{}-relay.kubeconfig", self.id));
        std::fs::write(&path, text).unwrap();
        path
    }
}
