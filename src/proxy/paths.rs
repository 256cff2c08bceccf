//! The OpenAI API surface the proxy forwards: exact paths (with single-segment
//! identifiers), each with the methods the API uses there.
//!
//! Paths are checked, never rewritten: anything with empty, `.` or `..` segments or
//! percent-encoding is simply not on the surface, so no normalisation can be tricked
//! into reaching something else upstream.

use hyper::Method;

/// Why a path/method pair is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathError {
    /// Not an endpoint of the API surface.
    NotFound,
    /// An endpoint, but not with that method.
    MethodNotAllowed,
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_POST: &[Method] = &[Method::GET, Method::POST];
const GET_DELETE: &[Method] = &[Method::GET, Method::DELETE];
const GET_POST_DELETE: &[Method] = &[Method::GET, Method::POST, Method::DELETE];

/// `*` stands for one identifier segment.
const ENDPOINTS: &[(&str, &[Method])] = &[
    ("/v1/chat/completions", GET_POST),
    ("/v1/chat/completions/*", GET_POST_DELETE),
    ("/v1/chat/completions/*/messages", GET),
    ("/v1/completions", POST),
    ("/v1/responses", POST),
    ("/v1/responses/*", GET_DELETE),
    ("/v1/responses/*/cancel", POST),
    ("/v1/responses/*/input_items", GET),
    ("/v1/embeddings", POST),
    ("/v1/models", GET),
    ("/v1/models/*", GET_DELETE),
    ("/v1/moderations", POST),
    ("/v1/images/generations", POST),
    ("/v1/images/edits", POST),
    ("/v1/images/variations", POST),
    ("/v1/audio/speech", POST),
    ("/v1/audio/transcriptions", POST),
    ("/v1/audio/translations", POST),
    ("/v1/files", GET_POST),
    ("/v1/files/*", GET_DELETE),
    ("/v1/files/*/content", GET),
    ("/v1/uploads", POST),
    ("/v1/uploads/*/parts", POST),
    ("/v1/uploads/*/complete", POST),
    ("/v1/uploads/*/cancel", POST),
    ("/v1/batches", GET_POST),
    ("/v1/batches/*", GET),
    ("/v1/batches/*/cancel", POST),
    ("/v1/fine_tuning/jobs", GET_POST),
    ("/v1/fine_tuning/jobs/*", GET),
    ("/v1/fine_tuning/jobs/*/cancel", POST),
    ("/v1/fine_tuning/jobs/*/events", GET),
    ("/v1/fine_tuning/jobs/*/checkpoints", GET),
    ("/v1/vector_stores", GET_POST),
    ("/v1/vector_stores/*", GET_POST_DELETE),
    ("/v1/vector_stores/*/search", POST),
    ("/v1/vector_stores/*/files", GET_POST),
    ("/v1/vector_stores/*/files/*", GET_POST_DELETE),
    ("/v1/vector_stores/*/files/*/content", GET),
    ("/v1/vector_stores/*/file_batches", POST),
    ("/v1/vector_stores/*/file_batches/*", GET),
    ("/v1/vector_stores/*/file_batches/*/cancel", POST),
    ("/v1/vector_stores/*/file_batches/*/files", GET),
    ("/v1/conversations", POST),
    ("/v1/conversations/*", GET_POST_DELETE),
    ("/v1/conversations/*/items", GET_POST),
    ("/v1/conversations/*/items/*", GET_DELETE),
];

/// Endpoints whose answers report the tokens they used (`usage`), with POST.
const REPORTING_USAGE: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/images/edits",
];

/// Whether an answer to `method path` reports token usage the proxy should count. Other
/// answers (a file's content, a list) may contain the bytes `"usage"` and count nothing.
pub(crate) fn reports_usage(method: &Method, path: &str) -> bool {
    method == Method::POST && REPORTING_USAGE.contains(&path)
}

/// Checks that `method path` is an endpoint of the API surface.
pub(crate) fn check(method: &Method, path: &str) -> Result<(), PathError> {
    let mut found = false;
    for (pattern, methods) in ENDPOINTS {
        if matches(pattern, path) {
            if methods.contains(method) {
                return Ok(());
            }
            found = true;
        }
    }
    Err(if found { PathError::MethodNotAllowed } else { PathError::NotFound })
}

fn matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some("*"), Some(segment)) if is_identifier(segment) => {}
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

/// Identifiers (`gpt-4o`, `ft:gpt-4o:org::abc`, `file-abc123`): no `.`/`..`, no
/// encoding, nothing that could mean a different path upstream.
fn is_identifier(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment.len() <= 256
        && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_report_usage_are_counted() {
        assert!(reports_usage(&Method::POST, "/v1/chat/completions"));
        assert!(reports_usage(&Method::POST, "/v1/responses"));
        assert!(!reports_usage(&Method::GET, "/v1/chat/completions"), "a listing of stored completions");
        assert!(!reports_usage(&Method::GET, "/v1/files/file-abc/content"));
        assert!(!reports_usage(&Method::POST, "/v1/files"));
    }

    #[test]
    fn the_api_surface_is_forwarded() {
        assert_eq!(check(&Method::POST, "/v1/chat/completions"), Ok(()));
        assert_eq!(check(&Method::GET, "/v1/models"), Ok(()));
        assert_eq!(check(&Method::GET, "/v1/models/ft:gpt-4o-mini:acme::abc123"), Ok(()));
        assert_eq!(check(&Method::DELETE, "/v1/files/file-abc"), Ok(()));
        assert_eq!(check(&Method::GET, "/v1/files/file-abc/content"), Ok(()));
        // What the SDK's vector store and conversation resources call.
        assert_eq!(check(&Method::POST, "/v1/vector_stores/vs_abc/search"), Ok(()));
        assert_eq!(check(&Method::POST, "/v1/vector_stores/vs_abc/files"), Ok(()));
        assert_eq!(check(&Method::DELETE, "/v1/vector_stores/vs_abc/files/file-abc"), Ok(()));
        assert_eq!(check(&Method::GET, "/v1/vector_stores/vs_abc/files/file-abc/content"), Ok(()));
        assert_eq!(check(&Method::POST, "/v1/vector_stores/vs_abc/file_batches/vsfb_abc/cancel"), Ok(()));
        assert_eq!(check(&Method::GET, "/v1/vector_stores/vs_abc/file_batches/vsfb_abc/files"), Ok(()));
        assert_eq!(check(&Method::POST, "/v1/conversations"), Ok(()));
        assert_eq!(check(&Method::POST, "/v1/conversations/conv_abc/items"), Ok(()));
        assert_eq!(check(&Method::DELETE, "/v1/conversations/conv_abc/items/msg_abc"), Ok(()));
    }

    #[test]
    fn the_organization_admin_api_is_not_forwarded() {
        // A project key cannot use them, and a workload has no business trying.
        for path in ["/v1/organization/projects", "/v1/organization/users/user-abc", "/v1/organization/costs"] {
            assert_eq!(check(&Method::GET, path), Err(PathError::NotFound), "{path}");
        }
    }

    #[test]
    fn paths_match_exactly_not_by_prefix() {
        for path in [
            "/v1/chat/completions/",
            "/v1/chat/completionsX",
            "/v1/chat//completions",
            "/v1/../v1/models",
            "/v1/models/..",
            "/v1/models/.",
            "/v1/models/%2e%2e",
            "/v1/models/a/b",
            "/v2/models",
            "/",
            "",
            "/healthz",
        ] {
            assert_eq!(check(&Method::GET, path), Err(PathError::NotFound), "{path}");
        }
    }

    #[test]
    fn methods_outside_the_allowlist_are_refused() {
        assert_eq!(check(&Method::GET, "/v1/embeddings"), Err(PathError::MethodNotAllowed));
        assert_eq!(check(&Method::PUT, "/v1/chat/completions"), Err(PathError::MethodNotAllowed));
        assert_eq!(check(&Method::DELETE, "/v1/models"), Err(PathError::MethodNotAllowed));
        assert_eq!(check(&Method::GET, "/v1/vector_stores/vs_abc/search"), Err(PathError::MethodNotAllowed));
        assert_eq!(check(&Method::GET, "/v1/conversations"), Err(PathError::MethodNotAllowed), "no listing");
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the path, the check never panics and refuses what is not under /v1/.
        #[test]
        fn any_path_is_checked_without_panicking(path in "(/[a-z0-9._:%-]{0,12}){0,6}/?", method in prop::sample::select(vec![Method::GET, Method::POST, Method::DELETE, Method::PUT])) {
            if check(&method, &path).is_ok() {
                prop_assert!(path.starts_with("/v1/"));
            }
        }

        /// An endpoint whose identifier is a plain segment is accepted; one whose
        /// identifier could mean another path to a server that normalises dot segments or
        /// decodes percent-escapes (`.`, `..`, `%2e`, empty, a `/`, a trailing `/`) is not.
        /// Every case exercises the decision, accepted or refused.
        #[test]
        fn endpoint_identifiers_are_accepted_exactly_when_plain(
            id in prop_oneof!["[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,12}", "[a-z0-9._%/-]{0,6}", Just(".".to_string()), Just("..".to_string()), Just("%2e%2e".to_string())],
            trailing_slash in any::<bool>(),
        ) {
            let plain = !id.is_empty() && id != "." && id != ".." && !id.contains('%') && !id.contains('/');
            let path = format!("/v1/files/{id}/content{}", if trailing_slash { "/" } else { "" });
            prop_assert_eq!(check(&Method::GET, &path).is_ok(), plain && !trailing_slash, "{}", path);
        }

        /// Real endpoints with any identifier are accepted.
        #[test]
        fn identifiers_are_accepted_under_their_endpoint(id in "[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,40}") {
            prop_assume!(id != "." && id != "..");
            prop_assert_eq!(check(&Method::GET, &format!("/v1/models/{id}")), Ok(()));
            prop_assert_eq!(check(&Method::GET, &format!("/v1/files/{id}/content")), Ok(()));
        }
    }
}
