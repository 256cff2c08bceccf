//! The proxy's refusals, in OpenAI's error shape so SDKs show them:
//! `{"error":{"message","type","code"}}`. Messages say what to do next and never
//! contain a token or a key.

use bytes::Bytes;
use hyper::{Response, StatusCode, header};

use super::Body;
use crate::api::TokenWindowKind;
use crate::index::Denial;
use crate::proxy::paths::PathError;
use crate::windows::Meter;

/// Why the proxy answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    /// No `Authorization: Bearer`, or a token of the wrong shape or checksum.
    #[error("missing or malformed token")]
    InvalidToken,
    /// Well-formed, but no such token.
    #[error("unknown token")]
    TokenNotFound,
    /// Revoked directly or by a bulk revocation.
    #[error("token revoked")]
    TokenRevoked,
    /// Past its expiry.
    #[error("token expired")]
    TokenExpired,
    /// `maxRequests` used up.
    #[error("token request cap reached")]
    TokenExhausted,
    /// `limits.requestsPerMinute` reached for this minute.
    #[error("rate limit reached")]
    RateLimited,
    /// `limits.tokensPerMinute` reached for this minute.
    #[error("token rate limit reached")]
    TokensRateLimited,
    /// A budget of LLM tokens (`tokensPerDay`, `tokensPerMonth`, `lifetimeTokens`) is spent.
    #[error("token budget spent")]
    TokenBudgetSpent,
    /// A budget in US dollars (`costPerMonth`) is spent.
    #[error("cost budget spent")]
    CostBudgetSpent,
    /// A cost budget applies and the Project's PriceList has no price for the model.
    #[error("model not priced")]
    ModelNotPriced,
    /// The Project the token was minted for no longer exists.
    #[error("project deleted")]
    ProjectDeleted,
    /// The project no longer grants the token's namespace.
    #[error("namespace not allowed")]
    NamespaceNotAllowed,
    /// The project is inactive or being deleted.
    #[error("project inactive")]
    ProjectInactive,
    /// The project's key is missing or malformed.
    #[error("project key invalid")]
    ProjectKeyInvalid,
    /// Not on the API surface.
    #[error("endpoint not found")]
    EndpointNotFound,
    /// On the surface, not with that method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The routing table has not finished its first sync.
    #[error("proxy not ready")]
    NotReady,
    /// The request body is over the configured limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// More request headers, or more header bytes, than the proxy accepts.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// A capped token's budget could not be claimed (API server unreachable).
    #[error("quota unavailable")]
    QuotaUnavailable,
    /// The upstream could not be reached or broke the connection.
    #[error("upstream error")]
    UpstreamError,
    /// The upstream did not answer in time.
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// The request names a model its token or Project does not allow.
    #[error("model not allowed")]
    ModelNotAllowed,
    /// A model allowlist applies and the proxy cannot find the request's model.
    #[error("model required")]
    ModelRequired,
    /// The request body names its model more than once.
    #[error("model named twice")]
    ModelAmbiguous,
}

impl ProxyError {
    /// HTTP status.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::InvalidToken
            | Self::TokenNotFound
            | Self::TokenRevoked
            | Self::TokenExpired
            | Self::ProjectDeleted => StatusCode::UNAUTHORIZED,
            Self::TokenExhausted
            | Self::RateLimited
            | Self::TokensRateLimited
            | Self::TokenBudgetSpent
            | Self::CostBudgetSpent => StatusCode::TOO_MANY_REQUESTS,
            Self::ProjectInactive | Self::NamespaceNotAllowed | Self::ModelNotAllowed | Self::ModelNotPriced => {
                StatusCode::FORBIDDEN
            }
            Self::ModelRequired | Self::ModelAmbiguous => StatusCode::BAD_REQUEST,
            Self::ProjectKeyInvalid | Self::NotReady | Self::QuotaUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::EndpointNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error.code` field; also the metric label.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::InvalidToken => "invalid_token",
            Self::TokenNotFound => "token_not_found",
            Self::TokenRevoked => "token_revoked",
            Self::TokenExpired => "token_expired",
            Self::TokenExhausted => "token_exhausted",
            Self::RateLimited | Self::TokensRateLimited => "rate_limit_exceeded",
            Self::TokenBudgetSpent => "token_budget_exceeded",
            Self::CostBudgetSpent => "cost_budget_exceeded",
            Self::ModelNotPriced => "model_not_priced",
            Self::ProjectDeleted => "project_deleted",
            Self::ProjectInactive => "project_inactive",
            Self::NamespaceNotAllowed => "namespace_not_allowed",
            Self::ProjectKeyInvalid => "project_key_invalid",
            Self::EndpointNotFound => "endpoint_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotReady => "proxy_not_ready",
            Self::QuotaUnavailable => "quota_unavailable",
            Self::PayloadTooLarge => "payload_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::ModelNotAllowed => "model_not_allowed",
            Self::ModelRequired => "model_required",
            Self::ModelAmbiguous => "model_ambiguous",
        }
    }

    /// The `error.type` field, using OpenAI's categories.
    fn kind(self) -> &'static str {
        match self {
            Self::InvalidToken
            | Self::TokenNotFound
            | Self::TokenRevoked
            | Self::TokenExpired
            | Self::ProjectDeleted => "authentication_error",
            Self::ProjectInactive | Self::NamespaceNotAllowed | Self::ModelNotAllowed | Self::ModelNotPriced => {
                "permission_error"
            }
            Self::ModelRequired | Self::ModelAmbiguous => "invalid_request_error",
            // OpenAI's type for a spent budget, which waiting (a while) does not restore.
            Self::TokenExhausted | Self::TokenBudgetSpent | Self::CostBudgetSpent => "insufficient_quota",
            // OpenAI's types for rate limits, which the SDKs wait out and retry.
            Self::RateLimited => "requests",
            Self::TokensRateLimited => "tokens",
            Self::EndpointNotFound | Self::MethodNotAllowed | Self::PayloadTooLarge | Self::HeadersTooLarge => {
                "invalid_request_error"
            }
            Self::ProjectKeyInvalid
            | Self::NotReady
            | Self::QuotaUnavailable
            | Self::UpstreamError
            | Self::UpstreamTimeout => "server_error",
        }
    }

    /// What the caller reads.
    fn message(self) -> &'static str {
        match self {
            Self::InvalidToken => {
                "Missing or malformed proxy token: send 'Authorization: Bearer <token>' with the token from your ProxyToken's Secret (key OPENAI_API_KEY)."
            }
            Self::TokenNotFound => {
                "This proxy token is not known: check that its ProxyToken exists and is Active (kubectl get proxytokens)."
            }
            Self::TokenRevoked => "This proxy token has been revoked: create a new ProxyToken.",
            Self::TokenExpired => "This proxy token has expired: create a new ProxyToken.",
            Self::TokenExhausted => {
                "This proxy token has used all requests allowed by its maxRequests: create a new ProxyToken (a cap can be lowered, never raised)."
            }
            Self::ProjectDeleted => {
                "The Project this proxy token was issued for has been deleted (a Project created again under the same name is a new Project and does not accept old tokens): this token can never be used again. Create a new ProxyToken for an existing Project."
            }
            Self::ProjectInactive => {
                "The project of this token is deactivated: ask a cluster admin to reactivate it (kubectl llmproxy activate <project>, or spec.active: true). The token itself is kept and works again then."
            }
            Self::NamespaceNotAllowed => {
                "The project of this token no longer allows tokens from this namespace: ask a cluster admin to grant the namespace again in the Project's spec.allowedNamespaces. The token itself is kept and works again then."
            }
            Self::ProjectKeyInvalid => {
                "The project's upstream API key is missing or malformed: a cluster admin must fix the Secret named in the Project's spec.apiKeySecretRef."
            }
            Self::EndpointNotFound => {
                "This path is not part of the OpenAI API surface the proxy serves: use the base URL from OPENAI_BASE_URL (ending in /v1) and an OpenAI endpoint such as /v1/chat/completions."
            }
            Self::MethodNotAllowed => {
                "This method is not allowed on this endpoint: use the method the OpenAI API documents for it (for example POST for /v1/chat/completions)."
            }
            Self::NotReady => "The proxy has not finished loading projects and tokens yet: retry in a few seconds.",
            Self::PayloadTooLarge => {
                "The request body is larger than the proxy allows (LLMPROXY_MAX_REQUEST_BODY_BYTES, 32 MiB unless a cluster admin changed it): send a smaller body."
            }
            Self::HeadersTooLarge => {
                "The request has more headers, or more header bytes, than the proxy accepts (100 headers, 32 KiB): send fewer or shorter headers."
            }
            Self::QuotaUnavailable => {
                "This token has a request cap and the proxy cannot reach the Kubernetes API to claim budget: retry in a few seconds."
            }
            Self::UpstreamError => "The upstream API could not be reached: retry later.",
            Self::UpstreamTimeout => "The upstream API did not answer in time: retry later.",
            Self::ModelNotAllowed => "This model is not allowed for this token (spec.limits.models).",
            Self::RateLimited => {
                "This token's requests per minute (spec.limits.requestsPerMinute) are used up: retry in the next minute."
            }
            Self::TokensRateLimited => {
                "This token's LLM tokens per minute (spec.limits.tokensPerMinute) are used up: retry in the next minute."
            }
            Self::TokenBudgetSpent => {
                "This token's budget of LLM tokens (spec.limits) is spent: wait for the window to reset, or ask for a larger budget."
            }
            Self::CostBudgetSpent => {
                "This token's budget in US dollars (spec.limits.costPerMonth) is spent: wait for the next month, or ask for a larger budget."
            }
            Self::ModelNotPriced => {
                "This token's spending is limited (spec.limits.costPerMonth) and the Project's PriceList has no price for this model: ask a cluster admin to price it."
            }
            Self::ModelRequired => {
                "This token may use only some models (spec.limits.models), so the request must name its model where the proxy reads it."
            }
            Self::ModelAmbiguous => "The request body names its model more than once: send one model field.",
        }
    }

    /// The JSON response.
    pub(crate) fn into_response(self) -> Response<Body> {
        self.into_response_saying(self.message())
    }

    /// The JSON response, with `message` in place of the usual one.
    pub(crate) fn into_response_saying(self, message: &str) -> Response<Body> {
        let param =
            matches!(self, Self::ModelNotAllowed | Self::ModelRequired | Self::ModelAmbiguous | Self::ModelNotPriced)
                .then_some("model");
        let body = serde_json::json!({
            "error": { "message": message, "type": self.kind(), "code": self.code(), "param": param }
        });
        let mut response = Response::new(super::full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        // The official SDKs retry every 429 unless told not to: a spent cap is final.
        if matches!(self, Self::TokenExhausted | Self::TokenBudgetSpent | Self::CostBudgetSpent) {
            headers.insert("x-should-retry", header::HeaderValue::from_static("false"));
        }
        response
    }
}

impl From<Denial> for ProxyError {
    fn from(denial: Denial) -> Self {
        match denial {
            Denial::TokenNotFound => Self::TokenNotFound,
            Denial::TokenRevoked => Self::TokenRevoked,
            Denial::TokenExpired => Self::TokenExpired,
            Denial::TokenExhausted => Self::TokenExhausted,
            Denial::ProjectDeleted => Self::ProjectDeleted,
            Denial::ProjectInactive => Self::ProjectInactive,
            Denial::NamespaceNotAllowed => Self::NamespaceNotAllowed,
            Denial::ProjectKeyInvalid => Self::ProjectKeyInvalid,
        }
    }
}

impl From<PathError> for ProxyError {
    fn from(e: PathError) -> Self {
        match e {
            PathError::NotFound => Self::EndpointNotFound,
            PathError::MethodNotAllowed => Self::MethodNotAllowed,
        }
    }
}

/// Seconds to wait while a token window is held by requests in flight: about one
/// usage flush.
const HELD_RETRY_SECONDS: u64 = 2;

/// Whose limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whose {
    /// The ProxyToken's own `spec.limits`.
    Token,
    /// Its Project's, shared by all the Project's tokens.
    Project,
}

/// A refusal, with a message made for this request where the usual one says too little
/// (which model, which list, when to retry) and the headers that go with it.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) error: ProxyError,
    detail: Option<String>,
    headers: Vec<(&'static str, String)>,
}

impl Refused {
    /// `error`, answered with `message`.
    pub(crate) fn saying(error: ProxyError, message: String) -> Self {
        Self { error, detail: Some(message), headers: Vec::new() }
    }

    /// A full request-rate window of `limit` requests a minute (`whose`), `retry_in`
    /// seconds before it ends, with OpenAI's rate-limit headers and `Retry-After`.
    pub(crate) fn rate_limited(whose: Whose, limit: u64, retry_in: u64) -> Self {
        let who = match whose {
            Whose::Token => format!("this token may send {limit} requests per minute (spec.limits.requestsPerMinute)"),
            Whose::Project => format!(
                "the Project of this token may receive {limit} requests per minute from all its tokens together (the Project's spec.limits.requestsPerMinute)"
            ),
        };
        let message =
            format!("Rate limit reached: {who}, over every proxy replica. The next minute starts in {retry_in} s.");
        let headers = vec![
            ("retry-after", retry_in.to_string()),
            ("x-ratelimit-limit-requests", limit.to_string()),
            ("x-ratelimit-remaining-requests", "0".to_string()),
            ("x-ratelimit-reset-requests", format!("{retry_in}s")),
        ];
        Self { error: ProxyError::RateLimited, detail: Some(message), headers }
    }

    /// A spent window of a budget: `whose` `meter` window starting at `start_us` holds
    /// no more of its `limit` at `now_us`. A minute is a rate limit the SDKs wait out; a
    /// day, a month or the lifetime is a spent budget they do not retry.
    pub(crate) fn budget_spent(whose: Whose, meter: Meter, limit: u64, start_us: i64, now_us: i64) -> Self {
        let kind = meter.kind();
        let (who, field) = match whose {
            Whose::Token => ("this token may use", format!("spec.limits.{}", meter.field())),
            Whose::Project => (
                "the Project of this token may use, for all its tokens together,",
                format!("the Project's spec.limits.{}", meter.field()),
            ),
        };
        let amount = amount(meter, limit);
        let per = crate::windows::per(kind);
        let end_us = crate::windows::end(kind, start_us);
        let retry_in = end_us.map(|end| ((end - now_us).max(0) as u64).div_ceil(1_000_000));
        let mut headers = Vec::new();
        if !meter.is_cost() {
            headers.push(("x-ratelimit-limit-tokens", limit.to_string()));
            headers.push(("x-ratelimit-remaining-tokens", "0".to_string()));
        }
        if let Some(retry_in) = retry_in {
            headers.push(("retry-after", retry_in.to_string()));
            if !meter.is_cost() {
                headers.push(("x-ratelimit-reset-tokens", format!("{retry_in}s")));
            }
        }
        let spent = if meter.is_cost() { ProxyError::CostBudgetSpent } else { ProxyError::TokenBudgetSpent };
        let (error, message) = match (kind, end_us) {
            (TokenWindowKind::Minute, _) => (
                ProxyError::TokensRateLimited,
                format!(
                    "Rate limit reached: {who} {amount} per minute ({field}), over every proxy replica. The next minute starts in {} s.",
                    retry_in.unwrap_or(60)
                ),
            ),
            (_, Some(end_us)) => {
                let resets = jiff::Timestamp::from_microsecond(end_us).map(|t| t.to_string()).unwrap_or_default();
                (
                    spent,
                    format!(
                        "Budget spent: {who} {amount} {per} ({field}), over every proxy replica, and it is used up. It resets at {resets}; for more now, ask for a larger limit."
                    ),
                )
            }
            (_, None) => (
                spent,
                format!(
                    "Budget spent: {who} {amount} {per} ({field}), and it is used up: ask for a larger limit{}.",
                    if whose == Whose::Token { ", or create a new ProxyToken" } else { "" }
                ),
            ),
        };
        Self { error, detail: Some(message), headers }
    }

    /// A budget window whose rest is reserved by requests in flight: retryable, since
    /// their answers may leave some of it.
    pub(crate) fn budget_held(whose: Whose, meter: Meter, limit: u64) -> Self {
        let (who, field) = match whose {
            Whose::Token => ("this token's", format!("spec.limits.{}", meter.field())),
            Whose::Project => {
                ("the Project's (all its tokens together)", format!("the Project's spec.limits.{}", meter.field()))
            }
        };
        let message = format!(
            "Rate limit reached: the rest of {who} {} {} ({field}) is reserved by requests in flight. Retry in a few seconds: their usage decides whether any is left.",
            amount(meter, limit),
            crate::windows::per(meter.kind())
        );
        let mut headers = vec![("retry-after", HELD_RETRY_SECONDS.to_string())];
        if !meter.is_cost() {
            headers.push(("x-ratelimit-limit-tokens", limit.to_string()));
            headers.push(("x-ratelimit-remaining-tokens", "0".to_string()));
            headers.push(("x-ratelimit-reset-tokens", format!("{HELD_RETRY_SECONDS}s")));
        }
        Self { error: ProxyError::TokensRateLimited, detail: Some(message), headers }
    }

    /// A cost budget applies and `model` has no price in the PriceList `price_list`
    /// (`listed`: whether that list exists).
    pub(crate) fn not_priced(model: &str, price_list: &str, listed: bool) -> Self {
        let missing = match listed {
            true => format!("has no price in the PriceList {price_list:?}"),
            false => format!("cannot be priced: the PriceList {price_list:?} the Project prices from does not exist"),
        };
        let message = format!(
            "The model {model:?} {missing}, and this token is under a budget in US dollars (spec.limits.costPerMonth of the token or its Project), so the proxy cannot charge it. Use a priced model, or ask a cluster admin to price this one."
        );
        Self { error: ProxyError::ModelNotPriced, detail: Some(message), headers: Vec::new() }
    }

    /// The JSON response.
    pub(crate) fn into_response(self) -> Response<Body> {
        let mut response = match &self.detail {
            Some(message) => self.error.into_response_saying(message),
            None => self.error.into_response(),
        };
        for (name, value) in self.headers {
            if let Ok(value) = header::HeaderValue::try_from(value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

impl From<ProxyError> for Refused {
    fn from(error: ProxyError) -> Self {
        Self { error, detail: None, headers: Vec::new() }
    }
}

/// `limit` as a message states it: "800 LLM tokens", "$50.00".
fn amount(meter: Meter, limit: u64) -> String {
    match meter {
        Meter::Tokens(_) => format!("{limit} LLM tokens"),
        Meter::Usd(_) => format!("${}", crate::pricing::format_usd(i64::try_from(limit).unwrap_or(i64::MAX))),
    }
}
