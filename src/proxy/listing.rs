//! `GET /v1/models` for a token whose models are limited (`spec.limits.models` of the
//! token or its Project): the upstream's listing narrowed to the models both lists
//! allow, so SDKs and UIs offer only models that will be accepted.
//!
//! In: the upstream's answer. Out: a successful JSON listing with only the allowed
//! entries of `data`; any other answer (an error) unchanged. Listings are small; one
//! larger than [`MAX_LISTING`] or that is not a JSON listing is refused as a bad
//! upstream answer rather than passed on unfiltered.

use http_body_util::{BodyExt, Limited};
use hyper::{Request, Response, StatusCode, header};
use serde_json::Value;

use super::error::{ProxyError, Refused};
use super::{Body, UpstreamBody, full};
use crate::index::Route;

/// Most bytes of a model listing the proxy reads to narrow it.
const MAX_LISTING: usize = 4 * 1024 * 1024;

/// Whether `route`'s token or its Project limits the models (and so the listing).
pub(crate) fn limited(route: &Route) -> bool {
    route.token.models.is_some() || route.project.models.is_some()
}

/// Asks the upstream for a listing the proxy can read: without compression.
pub(crate) fn prepare<B>(request: &mut Request<B>) {
    request.headers_mut().remove(header::ACCEPT_ENCODING);
}

/// The upstream's `response` to a listing, narrowed to what `route` allows.
pub(crate) async fn narrow(response: Response<UpstreamBody>, route: &Route) -> Result<Response<Body>, Refused> {
    if response.status() != StatusCode::OK {
        return Ok(response.map(|body| body.map_err(Into::into).boxed()));
    }
    let unreadable = || {
        Refused::saying(
            ProxyError::UpstreamError,
            "The upstream's model listing could not be read, so it could not be narrowed to the models this token may use (spec.limits.models).".into(),
        )
    };
    let (mut parts, body) = response.into_parts();
    let bytes = Limited::new(body, MAX_LISTING).collect().await.map_err(|_| unreadable())?.to_bytes();
    let allows =
        |model: &str| [&route.token.models, &route.project.models].into_iter().flatten().all(|list| list.allows(model));
    let narrowed = narrowed(&bytes, allows).ok_or_else(unreadable)?;
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(narrowed.len()));
    Ok(Response::from_parts(parts, full(narrowed)))
}

/// `listing` (`{"object":"list","data":[{"id":…},…]}`) with only the entries whose id
/// `allows` accepts; `None` when it is not such a listing.
fn narrowed(listing: &[u8], allows: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let mut listing: Value = serde_json::from_slice(listing).ok()?;
    let data = listing.get_mut("data")?.as_array_mut()?;
    data.retain(|entry| entry.get("id").and_then(Value::as_str).is_some_and(&allows));
    serde_json::to_vec(&listing).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_keeps_only_what_is_allowed_and_everything_else_as_it_was() {
        let listing = br#"{"object":"list","data":[{"id":"gpt-4o","object":"model"},{"id":"gpt-4o-mini","object":"model","owned_by":"system"},{"object":"model"}],"has_more":false}"#;
        let kept = narrowed(listing, |m| m == "gpt-4o-mini").unwrap();
        let value: Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"object":"list","data":[{"id":"gpt-4o-mini","object":"model","owned_by":"system"}],"has_more":false})
        );
        assert_eq!(narrowed(b"not json", |_| true), None);
        assert_eq!(narrowed(br#"{"object":"list"}"#, |_| true), None);
    }
}
