//! `kubectl llmproxy dashboard`: the admin UI, served on 127.0.0.1 to its user's browser.
//!
//! In: HTTP requests from that browser (admitted by [`guard`]). Out: API calls made with
//! the user's own kubeconfig — so Kubernetes RBAC decides what each person sees and does,
//! and the pages can never disagree with kubectl or GitOps — and server-rendered pages
//! ([`view`]). The cluster gains no endpoint. The dashboard keeps no state but the
//! launch's secrets: every page reads the objects afresh.
//!
//! Routes: `/` projects; `/projects/new`; `/projects/{name}` with `/edit`, `/key`,
//! `/active`, `/revoke-all`, `/tokens`, `/tokens/new`; `/tokens/{namespace}/{name}` with
//! `/revoke`. A GET never changes anything; a POST changes one thing and redirects, except
//! the token form, whose answer is the only page that shows a token.

mod guard;
mod view;

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use maud::Markup;
use serde_json::{Value, json};
use zeroize::Zeroize;

use guard::{Guard, Verdict};
use llm_proxy::api::{Project, ProjectRef, ProxyToken, ProxyTokenSpec};
use view::{FormError, Frame, ListQuery, ProjectForm, TokenForm};

/// Where the stylesheet is served (the only file; pages have no scripts).
pub(crate) const STYLESHEET: &str = "/static/style.css";

/// Field manager of every write the dashboard makes, so `managedFields` tells its edits
/// from the plugin's, kubectl's and GitOps tools'.
const FIELD_MANAGER: &str = "kubectl-llmproxy-dashboard";

/// How long "Generate token" waits for the controller to mint.
const MINT_WAIT: Duration = Duration::from_secs(30);

/// Largest form accepted (the largest real one is a few hundred bytes).
const MAX_FORM: usize = 64 * 1024;

/// Serves the dashboard on 127.0.0.1:`port` (0: any free port) until Ctrl-C. Prints the
/// sign-in address as the first line on stdout.
pub(crate) async fn serve(client: Client, port: u16, operator_namespace: String) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let port = listener.local_addr()?.port();
    let acting_as = identity(&client).await;
    let app = Arc::new(App { client, guard: Guard::new(port), operator_namespace, acting_as });
    println!("{}", app.guard.login_url());
    eprintln!(
        "llm-proxy dashboard on http://127.0.0.1:{port}, acting as {}: open the address above (it signs in once). Ctrl-C stops it.",
        app.acting_as
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        eprintln!("accepting a connection: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let app = app.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| app.clone().handle(request));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Who the dashboard acts as: the user the API server sees (a SelfSubjectReview), and
/// the kubeconfig context.
async fn identity(client: &Client) -> String {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let context = kube::config::Kubeconfig::read().ok().and_then(|k| k.current_context).unwrap_or_else(|| "-".into());
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await;
    match review.ok().and_then(|r| r.status?.user_info?.username) {
        Some(user) => format!("{user} (context {context})"),
        None => format!("context {context}"),
    }
}

struct App {
    client: Client,
    guard: Guard,
    /// Where key Secrets live.
    operator_namespace: String,
    /// Who the dashboard acts as, shown on every page.
    acting_as: String,
}

/// A page to send: its status and HTML, or a redirect.
enum Answer {
    Page(StatusCode, Markup),
    Redirect(String),
}

/// A POSTed form. Values are wiped when it goes: one of them may be an API key.
#[derive(Default)]
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Self {
        Self(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The trimmed value of `key`, empty when absent.
    fn text(&self, key: &str) -> String {
        self.get(key).unwrap_or_default().trim().to_string()
    }
}

impl Drop for Form {
    fn drop(&mut self) {
        for (_, value) in &mut self.0 {
            value.zeroize();
        }
    }
}

impl App {
    fn frame(&self) -> Frame<'_> {
        Frame { acting_as: &self.acting_as, csrf: self.guard.csrf() }
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let mut response = match self.guard.check(&parts.method, &path, parts.uri.query(), &parts.headers) {
            Verdict::Refused(status, text) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                self.send(Answer::Page(status, view::message(&self.frame(), "Refused", text, None)))
            }
            Verdict::SignIn(cookie) => {
                let mut response = self.send(Answer::Redirect("/".into()));
                response.headers_mut().insert(SET_COOKIE, cookie);
                response
            }
            Verdict::Admitted if path == STYLESHEET => {
                let mut response = Response::new(Full::new(Bytes::from_static(include_bytes!("style.css"))));
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8"));
                response
            }
            Verdict::Admitted => {
                let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
                let answer = match parts.method {
                    Method::GET | Method::HEAD => self.get(&segments, parts.uri.query()).await,
                    Method::POST => match Limited::new(body, MAX_FORM).collect().await {
                        Ok(body) => {
                            let mut bytes = body.to_bytes().to_vec();
                            let form = Form::parse(&bytes);
                            bytes.zeroize();
                            if self.guard.form_is_ours(form.get("csrf")) {
                                self.post(&segments, &form).await
                            } else {
                                let text = guard::refusal::CROSS_SITE;
                                Answer::Page(StatusCode::FORBIDDEN, view::message(&self.frame(), "Refused", text, None))
                            }
                        }
                        Err(_) => self.say(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "Form too large",
                            "That form is larger than any of the dashboard's.",
                        ),
                    },
                    _ => self.say(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "Not allowed",
                        "The dashboard answers GET and POST only.",
                    ),
                };
                self.send(answer)
            }
        };
        secure(response.headers_mut());
        // Paths only: no query string (the sign-in code) and never a form.
        eprintln!(
            "{} {} {} {:.0} ms",
            parts.method,
            path,
            response.status().as_u16(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(response)
    }

    fn send(&self, answer: Answer) -> Response<Full<Bytes>> {
        match answer {
            Answer::Page(status, markup) => {
                let mut response = Response::new(Full::new(Bytes::from(markup.into_string())));
                *response.status_mut() = status;
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
                response
            }
            Answer::Redirect(to) => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::SEE_OTHER;
                if let Ok(location) = HeaderValue::from_str(&to) {
                    response.headers_mut().insert(LOCATION, location);
                }
                response
            }
        }
    }

    fn say(&self, status: StatusCode, title: &str, text: &str) -> Answer {
        Answer::Page(status, view::message(&self.frame(), title, text, Some("/")))
    }

    /// The API server's refusal, verbatim (its own words say what went wrong: RBAC, CEL,
    /// admission policy); other failures with their causes.
    fn failed(&self, error: &kube::Error, what: &str, back: &str) -> Answer {
        let (status, text) = refusal(error, what);
        Answer::Page(status, view::message(&self.frame(), &format!("Not done: {what}"), &text, Some(back)))
    }

    async fn get(&self, path: &[&str], query: Option<&str>) -> Answer {
        let query: Vec<(String, String)> =
            query.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
        let param = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_default();
        let notice = notice(param("done"));
        match path {
            [] => {
                let list = ListQuery {
                    search: param("q").trim().to_string(),
                    status: param("status").to_string(),
                    page: param("page").parse().unwrap_or(0),
                };
                self.projects(&list, notice).await
            }
            ["projects", "new"] => {
                let values = ProjectForm {
                    upstream: "https://api.openai.com".into(),
                    allowed: "none".into(),
                    ..Default::default()
                };
                Answer::Page(StatusCode::OK, view::project_form(&self.frame(), &values, None, None))
            }
            ["projects", name] if is_name(name) => match self.project(name).await {
                Ok(project) => {
                    let events = self.events(None, name, "Project").await;
                    Answer::Page(StatusCode::OK, view::project(&self.frame(), &project, &events, notice))
                }
                Err(answer) => answer,
            },
            ["projects", name, "edit"] if is_name(name) => match self.project(name).await {
                Ok(project) => {
                    let values = ProjectForm::of(&project);
                    Answer::Page(StatusCode::OK, view::project_form(&self.frame(), &values, Some(&project), None))
                }
                Err(answer) => answer,
            },
            ["projects", name, "key"] if is_name(name) => match self.project(name).await {
                Ok(project) => Answer::Page(StatusCode::OK, view::rotate_form(&self.frame(), &project, None)),
                Err(answer) => answer,
            },
            ["projects", name, "revoke-all"] if is_name(name) => Answer::Page(
                StatusCode::OK,
                view::confirm(
                    &self.frame(),
                    &format!("Revoke every token of {name}?"),
                    "Every token of this project issued until now stops working at once, everywhere, for good. This cannot be undone: workloads need new tokens. (To pause a project instead, deactivate it.)",
                    &format!("/projects/{name}/revoke-all"),
                    "Revoke all tokens",
                    &format!("/projects/{name}"),
                ),
            ),
            ["projects", name, "tokens"] if is_name(name) => {
                let tokens: Api<ProxyToken> = Api::all(self.client.clone());
                match tokens.list(&ListParams::default().fields(&format!("spec.projectRef.name={name}"))).await {
                    Ok(list) => {
                        let mut items = list.items;
                        items.sort_by(|a, b| {
                            (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
                        });
                        Answer::Page(StatusCode::OK, view::tokens(&self.frame(), name, &items))
                    }
                    Err(error) => self.failed(
                        &error,
                        &format!("listing the tokens of project {name}"),
                        &format!("/projects/{name}"),
                    ),
                }
            }
            ["projects", name, "tokens", "new"] if is_name(name) => {
                let values = TokenForm {
                    namespace: "default".into(),
                    name: String::new(),
                    duration: "720h".into(),
                    max_requests: String::new(),
                };
                Answer::Page(StatusCode::OK, view::token_form(&self.frame(), name, &values, None))
            }
            ["tokens", namespace, name] if is_name(namespace) && is_name(name) => {
                match Api::<ProxyToken>::namespaced(self.client.clone(), namespace).get(name).await {
                    Ok(token) => {
                        let events = self.events(Some(namespace), name, "ProxyToken").await;
                        Answer::Page(StatusCode::OK, view::token(&self.frame(), &token, &events, notice))
                    }
                    Err(error) => self.failed(&error, &format!("reading ProxyToken {namespace}/{name}"), "/"),
                }
            }
            ["tokens", namespace, name, "revoke"] if is_name(namespace) && is_name(name) => Answer::Page(
                StatusCode::OK,
                view::confirm(
                    &self.frame(),
                    &format!("Revoke token {namespace}/{name}?"),
                    "The token stops working at once, everywhere, for good. This cannot be undone: its workload needs a new token.",
                    &format!("/tokens/{namespace}/{name}/revoke"),
                    "Revoke token",
                    &format!("/tokens/{namespace}/{name}"),
                ),
            ),
            _ => self.say(StatusCode::NOT_FOUND, "Not found", "No such page."),
        }
    }

    async fn post(&self, path: &[&str], form: &Form) -> Answer {
        match path {
            ["projects", "new"] => self.create_project(form).await,
            ["projects", name, "edit"] if is_name(name) => self.edit_project(name, form).await,
            ["projects", name, "key"] if is_name(name) => self.rotate_key(name, form).await,
            ["projects", name, "active"] if is_name(name) => {
                let active = form.get("active") == Some("true");
                let patch = json!({ "spec": { "active": active } });
                let done = if active { "activated" } else { "deactivated" };
                self.patch_project(name, &patch, done).await
            }
            ["projects", name, "revoke-all"] if is_name(name) => {
                let patch = json!({ "spec": { "tokensNotBefore": llm_proxy::api::micros(jiff::Timestamp::now()) } });
                self.patch_project(name, &patch, "revoked-all").await
            }
            ["projects", name, "tokens", "new"] if is_name(name) => self.generate_token(name, form).await,
            ["tokens", namespace, name, "revoke"] if is_name(namespace) && is_name(name) => {
                let tokens: Api<ProxyToken> = Api::namespaced(self.client.clone(), namespace);
                let patch = json!({ "spec": { "revoked": true } });
                match tokens.patch(name, &params(), &Patch::Merge(&patch)).await {
                    Ok(_) => Answer::Redirect(format!("/tokens/{namespace}/{name}?done=revoked")),
                    Err(error) => self.failed(
                        &error,
                        &format!("revoking ProxyToken {namespace}/{name}"),
                        &format!("/tokens/{namespace}/{name}"),
                    ),
                }
            }
            _ => self.say(StatusCode::NOT_FOUND, "Not found", "No such action."),
        }
    }

    async fn projects(&self, list: &ListQuery, notice: Option<&str>) -> Answer {
        let status =
            matches!(list.status.as_str(), "Active" | "Inactive").then(|| format!("status.phase={}", list.status));
        let mut rows = match self.project_rows(status.as_deref()).await {
            Ok(rows) => rows,
            Err(error) => return self.failed(&error, "listing projects", "/"),
        };
        let search = list.search.to_lowercase();
        if !search.is_empty() {
            rows.retain(|row| {
                row.name.to_lowercase().contains(&search) || row.display_name.to_lowercase().contains(&search)
            });
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Answer::Page(StatusCode::OK, view::projects(&self.frame(), list, &rows, notice))
    }

    /// Every project as `kubectl get projects` sees it: the API server's Table of the
    /// CRD's printer columns, without the objects. With 1,000 projects that is a tenth
    /// of the bytes of the objects (whose `managedFields` alone outweigh the columns)
    /// and a third of the time (benches/dashboard.md).
    async fn project_rows(&self, field_selector: Option<&str>) -> Result<Vec<view::ProjectRow>, kube::Error> {
        let api: Api<Project> = Api::all(self.client.clone());
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("includeObject", "None");
            if let Some(selector) = field_selector {
                query.append_pair("fieldSelector", selector);
            }
            query.finish()
        };
        let request = hyper::Request::get(format!("{}?{query}", api.resource_url()))
            .header(hyper::header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .map_err(kube::Error::HttpError)?;
        let table: view::Table = self.client.request(request).await?;
        Ok(table.project_rows())
    }

    async fn project(&self, name: &str) -> Result<Project, Answer> {
        Api::<Project>::all(self.client.clone())
            .get(name)
            .await
            .map_err(|error| self.failed(&error, &format!("reading project {name}"), "/"))
    }

    /// The Events about `kind` `name` (in `namespace`, or any), newest first. The audit
    /// log is a part of the page: if it cannot be read, the page says so in it.
    async fn events(&self, namespace: Option<&str>, name: &str, kind: &str) -> Vec<Event> {
        let api: Api<Event> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let mut events = match api.list(&ListParams::default().fields(&format!("regarding.name={name}"))).await {
            Ok(list) => list.items,
            Err(error) => {
                let (_, text) = refusal(&error, "listing Events");
                let note = Event { reason: Some("EventsUnavailable".into()), note: Some(text), ..Event::default() };
                return vec![note];
            }
        };
        events.retain(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some(kind));
        events.sort_by(|a, b| view::event_time(b).cmp(&view::event_time(a)));
        events.truncate(200);
        events
    }

    async fn patch_project(&self, name: &str, patch: &Value, done: &str) -> Answer {
        let projects: Api<Project> = Api::all(self.client.clone());
        match projects.patch(name, &params(), &Patch::Merge(patch)).await {
            Ok(_) => Answer::Redirect(format!("/projects/{name}?done={done}")),
            Err(error) => self.failed(&error, &format!("changing project {name}"), &format!("/projects/{name}")),
        }
    }

    async fn create_project(&self, form: &Form) -> Answer {
        let values = ProjectForm::from_form(form);
        let refuse = |error: FormError| {
            Answer::Page(
                StatusCode::UNPROCESSABLE_ENTITY,
                view::project_form(&self.frame(), &values, None, Some(&error)),
            )
        };
        let key = form.get("api_key").unwrap_or_default();
        if let Some(problem) = llm_proxy::key_format_problem(key) {
            return refuse(FormError::Key(problem));
        }
        let allowed = match values.allowed_namespaces() {
            Ok(allowed) => allowed,
            Err(text) => return refuse(FormError::Form(text)),
        };
        let name = values.name.clone();
        let secret_name = format!("{name}-api-key");
        let mut spec = json!({ "active": true, "apiKeySecretRef": { "name": secret_name, "key": "apiKey" } });
        if !values.display_name.is_empty() {
            spec["displayName"] = json!(values.display_name);
        }
        if !values.upstream.is_empty() {
            spec["upstream"] = json!({ "url": values.upstream });
        }
        if !allowed.is_null() {
            spec["allowedNamespaces"] = allowed;
        }
        let object = json!({ "apiVersion": "llmproxy.io/v1alpha1", "kind": "Project", "metadata": { "name": name }, "spec": spec });
        let project: Project = match serde_json::from_value(object) {
            Ok(project) => project,
            Err(error) => return refuse(FormError::Form(format!("The form does not make a Project: {error}"))),
        };
        let projects: Api<Project> = Api::all(self.client.clone());
        // The API server checks the Project (name, schema, CEL) before its Secret exists.
        let dry_run = PostParams { dry_run: true, field_manager: Some(FIELD_MANAGER.into()) };
        if let Err(error) = projects.create(&dry_run, &project).await {
            return refuse(FormError::Form(refusal(&error, &format!("creating project {name}")).1));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace);
        let secret = key_secret(&secret_name, &self.operator_namespace, &name, key);
        if let Err(error) = secrets.create(&post_params(), &secret).await {
            let what = format!("creating the key Secret {}/{secret_name}", self.operator_namespace);
            return refuse(FormError::Form(refusal(&error, &what).1));
        }
        if let Err(error) = projects.create(&post_params(), &project).await {
            let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
            return refuse(FormError::Form(refusal(&error, &format!("creating project {name}")).1));
        }
        Answer::Redirect(format!("/projects/{name}?done=created"))
    }

    async fn edit_project(&self, name: &str, form: &Form) -> Answer {
        let project = match self.project(name).await {
            Ok(project) => project,
            Err(answer) => return answer,
        };
        let mut values = ProjectForm::from_form(form);
        values.name = name.to_string();
        let refuse = |text: String| {
            let page = view::project_form(&self.frame(), &values, Some(&project), Some(&FormError::Form(text)));
            Answer::Page(StatusCode::UNPROCESSABLE_ENTITY, page)
        };
        let allowed = match values.allowed_namespaces() {
            Ok(allowed) => allowed,
            Err(text) => return refuse(text),
        };
        let display_name = (!values.display_name.is_empty()).then(|| values.display_name.clone());
        let mut spec = json!({ "displayName": display_name, "allowedNamespaces": allowed });
        if !values.upstream.is_empty() {
            spec["upstream"] = json!({ "url": values.upstream });
        }
        let projects: Api<Project> = Api::all(self.client.clone());
        match projects.patch(name, &params(), &Patch::Merge(json!({ "spec": spec }))).await {
            Ok(_) => Answer::Redirect(format!("/projects/{name}?done=saved")),
            Err(error) => refuse(refusal(&error, &format!("changing project {name}")).1),
        }
    }

    async fn rotate_key(&self, name: &str, form: &Form) -> Answer {
        let project = match self.project(name).await {
            Ok(project) => project,
            Err(answer) => return answer,
        };
        let refuse = |error: FormError| {
            Answer::Page(StatusCode::UNPROCESSABLE_ENTITY, view::rotate_form(&self.frame(), &project, Some(&error)))
        };
        let key = form.get("api_key").unwrap_or_default();
        if let Some(problem) = llm_proxy::key_format_problem(key) {
            return refuse(FormError::Key(problem));
        }
        let reference = &project.spec.api_key_secret_ref;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace);
        let patch = json!({ "stringData": { reference.key.as_str(): key } });
        let written = match secrets.patch(&reference.name, &params(), &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let mut secret = key_secret(&reference.name, &self.operator_namespace, name, "");
                secret.string_data = Some([(reference.key.clone(), key.to_string())].into());
                secrets.create(&post_params(), &secret).await.map(|_| ())
            }
            other => other.map(|_| ()),
        };
        match written {
            Ok(()) => Answer::Redirect(format!("/projects/{name}?done=key-rotated")),
            Err(error) => {
                let what = format!("writing the key Secret {}/{}", self.operator_namespace, reference.name);
                refuse(FormError::Form(refusal(&error, &what).1))
            }
        }
    }

    async fn generate_token(&self, project: &str, form: &Form) -> Answer {
        let values = TokenForm {
            namespace: form.text("namespace"),
            name: form.text("name"),
            duration: form.text("duration"),
            max_requests: form.text("max_requests"),
        };
        let refuse = |text: String| {
            Answer::Page(
                StatusCode::UNPROCESSABLE_ENTITY,
                view::token_form(&self.frame(), project, &values, Some(&text)),
            )
        };
        let max_requests = match values.max_requests.as_str() {
            "" => None,
            text => match text.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => return refuse("The request cap must be a whole number, or empty for no cap.".into()),
            },
        };
        let spec = ProxyTokenSpec {
            project_ref: ProjectRef { name: project.to_string() },
            duration: values.duration.clone(),
            max_requests,
            revoked: false,
            secret_name: None,
            limits: None,
        };
        let token = ProxyToken::new(&values.name, spec);
        let tokens: Api<ProxyToken> = Api::namespaced(self.client.clone(), &values.namespace);
        if let Err(error) = tokens.create(&post_params(), &token).await {
            return refuse(refusal(&error, &format!("creating ProxyToken {}/{}", values.namespace, values.name)).1);
        }
        match crate::plugin::mint(&self.client, &values.namespace, &values.name, MINT_WAIT).await {
            Ok(minted) => Answer::Page(StatusCode::OK, view::token_shown(&self.frame(), project, &minted)),
            Err(error) => refuse(llm_proxy::telemetry::Chain(&error).to_string()),
        }
    }
}

impl ProjectForm {
    fn from_form(form: &Form) -> Self {
        Self {
            name: form.text("name"),
            display_name: form.text("display_name"),
            upstream: form.text("upstream"),
            allowed: form.text("allowed"),
            selector: form.text("selector"),
        }
    }

    fn of(project: &Project) -> Self {
        let allowed = project.spec.allowed_namespaces.as_ref();
        let labels = allowed.and_then(|a| a.selector.as_ref()).and_then(|s| s.match_labels.clone()).unwrap_or_default();
        Self {
            name: project.metadata.name.clone().unwrap_or_default(),
            display_name: project.spec.display_name.clone().unwrap_or_default(),
            upstream: project.spec.upstream.url.clone(),
            allowed: match allowed {
                None => "none".into(),
                Some(a) if a.from == llm_proxy::api::NamespacesFrom::All => "all".into(),
                Some(_) => "selector".into(),
            },
            selector: labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        }
    }

    /// `spec.allowedNamespaces` as the form chose it (`null`: none), written whole so a
    /// merge patch leaves nothing of the old value behind.
    fn allowed_namespaces(&self) -> Result<Value, String> {
        match self.allowed.as_str() {
            "all" => Ok(json!({ "from": "All", "selector": null })),
            "selector" => {
                let mut labels = serde_json::Map::new();
                for pair in self.selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let Some((key, value)) = pair.split_once('=') else {
                        return Err(format!(
                            "Namespace labels are key=value pairs separated by commas, e.g. team=payments; {pair:?} is not one."
                        ));
                    };
                    labels.insert(key.trim().to_string(), json!(value.trim()));
                }
                if labels.is_empty() {
                    return Err("Name at least one namespace label (key=value), or choose another option.".into());
                }
                Ok(json!({ "from": "Selector", "selector": { "matchLabels": labels, "matchExpressions": null } }))
            }
            _ => Ok(Value::Null),
        }
    }
}

/// A key Secret for project `project`: labelled as a key and bound to the project, as
/// the controller requires.
fn key_secret(name: &str, namespace: &str, project: &str, key: &str) -> Secret {
    let (label, value) = llm_proxy::api::API_KEY_LABEL;
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.to_string());
    secret.metadata.namespace = Some(namespace.to_string());
    secret.metadata.labels = Some([(label.to_string(), value.to_string())].into());
    secret.metadata.annotations =
        Some([(llm_proxy::api::KEY_PROJECTS_ANNOTATION.to_string(), project.to_string())].into());
    secret.type_ = Some("Opaque".into());
    if !key.is_empty() {
        secret.string_data = Some([("apiKey".to_string(), key.to_string())].into());
    }
    secret
}

fn params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() }
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }
}

/// A Kubernetes name (a DNS-1123 subdomain: dot-separated labels of lowercase letters,
/// digits and '-', each starting and ending with a letter or digit): nothing else is
/// routed, so no path segment needs decoding and none can be `..` in an API URL.
fn is_name(text: &str) -> bool {
    let label = |l: &str| {
        let bytes = l.as_bytes();
        !bytes.is_empty()
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    text.len() <= 253 && text.split('.').all(label)
}

/// The page status and text for a failed API call: the API server's message verbatim
/// when it refused, else what failed and why.
fn refusal(error: &kube::Error, what: &str) -> (StatusCode, String) {
    match error {
        kube::Error::Api(status) => {
            let code = StatusCode::from_u16(status.code).ok().filter(|c| c.is_client_error() || c.is_server_error());
            (code.unwrap_or(StatusCode::BAD_GATEWAY), status.message.clone())
        }
        other => (StatusCode::BAD_GATEWAY, format!("{what}: {}", llm_proxy::telemetry::Chain(other))),
    }
}

/// The message a redirect's `done=` names: a fixed text, so a link cannot make the page
/// say anything else.
fn notice(done: &str) -> Option<&'static str> {
    Some(match done {
        "created" => {
            "Project created. Its status turns Active once the controller has checked its key; then generate tokens for workloads."
        }
        "saved" => "Saved.",
        "activated" => "Project activated: its tokens work again (unless expired or revoked).",
        "deactivated" => {
            "Project deactivated: every request of its tokens is refused until it is activated again. Nothing was revoked."
        }
        "revoked-all" => "Every token of this project issued until now is revoked. This cannot be undone.",
        "key-rotated" => {
            "Key rotated. Tokens are unchanged; every proxy uses the new key as soon as it sees the Secret change."
        }
        "revoked" => "Token revoked. This cannot be undone.",
        _ => return None,
    })
}

/// The headers a careful web app sends: no scripts, no framing, no caching (a page may
/// hold a token), no referrer to other sites, nothing readable by other origins.
/// (`Referrer-Policy: no-referrer` would make Chromium send `Origin: null` on our own
/// forms, which the guard must refuse: `same-origin` keeps addresses in.)
fn secure(headers: &mut hyper::HeaderMap) {
    let set = |headers: &mut hyper::HeaderMap, name: &'static str, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, "x-frame-options", "DENY");
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "referrer-policy", "same-origin");
    set(headers, "cross-origin-opener-policy", "same-origin");
    set(headers, "cross-origin-resource-policy", "same-origin");
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kubernetes_names_are_routed() {
        for name in ["a", "prod-api", "team.prod-api", "0"] {
            assert!(is_name(name), "{name}");
        }
        for name in ["", "..", ".", "a..b", "-a", "a-", "A", "a_b", "a%2e", ".a", "a."] {
            assert!(!is_name(name), "{name}");
        }
    }

    #[test]
    fn a_link_cannot_make_the_page_say_anything_else() {
        assert!(notice("deactivated").is_some());
        assert_eq!(notice("<b>hello</b>"), None);
    }
}
