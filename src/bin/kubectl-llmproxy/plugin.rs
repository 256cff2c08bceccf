//! `kubectl llmproxy`: the admin UI's workflows as a kubectl plugin.
//!
//! In: a command line and the kubeconfig kubectl would use. Out: API calls (list, get,
//! merge patches, create) and text on stdout. The token is printed exactly once, by
//! `create-token`; nothing else ever shows it.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use llm_proxy::api::{Project, ProjectRef, ProxyToken, ProxyTokenSpec, TokenPhase, token_secret_keys as keys};
use llm_proxy::index::Kind;

/// Manage llm-proxy Projects and ProxyTokens.
#[derive(Parser, Debug)]
#[command(name = "kubectl-llmproxy", bin_name = "kubectl llmproxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The operator's namespace, where proxy replicas report what they enforce.
    #[arg(long, global = true, env = "LLMPROXY_NAMESPACE", default_value = "llm-proxy")]
    operator_namespace: String,
}

/// `--wait`: after the change, wait until every live proxy replica enforces it.
#[derive(clap::Args, Debug, Clone, Copy)]
struct Wait {
    /// Wait until every live proxy replica enforces the change, and say how long it took.
    #[arg(long)]
    wait: bool,
    /// Seconds `--wait` waits at most.
    #[arg(long, default_value_t = 30)]
    wait_timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List projects, optionally by status and name.
    List {
        /// Only projects in this status (Active or Inactive).
        #[arg(long)]
        status: Option<String>,
        /// Only projects whose name or display name contains this text.
        #[arg(long)]
        search: Option<String>,
    },
    /// Show one project: key hint, token counts, recent tokens and its recent Events.
    Show { project: String },
    /// Activate a project: its tokens work again.
    Activate {
        project: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Deactivate a project: its tokens are refused (not revoked).
    Deactivate {
        project: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Revoke every token of a project issued until now. Cannot be undone.
    RevokeAll {
        project: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// List the proxy replicas and the resource versions their routing tables enforce.
    Replicas,
    /// Create a ProxyToken, wait for it, and print the token once with usage snippets.
    CreateToken {
        project: String,
        /// Name of the ProxyToken (and of its Secret).
        name: String,
        /// Namespace of the ProxyToken.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Lifetime, as a Go duration.
        #[arg(long, default_value = "720h")]
        duration: String,
        /// Lifetime cap on requests.
        #[arg(long)]
        max_requests: Option<i64>,
        /// Seconds to wait for the controller to mint it.
        #[arg(long, default_value_t = 30)]
        wait_seconds: u64,
        /// Label for the ProxyToken, as key=value (repeatable).
        #[arg(long = "label", short = 'l', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Serve the dashboard on 127.0.0.1: every page and action of this plugin in a
    /// browser, acting as your kubeconfig's user. Ctrl-C stops it.
    Dashboard {
        /// Port on 127.0.0.1 (0: any free port). The address to open is printed.
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Revoke one token. Cannot be undone.
    RevokeToken {
        name: String,
        /// Namespace of the ProxyToken.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// What can go wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig.
    #[error("connecting to Kubernetes (set KUBECONFIG or use kubectl's current context)")]
    Connect(#[source] kube::Error),
    /// An API call failed.
    #[error("{what}")]
    Api { what: String, source: kube::Error },
    /// The controller did not mint the token in time.
    #[error("ProxyToken {0} was not minted in time: {1}")]
    NotMinted(String, String),
    /// Some live proxy replicas did not enforce the change in time.
    #[error(
        "the change was made, but {behind} of {live} live proxy replicas did not enforce it within {seconds} s ({names}): check those proxies' logs and their connection to the API server (kubectl llmproxy replicas)"
    )]
    NotEnforced { behind: usize, live: usize, seconds: u64, names: String },
    /// The dashboard could not listen or serve.
    #[error("serving the dashboard on 127.0.0.1 (another --port?)")]
    Serve(#[source] std::io::Error),
}

/// Field manager of every write the plugin makes, so `managedFields` says who changed what.
const FIELD_MANAGER: &str = "kubectl-llmproxy";

fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not key=value"))?;
    Ok((key.to_string(), value.to_string()))
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// Runs one command and returns what to print.
pub async fn run(cli: Cli) -> Result<String, Error> {
    let client = Client::try_default().await.map_err(Error::Connect)?;
    let projects: Api<Project> = Api::all(client.clone());
    let enforced = Enforcement { client: client.clone(), namespace: cli.operator_namespace.clone() };
    match cli.command {
        Command::List { status, search } => list(&projects, status, search).await,
        Command::Show { project } => show(&client, &project).await,
        Command::Activate { project, wait } => set_active(&projects, &project, true, &enforced, wait).await,
        Command::Deactivate { project, wait } => set_active(&projects, &project, false, &enforced, wait).await,
        Command::RevokeAll { project, wait } => {
            let now = jiff::Timestamp::now();
            let patch = json!({ "spec": { "tokensNotBefore": llm_proxy::api::micros(now) } });
            let changed = projects
                .patch(&project, &patch_params(), &Patch::Merge(&patch))
                .await
                .map_err(api_err(format!("revoking the tokens of project {project}")))?;
            let said = format!("project {project}: every token issued before {now} is revoked");
            enforced.after(wait, Kind::Project, &changed.metadata, said).await
        }
        Command::Replicas => replicas(&enforced).await,
        Command::Dashboard { port } => {
            crate::dashboard::serve(client, port, cli.operator_namespace).await.map_err(Error::Serve)?;
            Ok(String::new())
        }
        Command::CreateToken { project, name, namespace, duration, max_requests, wait_seconds, labels, wait } => {
            let spec = ProxyTokenSpec {
                project_ref: ProjectRef { name: project },
                duration,
                max_requests,
                revoked: false,
                secret_name: None,
                limits: None,
            };
            let mut token = ProxyToken::new(&name, spec);
            token.metadata.labels = (!labels.is_empty()).then(|| labels.into_iter().collect());
            create_token(&client, &namespace, token, Duration::from_secs(wait_seconds), &enforced, wait).await
        }
        Command::RevokeToken { name, namespace, wait } => {
            let changed = Api::<ProxyToken>::namespaced(client, &namespace)
                .patch(&name, &patch_params(), &Patch::Merge(json!({ "spec": { "revoked": true } })))
                .await
                .map_err(api_err(format!("revoking ProxyToken {namespace}/{name}")))?;
            enforced.after(wait, Kind::Token, &changed.metadata, format!("proxytoken {namespace}/{name} revoked")).await
        }
    }
}

async fn list(projects: &Api<Project>, status: Option<String>, search: Option<String>) -> Result<String, Error> {
    let mut params = ListParams::default();
    if let Some(status) = &status {
        params = params.fields(&format!("status.phase={status}"));
    }
    let mut items = projects.list(&params).await.map_err(api_err("listing projects"))?.items;
    if let Some(text) = search.map(|s| s.to_lowercase()) {
        items.retain(|p| {
            p.name_any().to_lowercase().contains(&text)
                || p.spec.display_name.as_deref().unwrap_or_default().to_lowercase().contains(&text)
        });
    }
    items.sort_by_key(ResourceExt::name_any);
    let mut out = format!(
        "{:<32} {:<28} {:<9} {:<6} {:<22} {:>6}  {}\n",
        "NAME", "DISPLAY NAME", "STATUS", "READY", "REASON", "TOKENS", "CREATED"
    );
    for p in items {
        let status = p.status.as_ref();
        let (ready, reason) = ready_condition(&p);
        let _ = writeln!(
            out,
            "{:<32} {:<28} {:<9} {:<6} {:<22} {:>6}  {}",
            p.name_any(),
            p.spec.display_name.clone().unwrap_or_default(),
            status.and_then(|s| s.phase).map_or("-", |ph| ph.as_str()),
            ready,
            reason,
            status.and_then(|s| s.tokens).map_or(0, |t| t.total),
            p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        );
    }
    Ok(out)
}

/// The `Ready` condition's status and reason, `-` while the controller has not written it.
fn ready_condition(project: &Project) -> (&str, &str) {
    project
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == llm_proxy::api::project_conditions::READY))
        .map_or(("-", "-"), |c| (c.status.as_str(), c.reason.as_str()))
}

async fn show(client: &Client, name: &str) -> Result<String, Error> {
    let project =
        Api::<Project>::all(client.clone()).get(name).await.map_err(api_err(format!("reading project {name}")))?;
    let status = project.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "Name:          {name}");
    let _ = writeln!(out, "Display name:  {}", project.spec.display_name.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "Status:        {}", status.phase.map_or("-", |p| p.as_str()));
    let serving = status.conditions.iter().find(|c| c.type_ == llm_proxy::api::project_conditions::READY);
    let serving = serving.map_or("unknown (the controller has not reported yet)".to_string(), |c| {
        let verdict = if c.status == "True" { "yes" } else { "no" };
        format!("{verdict} ({}: {})", c.reason, c.message)
    });
    let _ = writeln!(out, "Serving:       {serving}");
    let created = project.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    let _ = writeln!(out, "Created:       {created}");
    let _ = writeln!(out, "API key:       {}", status.api_key_hint.as_deref().unwrap_or("(none)"));
    let _ = writeln!(out, "Upstream:      {}", project.spec.upstream.url);
    let counts = status.tokens.unwrap_or_default();
    let _ = writeln!(out, "Tokens:        {} total, {} active", counts.total, counts.active);
    let _ = writeln!(out, "Recent tokens:");
    for t in &status.recent_tokens {
        let issued = t.issued_at.as_ref().map(|i| i.0.to_string()).unwrap_or_default();
        let _ = writeln!(out, "  {}/{}  {}  issued {issued}", t.namespace, t.name, t.phase.as_deref().unwrap_or("-"));
    }
    let events = Api::<Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!("regarding.name={name}")))
        .await
        .map_err(api_err(format!("listing the Events of project {name}")))?;
    let mut events: Vec<Event> = events
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Project"))
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    let _ = writeln!(out, "Recent events:");
    for e in events.iter().rev().take(10).rev() {
        let at = e.event_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        let _ = writeln!(out, "  {at}  {}  {}", e.reason.as_deref().unwrap_or("-"), e.note.as_deref().unwrap_or(""));
    }
    Ok(out)
}

async fn set_active(
    projects: &Api<Project>,
    name: &str,
    active: bool,
    enforced: &Enforcement,
    wait: Wait,
) -> Result<String, Error> {
    let changed = projects
        .patch(name, &patch_params(), &Patch::Merge(json!({ "spec": { "active": active } })))
        .await
        .map_err(api_err(format!("updating project {name}")))?;
    let said = format!("project {name} {}", if active { "activated" } else { "deactivated" });
    enforced.after(wait, Kind::Project, &changed.metadata, said).await
}

/// Where replicas report, and how to wait for them.
struct Enforcement {
    client: Client,
    namespace: String,
}

impl Enforcement {
    /// `said`, and with `--wait` how long until every live replica enforced the write
    /// whose result carried `meta`.
    async fn after(&self, wait: Wait, kind: Kind, meta: &ObjectMeta, said: String) -> Result<String, Error> {
        if !wait.wait {
            return Ok(format!("{said}\n"));
        }
        let version = llm_proxy::index::resource_version(meta);
        let started = std::time::Instant::now();
        let timeout = Duration::from_secs(wait.wait_timeout);
        loop {
            let reports = llm_proxy::enforcement::list(&self.client, &self.namespace)
                .await
                .map_err(api_err(format!("reading the proxy replicas' reports in namespace {}", self.namespace)))?;
            let live: Vec<_> = reports.into_iter().filter(|r| r.live).collect();
            let behind: Vec<_> =
                live.iter().filter(|r| !r.enforces(kind, version)).map(|r| r.identity.clone()).collect();
            let elapsed = started.elapsed();
            if live.is_empty() {
                return Ok(format!(
                    "{said}\nno live proxy replica reports in namespace {} (is the proxy running? see --operator-namespace): nothing to wait for\n",
                    self.namespace
                ));
            }
            if behind.is_empty() {
                let ms = elapsed.as_secs_f64() * 1000.0;
                return Ok(format!(
                    "{said}\nenforced by {n}/{n} live proxy replicas after {ms:.0} ms\n",
                    n = live.len()
                ));
            }
            if elapsed > timeout {
                return Err(Error::NotEnforced {
                    behind: behind.len(),
                    live: live.len(),
                    seconds: wait.wait_timeout,
                    names: behind.join(", "),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn replicas(enforced: &Enforcement) -> Result<String, Error> {
    let mut reports = llm_proxy::enforcement::list(&enforced.client, &enforced.namespace)
        .await
        .map_err(api_err(format!("reading the proxy replicas' reports in namespace {}", enforced.namespace)))?;
    reports.sort_by(|a, b| a.identity.cmp(&b.identity));
    let mut out = format!(
        "{:<40} {:<5} {:<6} {:>12} {:>12} {:>12}\n",
        "REPLICA", "LIVE", "SYNCED", "PROJECTS", "PROXYTOKENS", "SECRETS"
    );
    for r in reports {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let _ = writeln!(
            out,
            "{:<40} {:<5} {:<6} {:>12} {:>12} {:>12}",
            r.identity,
            yes_no(r.live),
            yes_no(r.applied.synced),
            r.applied.projects,
            r.applied.tokens,
            r.applied.secrets
        );
    }
    Ok(out)
}

async fn create_token(
    client: &Client,
    namespace: &str,
    token: ProxyToken,
    wait: Duration,
    enforced: &Enforcement,
    enforce_wait: Wait,
) -> Result<String, Error> {
    let created = create(client, namespace, &token).await?;
    // The token prints only once every live replica accepts it, with --wait.
    let minted = mint(client, namespace, &created.name_any(), wait).await?;
    let propagation = enforced.after(enforce_wait, Kind::Token, &minted.metadata, String::new()).await?;
    let propagation = propagation.trim_start_matches('\n');
    let (namespace, name, secret) = (&minted.namespace, &minted.name, &minted.secret_name);
    let mut out = format!(
        "Token {namespace}/{name} (shown once; it is also in Secret {namespace}/{secret}):\n\n  {}\n",
        minted.value.as_str()
    );
    for (title, snippet) in snippets(&minted) {
        let _ = write!(out, "\n{title}:\n  {}\n", snippet.replace('\n', "\n  "));
    }
    out.push_str(propagation);
    Ok(out)
}

/// Creates the ProxyToken `token` in `namespace` under the plugin's field manager.
async fn create(client: &Client, namespace: &str, token: &ProxyToken) -> Result<ProxyToken, Error> {
    let name = token.name_any();
    Api::<ProxyToken>::namespaced(client.clone(), namespace)
        .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }, token)
        .await
        .map_err(api_err(format!("creating ProxyToken {namespace}/{name}")))
}

/// A token the controller minted, read once from its Secret.
pub(crate) struct Minted {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) secret_name: String,
    /// The token itself: shown once, then dropped (and wiped).
    pub(crate) value: zeroize::Zeroizing<String>,
    /// `OPENAI_BASE_URL` of the Secret: the proxy's `/v1`.
    pub(crate) base_url: String,
    /// The ProxyToken's metadata when it was seen minted.
    pub(crate) metadata: ObjectMeta,
}

/// Waits up to `wait` for the controller to mint ProxyToken `namespace`/`name`, then reads
/// the token from its Secret. A token the controller refuses (inactive project, namespace
/// not allowed) fails with the controller's own words.
pub(crate) async fn mint(client: &Client, namespace: &str, name: &str, wait: Duration) -> Result<Minted, Error> {
    let tokens: Api<ProxyToken> = Api::namespaced(client.clone(), namespace);
    let started = std::time::Instant::now();
    let token = loop {
        let token = tokens.get(name).await.map_err(api_err(format!("reading ProxyToken {namespace}/{name}")))?;
        let status = token.status.clone().unwrap_or_default();
        match status.phase {
            Some(TokenPhase::Active) => break token,
            Some(TokenPhase::Rejected | TokenPhase::ProjectInactive | TokenPhase::Revoked) => {
                let why = status.conditions.iter().find(|c| c.type_ == "Issued").map(|c| c.message.clone());
                return Err(Error::NotMinted(format!("{namespace}/{name}"), why.unwrap_or_default()));
            }
            _ if started.elapsed() > wait => {
                return Err(Error::NotMinted(format!("{namespace}/{name}"), "is the controller running?".into()));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let secret_name = token.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| name.to_string());
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&secret_name)
        .await
        .map_err(api_err(format!("reading Secret {namespace}/{secret_name}")))?;
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).to_string())
            .unwrap_or_default()
    };
    Ok(Minted {
        namespace: namespace.to_string(),
        name: name.to_string(),
        value: zeroize::Zeroizing::new(field(keys::TOKEN)),
        base_url: field(keys::OPENAI_BASE_URL),
        secret_name,
        metadata: token.metadata,
    })
}

/// How to use a minted token: curl, the Python and Node SDKs, and a pod's `envFrom`.
/// The plugin prints these; the dashboard shows the same.
pub(crate) fn snippets(minted: &Minted) -> [(&'static str, String); 4] {
    let (value, base_url, secret) = (minted.value.as_str(), &minted.base_url, &minted.secret_name);
    [
        (
            "curl",
            format!(
                "curl {base_url}/chat/completions -H 'Authorization: Bearer {value}' \\\n  \
                 -H 'Content-Type: application/json' -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
            ),
        ),
        ("Python", format!("from openai import OpenAI\nclient = OpenAI(api_key=\"{value}\", base_url=\"{base_url}\")")),
        (
            "Node",
            format!(
                "import OpenAI from \"openai\";\nconst client = new OpenAI({{ apiKey: \"{value}\", baseURL: \"{base_url}\" }});"
            ),
        ),
        ("In a pod", format!("envFrom: [{{secretRef: {{name: {secret}}}}}]")),
    ]
}
