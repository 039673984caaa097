//! The OAuth 2.0 exchanges aiopopd makes (RFC 6749): the authorization code grant with PKCE
//! (RFC 7636, S256) and the device grant (RFC 8628) at enrolment, and refresh_token in sessions.

use super::http::{self, Url};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;

/// The `"oauth2"` section of a per-user file. `Debug` hides the client secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub authorize_url: String,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub scope: String,
    /// A loopback URL the browser is sent back to; else the user pastes the redirected URL.
    pub redirect_uri: Option<String>,
    #[serde(default = "xoauth2")]
    pub mechanism: String,
    /// RFC 8628's endpoint, where the provider has one (Microsoft does).
    pub device_authorization_url: Option<String>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

fn xoauth2() -> String {
    "XOAUTH2".into()
}

impl Provider {
    /// Every URL valid (https, or http to loopback) and the mechanism known.
    pub fn check(&self) -> Result<(), String> {
        Url::parse(&self.authorize_url)?;
        Url::parse(&self.token_url)?;
        if let Some(u) = &self.device_authorization_url {
            Url::parse(u)?;
        }
        if let Some(r) = &self.redirect_uri {
            let u = Url::parse(r)?;
            if u.https || !crate::account::is_loopback(&u.host, u.port) {
                return Err(format!("redirect_uri {r}: must be an http:// loopback URL"));
            }
        }
        if !matches!(self.mechanism.as_str(), "XOAUTH2" | "OAUTHBEARER") {
            return Err(format!(
                "mechanism {}: XOAUTH2 or OAUTHBEARER",
                self.mechanism
            ));
        }
        Ok(())
    }
}

/// What a token endpoint grants.
#[derive(Deserialize)]
pub struct Granted {
    pub access_token: String,
    pub expires_in: Option<u64>,
    pub refresh_token: Option<String>,
}

#[derive(Debug)]
pub enum Error {
    /// `invalid_grant` (revoked, expired, password changed at the provider): only a new
    /// enrolment helps.
    Grant(String),
    /// No answer (down, unreachable, timeout, TLS), or an answer that says "later" (a 5xx, a
    /// 429, `temporarily_unavailable`, `server_error`): try again later.
    Unreachable(String),
    /// Anything else the provider said (`invalid_client`, a 404, a malformed answer).
    Provider(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Grant(s) | Error::Unreachable(s) | Error::Provider(s) => f.write_str(s),
        }
    }
}

/// The two halves of PKCE: the verifier kept, the S256 challenge sent.
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> std::io::Result<Pkce> {
        let verifier = random_token(32)?;
        Ok(Pkce {
            challenge: challenge(&verifier),
            verifier,
        })
    }
}

fn challenge(verifier: &str) -> String {
    B64URL.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// `n` random bytes, base64url: a PKCE verifier, a `state`.
pub fn random_token(n: usize) -> std::io::Result<String> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| std::io::Error::other("no system random source"))?;
    Ok(B64URL.encode(b))
}

/// The URL the user opens to grant access.
pub fn authorize_url(p: &Provider, redirect_uri: &str, state: &str, pkce: &Pkce) -> String {
    let sep = if p.authorize_url.contains('?') {
        '&'
    } else {
        '?'
    };
    format!(
        "{}{sep}{}",
        p.authorize_url,
        http::encode_form(&[
            ("response_type", "code"),
            ("client_id", &p.client_id),
            ("redirect_uri", redirect_uri),
            ("scope", &p.scope),
            ("state", state),
            ("code_challenge", &pkce.challenge),
            ("code_challenge_method", "S256"),
        ])
    )
}

/// The code from the URL the provider redirected to (`...?code=..&state=..`), checked against
/// `state`; the provider's `error` if it refused.
pub fn code_from_redirect(url: &str, state: &str) -> Result<String, String> {
    let query = url.split_once('?').map_or(url, |(_, q)| q);
    let query = query.split('#').next().unwrap_or_default();
    let mut code = None;
    let mut got_state = None;
    let mut error = None;
    let mut description = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = http::unpercent(v).ok_or("malformed redirect URL")?;
        match k {
            "code" => code = Some(v),
            "state" => got_state = Some(v),
            "error" => error = Some(v),
            "error_description" => description = Some(v),
            _ => {}
        }
    }
    if let Some(e) = error {
        return Err(match description {
            Some(d) => format!("the provider refused: {e}: {d}"),
            None => format!("the provider refused: {e}"),
        });
    }
    if got_state.as_deref() != Some(state) {
        return Err(
            "the redirect's state doesn't match this enrolment's (an old or forged URL)".into(),
        );
    }
    code.ok_or_else(|| "no code in the redirect URL".into())
}

/// Exchanges an authorization code (with the PKCE verifier) for tokens.
pub fn exchange_code(
    p: &Provider,
    code: &str,
    redirect_uri: &str,
    verifier: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Granted, Error> {
    token_request(
        p,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ],
        ca,
        timeout,
    )
}

/// A new access token (and perhaps a new refresh token) for a refresh token.
pub fn refresh(
    p: &Provider,
    refresh_token: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Granted, Error> {
    token_request(
        p,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("scope", &p.scope),
        ],
        ca,
        timeout,
    )
}

/// RFC 8628's first answer.
#[derive(Debug, Deserialize)]
pub struct Device {
    pub device_code: String,
    pub user_code: String,
    #[serde(alias = "verification_url")]
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    pub interval: Option<u64>,
}

pub fn device_start(p: &Provider, ca: Option<&Path>, timeout: Duration) -> Result<Device, Error> {
    let url = p
        .device_authorization_url
        .as_deref()
        .ok_or_else(|| Error::Provider("no device_authorization_url".into()))?;
    let mut form = vec![
        ("client_id", p.client_id.as_str()),
        ("scope", p.scope.as_str()),
    ];
    // A confidential client authenticates here too (RFC 8628 3.1).
    if let Some(secret) = &p.client_secret {
        form.push(("client_secret", secret));
    }
    let r = post(url, &form, ca, timeout)?;
    if r.status != 200 {
        return Err(refusal(&r));
    }
    serde_json::from_slice(&r.body)
        .map_err(|e| Error::Provider(format!("device authorization answer: {e}")))
}

/// What one poll of the token endpoint for a device code says.
pub enum Poll {
    Granted(Granted),
    /// The user hasn't approved yet.
    Pending,
    /// Poll less often (5 s more between polls).
    SlowDown,
}

/// One poll of the token endpoint for a device code.
pub fn device_poll(
    p: &Provider,
    device_code: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Poll, Error> {
    match token_request(
        p,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
        ],
        ca,
        timeout,
    ) {
        Err(Error::Provider(e)) if e.starts_with("authorization_pending") => Ok(Poll::Pending),
        // RFC 8628 3.5: poll 5 s less often from now on.
        Err(Error::Provider(e)) if e.starts_with("slow_down") => Ok(Poll::SlowDown),
        other => other.map(Poll::Granted),
    }
}

fn token_request(
    p: &Provider,
    fields: &[(&str, &str)],
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Granted, Error> {
    let mut form: Vec<(&str, &str)> = fields.to_vec();
    form.push(("client_id", &p.client_id));
    if let Some(secret) = &p.client_secret {
        form.push(("client_secret", secret));
    }
    let r = post(&p.token_url, &form, ca, timeout)?;
    if r.status != 200 {
        return Err(refusal(&r));
    }
    let g: Granted = serde_json::from_slice(&r.body)
        .map_err(|e| Error::Provider(format!("token endpoint's answer: {e}")))?;
    if g.access_token.is_empty() {
        return Err(Error::Provider(
            "token endpoint gave an empty access token".into(),
        ));
    }
    Ok(g)
}

fn post(
    url: &str,
    form: &[(&str, &str)],
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<http::Response, Error> {
    let url = Url::parse(url).map_err(Error::Provider)?;
    http::post_form(&url, form, ca, timeout).map_err(Error::Unreachable)
}

/// An error answer (RFC 6749 5.2). The status decides first: a 5xx or a 429 is the provider
/// unwell or busy (temporary), whatever its body says; so are RFC 6749 4.1.2.1's
/// `temporarily_unavailable` and `server_error` with any status. Then `invalid_grant` is the
/// grant's end, and the rest is named. The description is the provider's text, for the log;
/// it holds no token.
fn refusal(r: &http::Response) -> Error {
    #[derive(Deserialize)]
    struct E {
        error: String,
        error_description: Option<String>,
    }
    let parsed: Option<E> = serde_json::from_slice(&r.body).ok();
    let Some(e) = parsed else {
        let text = format!("HTTP {}", r.status);
        return if r.status >= 500 || r.status == 429 {
            Error::Unreachable(text)
        } else {
            Error::Provider(text)
        };
    };
    let text = match &e.error_description {
        Some(d) => format!("{} ({})", e.error, d.chars().take(200).collect::<String>()),
        None => e.error.clone(),
    };
    if r.status >= 500
        || r.status == 429
        || matches!(e.error.as_str(), "temporarily_unavailable" | "server_error")
    {
        Error::Unreachable(format!("HTTP {}: {text}", r.status))
    } else if e.error == "invalid_grant" {
        Error::Grant(text)
    } else {
        Error::Provider(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_as_in_rfc_7636_appendix_b() {
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::new().unwrap();
        assert_eq!(p.verifier.len(), 43);
        assert_ne!(p.verifier, Pkce::new().unwrap().verifier);
    }

    fn provider() -> Provider {
        serde_json::from_str(
            r#"{"authorize_url": "https://login.example.com/authorize?tenant=x",
                "token_url": "https://login.example.com/token", "client_id": "c i d",
                "scope": "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
                "redirect_uri": "http://127.0.0.1:8765/"}"#,
        )
        .unwrap()
    }

    #[test]
    fn provider_sections_are_checked() {
        let p = provider();
        assert_eq!(p.mechanism, "XOAUTH2");
        p.check().unwrap();
        let mut bad = provider();
        bad.token_url = "http://login.example.com/token".into();
        assert!(bad.check().is_err());
        let mut bad = provider();
        bad.redirect_uri = Some("https://example.com/cb".into());
        assert!(bad.check().is_err());
        let mut bad = provider();
        bad.mechanism = "PLAIN".into();
        assert!(bad.check().is_err());
        assert!(serde_json::from_str::<Provider>(r#"{"token_urll": ""}"#).is_err());
    }

    #[test]
    fn the_authorize_url_and_the_redirect() {
        let p = provider();
        let pkce = Pkce::new().unwrap();
        let u = authorize_url(&p, "http://127.0.0.1:8765/", "st8", &pkce);
        assert!(u.starts_with("https://login.example.com/authorize?tenant=x&response_type=code&client_id=c%20i%20d&redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2F&scope=https%3A%2F%2Foutlook.office.com%2FIMAP.AccessAsUser.All%20offline_access&state=st8&code_challenge="), "{u}");
        assert!(u.ends_with("&code_challenge_method=S256"));
        assert_eq!(
            code_from_redirect("http://127.0.0.1:8765/?code=a%2Fb&state=st8", "st8").unwrap(),
            "a/b"
        );
        assert!(code_from_redirect("http://x/?code=a&state=other", "st8").is_err());
        assert_eq!(
            code_from_redirect("http://x/?error=access_denied&state=st8", "st8").unwrap_err(),
            "the provider refused: access_denied"
        );
    }

    /// The description reads after the bare code, and is kept whichever comes first.
    #[test]
    fn a_refusal_in_the_redirect_reads_plainly_in_any_order() {
        let want = "the provider refused: access_denied: the user said no";
        for url in [
            "http://x/?error=access_denied&error_description=the%20user%20said%20no&state=st8",
            "http://x/?error_description=the%20user%20said%20no&state=st8&error=access_denied",
        ] {
            assert_eq!(code_from_redirect(url, "st8").unwrap_err(), want, "{url}");
        }
        // A description without an error is no refusal.
        assert_eq!(
            code_from_redirect("http://x/?error_description=x&code=c&state=st8", "st8").unwrap(),
            "c"
        );
    }

    #[test]
    fn error_answers_are_classified() {
        let r = |status, body: &str| http::Response {
            status,
            body: body.as_bytes().to_vec(),
        };
        assert!(matches!(
            refusal(&r(400, r#"{"error":"invalid_grant","error_description":"AADSTS70008"}"#)),
            Error::Grant(s) if s.contains("AADSTS70008")
        ));
        assert!(matches!(
            refusal(&r(401, r#"{"error":"invalid_client"}"#)),
            Error::Provider(_)
        ));
        assert!(matches!(refusal(&r(503, "<html>")), Error::Unreachable(_)));
        assert!(matches!(refusal(&r(429, "")), Error::Unreachable(_)));
        assert!(matches!(refusal(&r(404, "<html>")), Error::Provider(_)));
    }

    /// A 5xx or 429 is temporary even with a JSON error, and so are the two RFC 6749 codes
    /// that mean "later" with any status: [SYS/TEMP], not [SYS/PERM].
    #[test]
    fn the_status_and_the_later_codes_make_an_answer_temporary() {
        let r = |status, body: &str| http::Response {
            status,
            body: body.as_bytes().to_vec(),
        };
        for (status, body) in [
            (503, r#"{"error":"temporarily_unavailable"}"#),
            (
                500,
                r#"{"error":"server_error","error_description":"try later"}"#,
            ),
            (502, r#"{"error":"invalid_request"}"#),
            (429, r#"{"error":"invalid_request"}"#),
            (500, r#"{"error":"invalid_grant"}"#),
            (400, r#"{"error":"temporarily_unavailable"}"#),
            (400, r#"{"error":"server_error"}"#),
        ] {
            let e = refusal(&r(status, body));
            assert!(
                matches!(&e, Error::Unreachable(s) if s.starts_with(&format!("HTTP {status}: "))),
                "{status} {body}: {e:?}"
            );
        }
        assert!(matches!(
            refusal(&r(500, r#"{"error":"server_error","error_description":"try later"}"#)),
            Error::Unreachable(s) if s == "HTTP 500: server_error (try later)"
        ));
        assert!(matches!(
            refusal(&r(400, r#"{"error":"invalid_grant"}"#)),
            Error::Grant(_)
        ));
    }
}
