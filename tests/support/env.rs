//! One test's world: its namespaces, fake upstream, controller and proxy processes, and
//! the objects it creates.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use llm_proxy::api::{
    AllowedNamespaces, NamespacesFrom, Project, ProjectSpec, ProxyToken, ProxyTokenSpec, SecretKeyRef, TokenPhase,
    Upstream,
};
use llm_proxy::fake_upstream::FakeUpstream;

use super::{
    CurlResponse, Relay, TEST_KEY, TEST_LABEL, WAIT, api_server_address, client, curl, eventually, free_port,
    http_get_status, install_crds, kubeconfig, repo, short_id, token_spec,
};

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
    /// `--label-selector` of the controller and proxies: this test's objects only, or
    /// (`None`) every object, as an installation handles them.
    selector: Option<String>,
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
            selector: Some(format!("{TEST_LABEL}={id}")),
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

    /// Makes the controller and proxies started from now on handle every Project and
    /// ProxyToken of the cluster, as an installation does, not only this test's: for a
    /// test with a control plane of its own, whose objects are made the way users make
    /// them (unlabelled).
    pub fn handle_every_object(&mut self) {
        self.selector = None;
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
        self.spawn_with_env(role, args, &[("RUST_LOG", "info")], kubeconfig);
    }

    /// Starts `llm-proxy ARGS` as the process `role`, with exactly the environment
    /// variables `vars` (and KUBECONFIG), its output in the test's log.
    pub fn spawn_with_env(&mut self, role: &str, args: &[&str], vars: &[(&str, &str)], kubeconfig: &Path) {
        let log = self.log_path(role);
        // A restarted role appends to its log, so nothing it said before is lost.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_llm-proxy"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .envs(vars.iter().copied())
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

    /// Starts the controller for this test's objects; returns its admin port.
    pub fn start_controller(&mut self) -> u16 {
        self.start_controller_as("controller", &[], &kubeconfig())
    }

    /// Starts a controller process named `role` with `extra` flags, as the identity of
    /// `kubeconfig`. Every controller of a test competes for the same Lease.
    /// Returns its admin port (`/metrics`).
    pub fn start_controller_as(&mut self, role: &str, extra: &[&str], kubeconfig: &Path) -> u16 {
        let selector = self.selector.clone();
        let admin_port = free_port();
        let admin = format!("127.0.0.1:{admin_port}");
        let (ops, proxy_url, lease) = (self.ops.clone(), self.proxy_url(), format!("llm-proxy-{}", self.id));
        let mut args = vec![
            "controller",
            "--namespace",
            &ops,
            "--proxy-url",
            &proxy_url,
            "--lease-name",
            &lease,
            "--admin-addr",
            &admin,
            "--identity",
            role,
        ];
        if let Some(selector) = &selector {
            args.extend(["--label-selector", selector]);
        }
        args.extend_from_slice(extra);
        self.spawn_with(role, &args, kubeconfig);
        admin_port
    }

    /// Starts a proxy for this test's objects and waits until it is ready.
    pub async fn start_proxy(&mut self) {
        let (port, admin) = (self.proxy_port, self.proxy_admin_port);
        self.start_proxy_as("proxy", port, admin, &[]).await;
    }

    /// Starts a second proxy (`proxy-2`) for this test's objects; returns both proxies'
    /// API ports.
    pub async fn start_second_proxy(&mut self) -> [u16; 2] {
        let (port, admin) = (free_port(), free_port());
        self.start_proxy_as("proxy-2", port, admin, &[]).await;
        [self.proxy_port, port]
    }

    /// Starts `N` proxy processes, `proxy-a`, `proxy-b`, …, the first on the test's
    /// proxy ports, and waits until each is ready: their API and admin ports.
    pub async fn start_proxies<const N: usize>(&mut self) -> ([u16; N], [u16; N]) {
        let ports: [u16; N] = std::array::from_fn(|i| if i == 0 { self.proxy_port } else { free_port() });
        let admin: [u16; N] = std::array::from_fn(|i| if i == 0 { self.proxy_admin_port } else { free_port() });
        for i in 0..N {
            let role = format!("proxy-{}", char::from(b'a' + i as u8));
            self.start_proxy_as(&role, ports[i], admin[i], &[]).await;
        }
        (ports, admin)
    }

    /// Starts another proxy process named `role` on `port` (admin on `admin`) with
    /// `extra` flags, and waits until it is ready.
    pub async fn start_proxy_as(&mut self, role: &str, port: u16, admin: u16, extra: &[&str]) {
        self.start_proxy_with(role, port, admin, extra, &kubeconfig()).await;
    }

    /// Like [`Env::start_proxy_as`], as the identity of `kubeconfig`.
    pub async fn start_proxy_with(&mut self, role: &str, port: u16, admin: u16, extra: &[&str], kubeconfig: &Path) {
        let selector = self.selector.clone();
        let listen = format!("127.0.0.1:{port}");
        let admin_addr = format!("127.0.0.1:{admin}");
        let ops = self.ops.clone();
        let mut args = vec!["proxy", "--namespace", &ops, "--listen-addr", &listen, "--admin-addr", &admin_addr];
        if let Some(selector) = &selector {
            args.extend(["--label-selector", selector]);
        }
        args.extend_from_slice(extra);
        self.spawn_with(role, &args, kubeconfig);
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        eventually(Duration::from_secs(20), || async {
            let status = http_get_status(&ready).await?;
            (status == 200).then_some(())
        })
        .await;
    }

    /// Waits until the process `role` exits on its own (at most `timeout`); its status.
    /// Async: the test's runtime keeps running (a relay the process talks through, say).
    pub async fn wait_for_exit(&mut self, role: &str, timeout: Duration) -> std::process::ExitStatus {
        let index = self.children.iter().position(|(r, _)| r == role).unwrap_or_else(|| panic!("no process {role}"));
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.children[index].1.try_wait().unwrap() {
                self.children.remove(index);
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "{role} still runs after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the proxy talking to the API server through a relay the test can cut (an
    /// API-server outage for this proxy alone); returns the relay.
    pub async fn start_proxy_behind_relay(&mut self, extra: &[&str]) -> Relay {
        let relay = Relay::start(api_server_address()).await;
        let (port, admin) = (self.proxy_port, self.proxy_admin_port);
        let via_relay = self.kubeconfig_via(&relay);
        self.start_proxy_with("proxy", port, admin, extra, &via_relay).await;
        relay
    }

    /// Sends `signal` (e.g. "KILL", "TERM") to the process `role` and waits for it to exit.
    /// Sends `signal` to process `role` and leaves it running ([`Env::signal`] waits).
    pub fn send_signal(&self, role: &str, signal: &str) {
        let (_, child) = self.children.iter().find(|(r, _)| r == role).unwrap_or_else(|| panic!("no process {role}"));
        Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
    }

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
                limits: None,
                price_list: None,
            },
        );
        project.metadata.labels = Some([(TEST_LABEL.to_string(), self.id.clone())].into());
        project
    }

    /// Cluster-scoped names carry the test id so parallel tests never collide.
    pub fn scoped(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    /// Creates (or replaces the data of) the key Secret `name` in the operator namespace,
    /// labelled as an API key and bound to this test's Project `project`.
    pub async fn put_key(&self, name: &str, key: &str, project: &str) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ops);
        let (label, value) = llm_proxy::api::API_KEY_LABEL;
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": name, "namespace": self.ops,
                "labels": { label: value },
                "annotations": { llm_proxy::api::KEY_PROJECTS_ANNOTATION: self.scoped(project) },
            },
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
        // A long-lived local cluster would otherwise collect every test's objects.
        // LLMPROXY_KEEP_OBJECTS=1 keeps them to look at after a failure.
        if std::env::var_os("LLMPROXY_KEEP_OBJECTS").is_none() {
            let (id, namespaces) = (self.id.clone(), [self.ops.clone(), self.apps.clone()]);
            // On a thread with a runtime and a client of its own: the test's runtime is
            // the one dropping this, so nothing spawned on it would run.
            let cleaned = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(remove_objects(&id, &namespaces));
            });
            let _ = cleaned.join();
        }
    }
}

/// Deletes the Projects labelled with test `id` (their finalizer removed first: no
/// controller is left to do it) and the test's namespaces, without waiting.
async fn remove_objects(id: &str, namespaces: &[String]) {
    let client = super::client().await;
    let projects: Api<Project> = Api::all(client.clone());
    let labelled = kube::api::ListParams::default().labels(&format!("{TEST_LABEL}={id}"));
    let no_finalizers = Patch::Merge(serde_json::json!({ "metadata": { "finalizers": null } }));
    for project in projects.list(&labelled).await.map(|l| l.items).unwrap_or_default() {
        let name = kube::ResourceExt::name_any(&project);
        let _ = projects.patch(&name, &PatchParams::default(), &no_finalizers).await;
        let _ = projects.delete(&name, &Default::default()).await;
    }
    let all: Api<Namespace> = Api::all(client);
    for namespace in namespaces {
        let _ = all.delete(namespace, &Default::default()).await;
    }
}

/// Object helpers.
impl Env {
    pub async fn create_project(&self, name: &str) -> Project {
        self.put_key(&format!("{name}-key"), TEST_KEY, name).await;
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

    /// Runs `script` with the official openai SDK, configured as a workload is: only
    /// OPENAI_API_KEY (`token`) and OPENAI_BASE_URL (this proxy). Returns its stdout
    /// and stderr. Awaited, not blocking: the fake upstream runs on the test's runtime.
    pub async fn sdk(&self, script: &str, token: &str) -> (String, String) {
        let out = tokio::process::Command::new(super::sdk_python())
            .args(["-c", script])
            .env("OPENAI_API_KEY", token)
            .env("OPENAI_BASE_URL", format!("{}/v1", self.proxy_url()))
            .output()
            .await
            .expect("running the openai SDK");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
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
