//! The dashboard's pages, rendered on the server from the objects the API server returned.
//!
//! In: Projects, ProxyTokens, Events (and a form's values). Out: HTML. Every text from the
//! cluster goes through maud's escaping; no page has a script. The token value appears
//! on one page only, the answer to the form that generated it.

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use maud::{DOCTYPE, Markup, html};

use llm_proxy::api::{NamespacesFrom, Project, ProxyToken};

use super::STYLESHEET;
use crate::plugin::{Minted, snippets};

/// What every page knows: who it acts as and the form secret.
pub(crate) struct Frame<'a> {
    pub(crate) acting_as: &'a str,
    pub(crate) csrf: &'a str,
}

impl Frame<'_> {
    /// A whole page.
    pub(crate) fn page(&self, title: &str, body: Markup) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · llm-proxy" }
                    link rel="stylesheet" href=(STYLESHEET);
                }
                body {
                    header {
                        a href="/" { "llm-proxy" }
                        a href="/" { "Projects" }
                        span.context { "acting as " strong { (self.acting_as) } }
                    }
                    main { (body) }
                }
            }
        }
    }

    /// A POST form with the launch's form secret in it.
    fn form(&self, action: &str, class: &str, fields: Markup) -> Markup {
        html! {
            form method="post" action=(action) class=(class) {
                input type="hidden" name="csrf" value=(self.csrf);
                (fields)
            }
        }
    }

    /// A one-button form.
    fn button(&self, action: &str, name: &str, value: &str, label: &str, class: &str) -> Markup {
        self.form(action, "", html! { button type="submit" name=(name) value=(value) class=(class) { (label) } })
    }
}

/// A message in a colored box: `error`, `warn`, `ok` or `info`.
pub(crate) fn banner(kind: &str, text: &str) -> Markup {
    html! { div class={"banner " (kind)} role=[(kind == "error").then_some("alert")] { (text) } }
}

fn badge(phase: &str) -> Markup {
    html! { span class={"badge " (phase)} { (phase) } }
}

fn when(time: Option<&jiff::Timestamp>) -> String {
    time.map_or("-".to_string(), |t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
}

fn created(meta: &ObjectMeta) -> String {
    when(meta.creation_timestamp.as_ref().map(|t| &t.0))
}

/// The GitOps tool an object is managed by (field managers of Argo CD and Flux, or their
/// tracking annotations and labels), if any: its next sync reverts an edit made here.
pub(crate) fn gitops(meta: &ObjectMeta) -> Option<&'static str> {
    let managers = meta.managed_fields.iter().flatten().filter_map(|f| f.manager.as_deref());
    let labels = meta.labels.iter().flatten().map(|(k, _)| k.as_str());
    let annotations = meta.annotations.iter().flatten().map(|(k, _)| k.as_str());
    let mut marks = managers.chain(labels).chain(annotations);
    marks.find_map(|mark| {
        if mark.starts_with("argocd") || mark.starts_with("argocd.argoproj.io/") {
            Some("Argo CD")
        } else if matches!(mark, "kustomize-controller" | "helm-controller")
            || mark.starts_with("kustomize.toolkit.fluxcd.io/")
            || mark.starts_with("helm.toolkit.fluxcd.io/")
        {
            Some("Flux")
        } else {
            None
        }
    })
}

fn gitops_warning(meta: &ObjectMeta) -> Markup {
    html! {
        @if let Some(tool) = gitops(meta) {
            (banner("warn", &format!(
                "Managed by {tool}: a change made here is reverted by its next sync. Change this object where {tool} reads it (in Git) instead."
            )))
        }
    }
}

fn project_phase(project: &Project) -> &'static str {
    project.status.as_ref().and_then(|s| s.phase).map_or("Pending", |p| p.as_str())
}

fn ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == "Ready")
}

/// A list as the API server renders it for kubectl (`as=Table`): the printer columns'
/// names and one row of cells per object.
#[derive(serde::Deserialize)]
pub(crate) struct Table {
    #[serde(rename = "columnDefinitions")]
    columns: Vec<Column>,
    #[serde(default)]
    rows: Vec<Row>,
}

#[derive(serde::Deserialize)]
struct Column {
    name: String,
}

#[derive(serde::Deserialize)]
struct Row {
    cells: Vec<serde_json::Value>,
}

/// One line of the projects list: what `kubectl get projects` shows.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ProjectRow {
    pub(crate) name: String,
    pub(crate) display_name: String,
    pub(crate) phase: String,
    /// The Ready condition's status and reason.
    pub(crate) ready: String,
    pub(crate) reason: String,
    pub(crate) tokens: Option<i64>,
    pub(crate) active_tokens: Option<i64>,
    /// As kubectl shows it: `5m`, `3d`.
    pub(crate) age: String,
}

impl Table {
    /// The rows of a Projects Table, cells found by column name (so a column added to
    /// the CRD moves nothing).
    pub(crate) fn project_rows(&self) -> Vec<ProjectRow> {
        let at = |name: &str| self.columns.iter().position(|c| c.name == name);
        let (name, display, phase, ready, reason, tokens, active, age) = (
            at("Name"),
            at("Display Name"),
            at("Status"),
            at("Ready"),
            at("Reason"),
            at("Tokens"),
            at("Active Tokens"),
            at("Age"),
        );
        self.rows
            .iter()
            .map(|row| {
                let cell = |i: Option<usize>| i.and_then(|i| row.cells.get(i));
                let text = |i| cell(i).and_then(|v| v.as_str()).unwrap_or_default().to_string();
                ProjectRow {
                    name: text(name),
                    display_name: text(display),
                    phase: text(phase),
                    ready: text(ready),
                    reason: text(reason),
                    tokens: cell(tokens).and_then(|v| v.as_i64()),
                    active_tokens: cell(active).and_then(|v| v.as_i64()),
                    age: text(age),
                }
            })
            .collect()
    }
}

/// Filters and paging of the projects list, as the query string carries them.
#[derive(Default)]
pub(crate) struct ListQuery {
    pub(crate) search: String,
    pub(crate) status: String,
    pub(crate) page: usize,
}

/// Rows per page of the projects list.
pub(crate) const PAGE: usize = 100;

/// The projects list: search, status filter, one row per project.
pub(crate) fn projects(frame: &Frame, query: &ListQuery, matching: &[ProjectRow], notice: Option<&str>) -> Markup {
    let pages = matching.len().div_ceil(PAGE).max(1);
    let shown = matching.iter().skip(query.page * PAGE).take(PAGE);
    let link = |page: usize| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("q", &query.search).append_pair("status", &query.status).append_pair("page", &page.to_string());
        format!("/?{}", q.finish())
    };
    frame.page(
        "Projects",
        html! {
            h1 { "Projects" }
            @if let Some(notice) = notice { (banner("ok", notice)) }
            div.actions { a.button.primary href="/projects/new" { "New Project" } }
            form.filters method="get" action="/" role="search" {
                div { label for="q" { "Search by name " } input #q type="search" name="q" value=(query.search) placeholder="name or display name"; }
                div {
                    label for="status" { "Status " }
                    select #status name="status" {
                        @for (value, label) in [("", "All"), ("Active", "Active"), ("Inactive", "Inactive")] {
                            option value=(value) selected[query.status == value] { (label) }
                        }
                    }
                }
                button type="submit" { "Filter" }
            }
            p.muted { (matching.len()) " project" @if matching.len() != 1 { "s" } }
            table #projects {
                thead { tr { th { "Name" } th { "Display name" } th { "Status" } th { "Serving" } th.num { "Tokens" } th.num { "Active" } th { "Created" } th { "Actions" } } }
                tbody {
                    @for p in shown {
                        @let phase = if p.phase.is_empty() { "Pending" } else { p.phase.as_str() };
                        tr {
                            td { a href={"/projects/" (p.name)} { (p.name) } }
                            td { (p.display_name) }
                            td { (badge(phase)) }
                            td { @match p.ready.as_str() { "True" => "yes", "" => "-", _ => { "no: " (p.reason) } } }
                            td.num { (p.tokens.unwrap_or(0)) }
                            td.num { (p.active_tokens.unwrap_or(0)) }
                            td { (p.age) " ago" }
                            td {
                                @if phase == "Inactive" {
                                    (frame.button(&format!("/projects/{}/active", p.name), "active", "true", "Activate", ""))
                                } @else {
                                    (frame.button(&format!("/projects/{}/active", p.name), "active", "false", "Deactivate", ""))
                                }
                            }
                        }
                    }
                }
            }
            @if pages > 1 {
                div.pages {
                    @if query.page > 0 { a href=(link(query.page - 1)) { "← Previous" } }
                    span.muted { "page " (query.page + 1) " of " (pages) }
                    @if query.page + 1 < pages { a href=(link(query.page + 1)) { "Next →" } }
                }
            }
        },
    )
}

/// The facts, tokens, actions and audit log of one project.
pub(crate) fn project(frame: &Frame, p: &Project, events: &[Event], notice: Option<&str>) -> Markup {
    let name = p.metadata.name.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let counts = status.tokens.unwrap_or_default();
    let title = p.spec.display_name.clone().unwrap_or_else(|| name.clone());
    let secret = &p.spec.api_key_secret_ref;
    frame.page(
        &title,
        html! {
            p.muted { a href="/" { "Projects" } " / " (name) }
            h1 { (title) " " (badge(project_phase(p))) }
            (gitops_warning(&p.metadata))
            @if let Some(notice) = notice { (banner("ok", notice)) }
            @if p.metadata.deletion_timestamp.is_some() {
                (banner("warn", "Someone asked to delete this project. Projects keep their audit trail and are never deleted: it is treated as inactive."))
            }
            div.actions {
                a.button href={"/projects/" (name) "/edit"} { "Edit" }
                a.button.primary href={"/projects/" (name) "/tokens/new"} { "Generate token" }
                a.button href={"/projects/" (name) "/key"} { "Rotate key" }
                @if p.spec.active {
                    (frame.button(&format!("/projects/{name}/active"), "active", "false", "Deactivate", ""))
                } @else {
                    (frame.button(&format!("/projects/{name}/active"), "active", "true", "Activate", "primary"))
                }
                a.button.danger href={"/projects/" (name) "/revoke-all"} { "Revoke all tokens" }
            }
            dl.facts {
                dt { "ID" } dd { code { (p.metadata.uid.as_deref().unwrap_or("-")) } }
                dt { "Name" } dd { (name) }
                dt { "Display name" } dd { (p.spec.display_name.as_deref().unwrap_or("-")) }
                dt { "Status" } dd { (project_phase(p)) }
                dt { "Serving" } dd {
                    @match ready(&status.conditions) {
                        Some(c) if c.status == "True" => { "yes" }
                        Some(c) => { "no — " (c.reason) ": " (c.message) }
                        None => { "unknown: the controller has not reported yet" }
                    }
                }
                dt { "Created" } dd { (created(&p.metadata)) }
                dt { "API key" } dd { code { (status.api_key_hint.as_deref().unwrap_or("(none)")) } span.muted { " in Secret " (secret.name) ", key " (secret.key) } }
                dt { "Upstream" } dd { (p.spec.upstream.url) }
                dt { "Allowed namespaces" } dd { (allowed(p)) }
                dt { "Tokens revoked before" } dd { (when(p.spec.tokens_not_before.as_ref().map(|t| &t.0))) }
            }
            h2 { "Tokens" }
            p { strong { (counts.total) } " total, " strong { (counts.active) } " active. " a href={"/projects/" (name) "/tokens"} { "All tokens of this project" } }
            table #recent-tokens {
                thead { tr { th { "Recent token" } th { "Status" } th { "Issued" } } }
                tbody {
                    @for t in &status.recent_tokens {
                        tr {
                            td { a href={"/tokens/" (t.namespace) "/" (t.name)} { (t.namespace) "/" (t.name) } }
                            td { (badge(t.phase.as_deref().unwrap_or("Pending"))) }
                            td { (when(t.issued_at.as_ref().map(|i| &i.0))) }
                        }
                    }
                    @if status.recent_tokens.is_empty() { tr { td colspan="3" .muted { "No tokens yet." } } }
                }
            }
            h2 { "Conditions" }
            (conditions(&status.conditions))
            h2 #audit { "Audit log" }
            p.muted { "Every change to this project, as Kubernetes Events (newest first; the API server keeps them for an hour by default)." }
            (events_table(events))
            h2 { "Deleting" }
            (banner("info", "Projects are never deleted, so their audit trail survives. To stop a project, deactivate it: every request of its tokens is refused at once, and its tokens work again if you activate it. To end its tokens for good, revoke them."))
        },
    )
}

fn allowed(p: &Project) -> String {
    match &p.spec.allowed_namespaces {
        None => "none yet (no namespace may hold its tokens)".to_string(),
        Some(a) if a.from == NamespacesFrom::All => "all namespaces".to_string(),
        Some(a) => {
            let labels = a.selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
            let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("namespaces labelled {}", text.join(","))
        }
    }
}

fn conditions(conditions: &[Condition]) -> Markup {
    html! {
        table.conditions {
            thead { tr { th { "Type" } th { "Status" } th { "Reason" } th { "Message" } th { "Since" } } }
            tbody {
                @for c in conditions {
                    tr { td { (c.type_) } td { (c.status) } td { (c.reason) } td { (c.message) } td { (when(Some(&c.last_transition_time.0))) } }
                }
            }
        }
    }
}

fn events_table(events: &[Event]) -> Markup {
    html! {
        table.events {
            thead { tr { th { "Time" } th { "Type" } th { "Reason" } th { "What happened" } th { "By" } } }
            tbody {
                @for e in events {
                    tr {
                        td { (when(event_time(e))) }
                        td { (e.type_.as_deref().unwrap_or("")) }
                        td { (e.reason.as_deref().unwrap_or("")) }
                        td { (e.note.as_deref().unwrap_or("")) }
                        td { (e.reporting_controller.as_deref().unwrap_or("")) }
                    }
                }
                @if events.is_empty() { tr { td colspan="5" .muted { "No events." } } }
            }
        }
    }
}

/// When an Event last happened: its series' last time, else its own.
pub(crate) fn event_time(e: &Event) -> Option<&jiff::Timestamp> {
    e.series
        .as_ref()
        .map(|s| &s.last_observed_time.0)
        .or(e.event_time.as_ref().map(|t| &t.0))
        .or(e.deprecated_last_timestamp.as_ref().map(|t| &t.0))
}

/// What the project form holds (never the key: a refused form shows it empty).
#[derive(Default)]
pub(crate) struct ProjectForm {
    pub(crate) name: String,
    pub(crate) display_name: String,
    pub(crate) upstream: String,
    /// `none`, `all` or `selector`.
    pub(crate) allowed: String,
    /// `key=value,…` when `allowed` is `selector`.
    pub(crate) selector: String,
}

/// Where a form's error goes: next to a field, or above the form.
pub(crate) enum FormError {
    /// The key field: "Invalid API key format".
    Key(String),
    /// What the API server or the dashboard said about the whole form.
    Form(String),
}

/// The "New Project" form, or the edit form of `editing`.
pub(crate) fn project_form(
    frame: &Frame,
    values: &ProjectForm,
    editing: Option<&Project>,
    error: Option<&FormError>,
) -> Markup {
    let (title, action) = match editing {
        Some(_) => (format!("Edit {}", values.name), format!("/projects/{}/edit", values.name)),
        None => ("New Project".to_string(), "/projects/new".to_string()),
    };
    let cancel = if editing.is_some() { format!("/projects/{}", values.name) } else { "/".to_string() };
    frame.page(
        &title,
        html! {
            h1 { (title) }
            @if let Some(p) = editing { (gitops_warning(&p.metadata)) }
            @if let Some(FormError::Form(text)) = error { (banner("error", text)) }
            (frame.form(&action, "stacked", html! {
                @if editing.is_none() {
                    label for="name" { "Name" }
                    p.hint { "Lowercase letters, digits and '-'; the Project's name in Kubernetes, fixed once created." }
                    input #name type="text" name="name" value=(values.name) required autocomplete="off";
                }
                label for="display_name" { "Display name" }
                input #display_name type="text" name="display_name" value=(values.display_name);
                @if editing.is_none() {
                    label for="api_key" { "OpenAI API key" }
                    p.hint { "Stored in a Secret of the operator's namespace; never shown again, only its last four characters." }
                    input #api_key type="password" name="api_key" required autocomplete="off";
                    @if let Some(FormError::Key(text)) = error { p.field-error role="alert" { (text) } }
                }
                label for="upstream" { "Upstream URL" }
                input #upstream type="text" name="upstream" value=(values.upstream);
                label for="allowed" { "Namespaces that may hold its tokens" }
                select #allowed name="allowed" {
                    @for (value, label) in [("none", "None yet"), ("all", "All namespaces"), ("selector", "Namespaces with labels…")] {
                        option value=(value) selected[values.allowed == value] { (label) }
                    }
                }
                label for="selector" { "Namespace labels (with “Namespaces with labels”)" }
                input #selector type="text" name="selector" value=(values.selector) placeholder="team=payments";
                div.actions {
                    button.primary type="submit" { @if editing.is_some() { "Save" } @else { "Create project" } }
                    a.button href=(cancel) { "Cancel" }
                }
            }))
        },
    )
}

/// The key rotation form.
pub(crate) fn rotate_form(frame: &Frame, p: &Project, error: Option<&FormError>) -> Markup {
    let name = p.metadata.name.clone().unwrap_or_default();
    let secret = &p.spec.api_key_secret_ref;
    let hint = p.status.as_ref().and_then(|s| s.api_key_hint.clone()).unwrap_or_else(|| "(none)".into());
    frame.page(
        &format!("Rotate the key of {name}"),
        html! {
            h1 { "Rotate the key of " (name) }
            (gitops_warning(&p.metadata))
            @if let Some(FormError::Form(text)) = error { (banner("error", text)) }
            p { "The new key replaces " code { (hint) } " in Secret " code { (secret.name) } " (key " code { (secret.key) } "). Tokens stay as they are: workloads need no change, and every proxy uses the new key as soon as it sees the Secret change." }
            (frame.form(&format!("/projects/{name}/key"), "stacked", html! {
                label for="api_key" { "New OpenAI API key" }
                input #api_key type="password" name="api_key" required autocomplete="off";
                @if let Some(FormError::Key(text)) = error { p.field-error role="alert" { (text) } }
                div.actions {
                    button.primary type="submit" { "Rotate key" }
                    a.button href={"/projects/" (name)} { "Cancel" }
                }
            }))
        },
    )
}

/// A confirmation before a change that cannot be undone.
pub(crate) fn confirm(frame: &Frame, title: &str, warning: &str, action: &str, label: &str, cancel: &str) -> Markup {
    frame.page(
        title,
        html! {
            h1 { (title) }
            (banner("warn", warning))
            div.actions {
                (frame.button(action, "confirm", "yes", label, "danger"))
                a.button href=(cancel) { "Cancel" }
            }
        },
    )
}

/// What the token form holds.
pub(crate) struct TokenForm {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) duration: String,
    pub(crate) max_requests: String,
}

/// The "Generate token" form of project `project`.
pub(crate) fn token_form(frame: &Frame, project: &str, values: &TokenForm, error: Option<&str>) -> Markup {
    frame.page(
        &format!("Generate a token for {project}"),
        html! {
            h1 { "Generate a token for " (project) }
            @if let Some(text) = error { (banner("error", text)) }
            p { "The controller mints the token into a Secret of the namespace, ready for a workload's " code { "envFrom" } ". It is shown once, on the next page." }
            (frame.form(&format!("/projects/{project}/tokens/new"), "stacked", html! {
                label for="namespace" { "Namespace" }
                input #namespace type="text" name="namespace" value=(values.namespace) required;
                label for="token_name" { "Name (of the ProxyToken and its Secret)" }
                input #token_name type="text" name="name" value=(values.name) required autocomplete="off";
                label for="duration" { "Lifetime" }
                p.hint { "A Go duration, at most one year: 24h, 720h, 8760h." }
                input #duration type="text" name="duration" value=(values.duration) required;
                label for="max_requests" { "Request cap (optional)" }
                input #max_requests type="number" name="max_requests" min="1" value=(values.max_requests);
                div.actions {
                    button.primary type="submit" { "Generate token" }
                    a.button href={"/projects/" (project)} { "Cancel" }
                }
            }))
        },
    )
}

/// The one page that shows a token, with the plugin's snippets.
pub(crate) fn token_shown(frame: &Frame, project: &str, minted: &Minted) -> Markup {
    let (namespace, name) = (&minted.namespace, &minted.name);
    frame.page(
        "Token generated",
        html! {
            h1 { "Token " (namespace) "/" (name) }
            (banner("warn", "Copy the token now: this page is the only time it is shown. It is also in the Secret below, for workloads."))
            pre.secret #token { (minted.value.as_str()) }
            p { "Secret " code { (namespace) "/" (minted.secret_name) } " holds it as " code { "OPENAI_API_KEY" } " with " code { "OPENAI_BASE_URL" } "." }
            @for (title, snippet) in snippets(minted) {
                h2 { (title) }
                pre { (snippet) }
            }
            div.actions {
                a.button href={"/tokens/" (namespace) "/" (name)} { "Open the token" }
                a.button href={"/projects/" (project)} { "Back to " (project) }
            }
        },
    )
}

fn token_phase(t: &ProxyToken) -> &'static str {
    t.status.as_ref().and_then(|s| s.phase).map_or("Pending", |p| p.as_str())
}

/// Every token of a project.
pub(crate) fn tokens(frame: &Frame, project: &str, items: &[ProxyToken]) -> Markup {
    frame.page(
        &format!("Tokens of {project}"),
        html! {
            p.muted { a href="/" { "Projects" } " / " a href={"/projects/" (project)} { (project) } " / tokens" }
            h1 { "Tokens of " (project) }
            div.actions { a.button.primary href={"/projects/" (project) "/tokens/new"} { "Generate token" } }
            table #tokens {
                thead { tr { th { "Token" } th { "Status" } th { "Issued" } th { "Expires" } th.num { "Requests" } th.num { "Cap" } th { "Last used" } th { "" } } }
                tbody {
                    @for t in items {
                        @let (ns, name) = (t.metadata.namespace.clone().unwrap_or_default(), t.metadata.name.clone().unwrap_or_default());
                        @let status = t.status.clone().unwrap_or_default();
                        tr {
                            td { a href={"/tokens/" (ns) "/" (name)} { (ns) "/" (name) } }
                            td { (badge(token_phase(t))) }
                            td { (when(status.issued_at.as_ref().map(|x| &x.0))) }
                            td { (when(status.expires_at.as_ref().map(|x| &x.0))) }
                            td.num { (status.request_count.unwrap_or(0)) }
                            td.num { @if let Some(max) = t.spec.max_requests { (max) } @else { "-" } }
                            td { (when(status.last_used_at.as_ref().map(|x| &x.0))) }
                            td { @if !t.spec.revoked { a href={"/tokens/" (ns) "/" (name) "/revoke"} { "Revoke" } } }
                        }
                    }
                    @if items.is_empty() { tr { td colspan="8" .muted { "No tokens yet." } } }
                }
            }
        },
    )
}

/// One token: its lifecycle, usage, conditions and Events.
pub(crate) fn token(frame: &Frame, t: &ProxyToken, events: &[Event], notice: Option<&str>) -> Markup {
    let (ns, name) = (t.metadata.namespace.clone().unwrap_or_default(), t.metadata.name.clone().unwrap_or_default());
    let status = t.status.clone().unwrap_or_default();
    let project = &t.spec.project_ref.name;
    frame.page(
        &format!("Token {ns}/{name}"),
        html! {
            p.muted { a href="/" { "Projects" } " / " a href={"/projects/" (project)} { (project) } " / " a href={"/projects/" (project) "/tokens"} { "tokens" } " / " (ns) "/" (name) }
            h1 { "Token " (ns) "/" (name) " " (badge(token_phase(t))) }
            (gitops_warning(&t.metadata))
            @if let Some(notice) = notice { (banner("ok", notice)) }
            @if !t.spec.revoked {
                div.actions { a.button.danger href={"/tokens/" (ns) "/" (name) "/revoke"} { "Revoke" } }
            }
            dl.facts {
                dt { "Project" } dd { a href={"/projects/" (project)} { (project) } }
                dt { "Secret" } dd { code { (status.secret_name.as_deref().unwrap_or("-")) } }
                dt { "Token hash" } dd { code { (status.token_hash.as_deref().unwrap_or("-")) } }
                dt { "Issued" } dd { (when(status.issued_at.as_ref().map(|x| &x.0))) }
                dt { "Expires" } dd { (when(status.expires_at.as_ref().map(|x| &x.0))) " (lifetime " (t.spec.duration) ")" }
                dt { "Requests" } dd { (status.request_count.unwrap_or(0)) @if let Some(max) = t.spec.max_requests { " of " (max) } }
                dt { "Last used" } dd { (when(status.last_used_at.as_ref().map(|x| &x.0))) }
                dt { "Revoked" } dd { @if t.spec.revoked { "yes (cannot be undone)" } @else { "no" } }
            }
            h2 { "Conditions" }
            (conditions(&status.conditions))
            h2 { "Audit log" }
            (events_table(events))
        },
    )
}

/// A page that only says something: a refusal, an error, a missing object.
pub(crate) fn message(frame: &Frame, title: &str, text: &str, back: Option<&str>) -> Markup {
    frame.page(
        title,
        html! {
            h1 { (title) }
            (banner("error", text))
            @if let Some(back) = back { p { a href=(back) { "Back" } } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn meta(managers: &[&str], labels: &[&str], annotations: &[&str]) -> ObjectMeta {
        let map = |keys: &[&str]| Some(keys.iter().map(|k| (k.to_string(), "x".to_string())).collect());
        ObjectMeta {
            managed_fields: Some(
                managers
                    .iter()
                    .map(|m| ManagedFieldsEntry { manager: Some(m.to_string()), ..Default::default() })
                    .collect(),
            ),
            labels: map(labels),
            annotations: map(annotations),
            ..Default::default()
        }
    }

    #[test]
    fn objects_of_argo_cd_and_flux_are_marked() {
        assert_eq!(gitops(&meta(&["argocd-controller"], &[], &[])), Some("Argo CD"));
        assert_eq!(gitops(&meta(&["argocd-application-controller"], &[], &[])), Some("Argo CD"));
        assert_eq!(
            gitops(&meta(&["kubectl-client-side-apply"], &[], &["argocd.argoproj.io/tracking-id"])),
            Some("Argo CD")
        );
        assert_eq!(gitops(&meta(&["kustomize-controller"], &[], &[])), Some("Flux"));
        assert_eq!(gitops(&meta(&["helm-controller"], &[], &[])), Some("Flux"));
        assert_eq!(gitops(&meta(&[], &["kustomize.toolkit.fluxcd.io/name"], &[])), Some("Flux"));
        assert_eq!(
            gitops(&meta(
                &["kubectl-client-side-apply", "llm-proxy-controller", "kubectl-llmproxy"],
                &["app.kubernetes.io/instance"],
                &[]
            )),
            None
        );
    }

    #[test]
    fn a_projects_table_is_read_by_column_name() {
        let table: Table = serde_json::from_value(serde_json::json!({
            "columnDefinitions": [
                { "name": "Name" }, { "name": "Status" }, { "name": "New Column" }, { "name": "Display Name" },
                { "name": "Ready" }, { "name": "Reason" }, { "name": "Tokens" }, { "name": "Active Tokens" }, { "name": "Age" }
            ],
            "rows": [
                { "cells": ["a", "Active", 1, "A", "True", "Ready", 3, 2, "5m"] },
                { "cells": ["b", null, null, null, null, null, null, null, "1s"] }
            ]
        }))
        .unwrap();
        let rows = table.project_rows();
        let a = ProjectRow {
            name: "a".into(),
            display_name: "A".into(),
            phase: "Active".into(),
            ready: "True".into(),
            reason: "Ready".into(),
            tokens: Some(3),
            active_tokens: Some(2),
            age: "5m".into(),
        };
        assert_eq!(rows[0], a);
        assert_eq!(rows[1], ProjectRow { name: "b".into(), age: "1s".into(), ..Default::default() });
    }

    #[test]
    fn text_from_the_cluster_is_escaped() {
        let frame = Frame { acting_as: "<ctx>", csrf: "c" };
        let page = message(&frame, "<script>alert(1)</script>", "a \"quoted\" <b>", None).into_string();
        assert!(!page.contains("<script>alert") && page.contains("&lt;script&gt;alert(1)"), "{page}");
        assert!(page.contains("&lt;ctx&gt;") && page.contains("&lt;b&gt;"));
    }
}
