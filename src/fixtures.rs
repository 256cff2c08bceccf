//! Objects for unit tests, built in one place. Each builder returns the plain object a
//! test then changes where it matters, so a test shows only what it is about.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::api::{
    Project, ProjectRef, ProjectSpec, ProxyToken, ProxyTokenSpec, ProxyTokenStatus, SecretKeyRef, TokenPhase, Upstream,
};

/// An active Project `name`: key in Secret `<name>-key` (key `apiKey`), a loopback
/// upstream (with a trailing slash, as admins write it), no namespace grant; generation
/// 1, resourceVersion 1.
pub(crate) fn project(name: &str) -> Project {
    let mut p = Project::new(
        name,
        ProjectSpec {
            display_name: None,
            active: true,
            api_key_secret_ref: SecretKeyRef { name: format!("{name}-key"), key: "apiKey".into() },
            upstream: Upstream { url: "http://127.0.0.1:9/".into() },
            allowed_namespaces: None,
            tokens_not_before: None,
            limits: None,
            price_list: None,
        },
    );
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("1".into());
    p
}

/// A one-hour, uncapped ProxyToken `namespace/name` for Project `project`, not minted.
pub(crate) fn token(name: &str, namespace: &str, project: &str) -> ProxyToken {
    let mut t = ProxyToken::new(
        name,
        ProxyTokenSpec {
            project_ref: ProjectRef { name: project.into() },
            duration: "1h".into(),
            max_requests: None,
            revoked: false,
            secret_name: None,
            limits: None,
        },
    );
    t.metadata.namespace = Some(namespace.into());
    t
}

/// `token` as minted: `Active`, hash `hash`, its Secret named after it, issued at `issued_at`.
pub(crate) fn minted(mut token: ProxyToken, hash: &str, issued_at: jiff::Timestamp) -> ProxyToken {
    token.status = Some(ProxyTokenStatus {
        phase: Some(TokenPhase::Active),
        token_hash: Some(hash.into()),
        secret_name: token.metadata.name.clone(),
        issued_at: Some(MicroTime(issued_at)),
        ..Default::default()
    });
    token
}
