//! Who may use the dashboard: only the browser of the person who launched it.
//!
//! In: a request's method, Host, Origin, Sec-Fetch-Site, Cookie and (for a POST) the
//! form's `csrf` field. Out: admitted, a session to start, or a refusal with its reason.
//!
//! The dashboard acts with its user's kubeconfig, so anything that reaches it acts as
//! that person. Three secrets are made at launch: a one-time login code (in the address
//! printed on the terminal, exchanged for a cookie on first use), the session cookie
//! (`HttpOnly`, `SameSite=Strict`) and a form secret that every form carries. On top:
//! `Host` must name the loopback address and our port (a DNS-rebinding page sends its
//! own host name), and a POST must come from our own origin (`Origin`; 127.0.0.1 on
//! another port is the same *site* for cookies, but not the same *origin*).

use std::sync::Mutex;

use hyper::Method;
use hyper::header::{COOKIE, HOST, HeaderMap, HeaderValue, ORIGIN};

/// The launch's secrets and the origins it answers to.
pub(crate) struct Guard {
    port: u16,
    /// The one-time code of the printed address; `None` once used.
    login: Mutex<Option<String>>,
    session: String,
    csrf: String,
}

/// What a request may do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A request of the signed-in browser.
    Admitted,
    /// The printed address, opened for the first time: set this `Set-Cookie` and go on
    /// to the projects page.
    SignIn(HeaderValue),
    /// Refused, with the HTTP status and what the page says.
    Refused(u16, &'static str),
}

/// Why a request is refused: each says what to do, since the person who sees it is
/// usually the dashboard's own user, on an old tab or a second browser.
pub(crate) mod refusal {
    /// Host is not our loopback address and port.
    pub(crate) const HOST: &str = "This dashboard answers only to http://127.0.0.1 and http://localhost on its own port: the address of this page names another host.";
    /// A POST from another origin, or a form without ours.
    pub(crate) const CROSS_SITE: &str =
        "Refused: this change was sent from another site or an old page. Reload the dashboard page and try again.";
    /// No session cookie.
    pub(crate) const SIGNED_OUT: &str = "Not signed in: open the address that `kubectl llmproxy dashboard` printed when it started (each launch prints a new one).";
    /// The login code is wrong or was used before.
    pub(crate) const USED_CODE: &str = "This sign-in address was used already or is not this launch's. Restart `kubectl llmproxy dashboard` for a new one.";
}

impl Guard {
    /// A launch's guard for the dashboard listening on 127.0.0.1:`port`.
    pub(crate) fn new(port: u16) -> Self {
        Self { port, login: Mutex::new(Some(secret())), session: secret(), csrf: secret() }
    }

    /// The address to open: the one-time code signs the browser in.
    pub(crate) fn login_url(&self) -> String {
        let code = self.login.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        format!("http://127.0.0.1:{}/login?code={code}", self.port)
    }

    /// The secret every form carries in its `csrf` field.
    pub(crate) fn csrf(&self) -> &str {
        &self.csrf
    }

    fn cookie_name(&self) -> String {
        // Cookies ignore ports: two dashboards on one host keep separate sessions.
        format!("llmproxy-dashboard-{}", self.port)
    }

    /// Decides on a request before its body is read. `path` and `query` are the URI's.
    pub(crate) fn check(&self, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Verdict {
        if !self.is_own_host(headers.get(HOST)) {
            return Verdict::Refused(421, refusal::HOST);
        }
        let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if *method != Method::GET && *method != Method::HEAD {
            let same_origin = headers.get(ORIGIN).is_some_and(|origin| self.is_own_origin(origin));
            if !same_origin || fetch_site.is_some_and(|site| site != "same-origin") {
                return Verdict::Refused(403, refusal::CROSS_SITE);
            }
        }
        if path == "/login" {
            let code = query.into_iter().flat_map(|q| form_urlencoded::parse(q.as_bytes())).find(|(k, _)| k == "code");
            let mut login = self.login.lock().unwrap_or_else(|e| e.into_inner());
            let matches = matches!((&*login, &code), (Some(expected), Some((_, given))) if same(expected, given));
            if !matches {
                return Verdict::Refused(403, refusal::USED_CODE);
            }
            *login = None;
            let cookie = format!("{}={}; Path=/; HttpOnly; SameSite=Strict", self.cookie_name(), self.session);
            return match HeaderValue::from_str(&cookie) {
                Ok(value) => Verdict::SignIn(value),
                Err(_) => Verdict::Refused(500, refusal::SIGNED_OUT),
            };
        }
        if path == super::STYLESHEET {
            return Verdict::Admitted;
        }
        if !self.has_session(headers) {
            return Verdict::Refused(401, refusal::SIGNED_OUT);
        }
        Verdict::Admitted
    }

    /// Whether a POSTed form carries this launch's form secret.
    pub(crate) fn form_is_ours(&self, csrf: Option<&str>) -> bool {
        csrf.is_some_and(|given| same(&self.csrf, given))
    }

    fn is_own_host(&self, host: Option<&HeaderValue>) -> bool {
        let Some(host) = host.and_then(|h| h.to_str().ok()) else { return false };
        let port = self.port.to_string();
        ["127.0.0.1", "localhost"]
            .iter()
            .any(|name| host.strip_prefix(name).and_then(|r| r.strip_prefix(':')) == Some(&port))
    }

    fn is_own_origin(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else { return false };
        origin.strip_prefix("http://").is_some_and(|host| self.is_own_host(HeaderValue::from_str(host).ok().as_ref()))
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        let name = self.cookie_name();
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(key, value)| key == name && same(&self.session, value))
    }
}

/// 32 random bytes, hex.
fn secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time that does not depend on where they differ.
fn same(expected: &str, given: &str) -> bool {
    expected.len() == given.len() && expected.bytes().zip(given.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn signed_in(guard: &Guard) -> String {
        let url = guard.login_url();
        let (path, query) = url.trim_start_matches("http://127.0.0.1:4000").split_once('?').unwrap();
        let Verdict::SignIn(cookie) =
            guard.check(&Method::GET, path, Some(query), &headers(&[("host", "127.0.0.1:4000")]))
        else {
            panic!("the printed address signs in")
        };
        cookie.to_str().unwrap().split(';').next().unwrap().to_string()
    }

    #[test]
    fn the_printed_address_signs_in_once() {
        let guard = Guard::new(4000);
        let url = guard.login_url();
        let cookie = signed_in(&guard);
        assert!(cookie.starts_with("llmproxy-dashboard-4000="));
        let query = url.split_once('?').unwrap().1;
        let again = guard.check(&Method::GET, "/login", Some(query), &headers(&[("host", "127.0.0.1:4000")]));
        assert_eq!(again, Verdict::Refused(403, refusal::USED_CODE));
        let page = guard.check(&Method::GET, "/", None, &headers(&[("host", "localhost:4000"), ("cookie", &cookie)]));
        assert_eq!(page, Verdict::Admitted);
    }

    #[test]
    fn a_wrong_code_neither_signs_in_nor_uses_up_the_right_one() {
        let guard = Guard::new(4000);
        let wrong = guard.check(&Method::GET, "/login", Some("code=00"), &headers(&[("host", "127.0.0.1:4000")]));
        assert_eq!(wrong, Verdict::Refused(403, refusal::USED_CODE));
        signed_in(&guard);
    }

    #[test]
    fn pages_need_the_session_cookie_of_this_launch() {
        let guard = Guard::new(4000);
        let host = ("host", "127.0.0.1:4000");
        assert_eq!(guard.check(&Method::GET, "/", None, &headers(&[host])), Verdict::Refused(401, refusal::SIGNED_OUT));
        let forged = headers(&[host, ("cookie", "llmproxy-dashboard-4000=00")]);
        assert_eq!(guard.check(&Method::GET, "/", None, &forged), Verdict::Refused(401, refusal::SIGNED_OUT));
        let cookie = signed_in(&guard);
        let other_port = Guard::new(4001);
        let other = headers(&[("host", "127.0.0.1:4001"), ("cookie", &cookie)]);
        assert_eq!(other_port.check(&Method::GET, "/", None, &other), Verdict::Refused(401, refusal::SIGNED_OUT));
        let two = headers(&[host, ("cookie", "a=b"), ("cookie", &format!("x=y; {cookie}"))]);
        assert_eq!(guard.check(&Method::GET, "/", None, &two), Verdict::Admitted);
    }

    #[test]
    fn another_host_name_is_refused_even_with_the_cookie() {
        // DNS rebinding: evil.example resolves to 127.0.0.1, and the browser sends its name.
        let guard = Guard::new(4000);
        let cookie = signed_in(&guard);
        for host in
            ["evil.example:4000", "127.0.0.1:4001", "127.0.0.1", "localhost.evil.example:4000", "127.0.0.1:40000"]
        {
            let verdict = guard.check(&Method::GET, "/", None, &headers(&[("host", host), ("cookie", &cookie)]));
            assert_eq!(verdict, Verdict::Refused(421, refusal::HOST), "{host}");
        }
        assert_eq!(guard.check(&Method::GET, "/", None, &HeaderMap::new()), Verdict::Refused(421, refusal::HOST));
    }

    #[test]
    fn a_post_must_come_from_our_own_origin() {
        let guard = Guard::new(4000);
        let cookie = signed_in(&guard);
        let post = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("host", "127.0.0.1:4000"), ("cookie", cookie.as_str())];
            pairs.extend_from_slice(extra);
            guard.check(&Method::POST, "/projects/a/active", None, &headers(&pairs))
        };
        assert_eq!(post(&[("origin", "http://127.0.0.1:4000"), ("sec-fetch-site", "same-origin")]), Verdict::Admitted);
        assert_eq!(post(&[("origin", "http://localhost:4000")]), Verdict::Admitted);
        let refused = Verdict::Refused(403, refusal::CROSS_SITE);
        assert_eq!(post(&[]), refused, "no Origin");
        assert_eq!(post(&[("origin", "http://127.0.0.1:9999")]), refused, "another port is another origin");
        assert_eq!(post(&[("origin", "http://evil.example")]), refused);
        assert_eq!(post(&[("origin", "null")]), refused);
        assert_eq!(post(&[("origin", "https://127.0.0.1:4000")]), refused);
        assert_eq!(post(&[("origin", "http://127.0.0.1:4000"), ("sec-fetch-site", "same-site")]), refused);
    }

    #[test]
    fn forms_carry_the_launch_secret() {
        let guard = Guard::new(4000);
        assert!(guard.form_is_ours(Some(guard.csrf())));
        assert!(!guard.form_is_ours(None));
        assert!(!guard.form_is_ours(Some("")));
        assert!(!guard.form_is_ours(Some(Guard::new(4000).csrf())));
    }
}
