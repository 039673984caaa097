//! The OAuth test harness (tests/common/oauthserver.rs) against a private Dovecot 2.3 whose
//! `oauth2` passdb introspects every token there: the flows a client runs (authorization code
//! with PKCE, refresh with rotation and reuse detection, device flow) give tokens that open
//! IMAP with XOAUTH2 and OAUTHBEARER, and expiry, revocation and outages are seen by Dovecot at
//! once. These tests pin the harness and Dovecot's answers that aiopopd (issue 14) relies on;
//! they don't run aiopopd.

mod common;

use common::oauthserver::{
    browse, form_encode, fresh_source, http, imap_authenticate_from, imap_login, imap_oauthbearer,
    imap_xoauth2, parse_form, pkce_pair, try_http, xoauth2_initial, OAuthServer, Outage, CLIENT_ID,
    CLIENT_SECRET, PASSWORD_USER, TOKEN_USER,
};
use std::time::Duration;

/// What Dovecot's XOAUTH2 sends before failing on a token it refused.
const XOAUTH2_CHALLENGE: &str = r#"{"status":"401","schemes":"bearer","scope":"mail"}"#;
/// And OAUTHBEARER's.
const OAUTHBEARER_CHALLENGE: &str = r#"{"status":"invalid_token"}"#;
const SCOPE: &str = "mail offline_access";

fn assert_refused(auth: &common::oauthserver::ImapAuth, challenge: &str, what: &str) {
    assert!(
        auth.tagged.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{what}: {}",
        auth.tagged
    );
    assert_eq!(auth.challenge.as_deref(), Some(challenge), "{what}");
}

#[test]
fn authorization_code_flow_opens_imap_with_xoauth2() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    dovecot.deliver(TOKEN_USER, "INBOX", b"Subject: hi\r\n\r\nbody\r\n");

    let tokens = oauth.enrol(SCOPE);
    assert!(tokens.refresh_token.is_some());
    assert_eq!(tokens.expires_in, 3600);
    assert_eq!(tokens.scope, SCOPE);

    let mut auth = imap_xoauth2(dovecot.imap_port, TOKEN_USER, &tokens.access_token);
    assert!(auth.ok(), "{auth:?}\n{}", dovecot.log_contents());
    assert_eq!(auth.challenge, None);
    let select = auth.command("SELECT INBOX");
    assert!(
        select.iter().any(|l| l == "* 1 EXISTS"),
        "the token user's own mailbox: {select:?}"
    );
    assert!(select.last().unwrap().starts_with("b OK"), "{select:?}");

    let c = oauth.counters();
    assert_eq!(c.authorize, 1);
    assert_eq!(c.token_authorization_code, 1);
    assert_eq!(c.token_errors, 0);
    assert_eq!((c.introspect, c.introspect_active), (1, 1), "{c:?}");
}

#[test]
fn only_a_token_opens_alice_and_only_a_password_opens_bob() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    let tokens = oauth.issue(SCOPE);

    let bad = imap_xoauth2(dovecot.imap_port, TOKEN_USER, "at-no-such-token");
    assert_refused(&bad, XOAUTH2_CHALLENGE, "unknown token");

    // Her old password, and a password passed as a token, open nothing.
    let login = imap_login(dovecot.imap_port, TOKEN_USER, "alice-pw");
    assert!(login.starts_with("a NO [AUTHENTICATIONFAILED]"), "{login}");
    let pw_as_token = imap_xoauth2(dovecot.imap_port, TOKEN_USER, "alice-pw");
    assert_refused(&pw_as_token, XOAUTH2_CHALLENGE, "password as a token");

    // Alice's token is hers only.
    let as_bob = imap_xoauth2(dovecot.imap_port, PASSWORD_USER.0, &tokens.access_token);
    assert_refused(&as_bob, XOAUTH2_CHALLENGE, "alice's token for bob");
    let log = dovecot.log_contents();
    assert!(
        log.contains("Username 'bob' did not match 'alice'"),
        "Dovecot logs why: {log}"
    );

    let bob = imap_login(dovecot.imap_port, PASSWORD_USER.0, PASSWORD_USER.1);
    assert!(bob.starts_with("a OK"), "{bob}\n{log}");
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &tokens.access_token).ok());
}

#[test]
fn expired_token_fails_at_once_and_a_refreshed_one_works() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    oauth.set_access_lifetime(Duration::from_secs(60));
    let first = oauth.enrol(SCOPE);
    assert_eq!(first.expires_in, 60);
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &first.access_token).ok());

    oauth.expire_all();
    assert!(!oauth.is_active(&first.access_token));
    // No auth cache: the very next login introspects again and is refused.
    let expired = imap_xoauth2(dovecot.imap_port, TOKEN_USER, &first.access_token);
    assert_refused(&expired, XOAUTH2_CHALLENGE, "expired token");
    eprintln!(
        "expired token: {:?} after {:?} (auth_failure_delay = 0)",
        expired.tagged, expired.elapsed
    );
    assert!(expired.elapsed < Duration::from_secs(2), "{expired:?}");

    let refreshed = oauth
        .refresh(first.refresh_token.as_deref().unwrap())
        .expect("refresh");
    let rotated = refreshed
        .refresh_token
        .clone()
        .expect("rotation gives a new one");
    assert_ne!(Some(rotated.as_str()), first.refresh_token.as_deref());
    assert_ne!(refreshed.access_token, first.access_token);
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &refreshed.access_token).ok());
    // The new refresh token works in turn.
    let third = oauth
        .refresh(&rotated)
        .expect("refresh with the rotated token");
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &third.access_token).ok());

    let c = oauth.counters();
    assert_eq!(c.token_refresh_token, 2);
    assert_eq!((c.introspect, c.introspect_active), (4, 3), "{c:?}");
    assert_eq!(c.refresh_reuse, 0);
}

#[test]
fn refresh_token_reuse_revokes_the_grant() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    let first = oauth.enrol(SCOPE);
    let rt1 = first.refresh_token.clone().unwrap();
    let second = oauth.refresh(&rt1).expect("first refresh");
    let rt2 = second.refresh_token.clone().unwrap();
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &second.access_token).ok());

    // Someone replays the rotated token: the whole grant goes.
    assert_eq!(oauth.refresh(&rt1), Err("invalid_grant".to_string()));
    assert_eq!(oauth.counters().refresh_reuse, 1);
    assert_eq!(oauth.refresh(&rt2), Err("invalid_grant".to_string()));
    for token in [&first.access_token, &second.access_token] {
        let auth = imap_xoauth2(dovecot.imap_port, TOKEN_USER, token);
        assert_refused(&auth, XOAUTH2_CHALLENGE, "token of a revoked grant");
    }
    // Another grant is untouched.
    let other = oauth.enrol(SCOPE);
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &other.access_token).ok());
    assert_eq!(
        oauth.refresh("rt-unknown"),
        Err("invalid_grant".to_string())
    );
    let c = oauth.counters();
    assert_eq!((c.token_refresh_token, c.token_errors), (4, 3), "{c:?}");
}

#[test]
fn without_rotation_the_refresh_token_stays() {
    let oauth = OAuthServer::start();
    oauth.set_rotate(false);
    let first = oauth.issue(SCOPE);
    let rt = first.refresh_token.unwrap();
    for _ in 0..2 {
        let again = oauth.refresh(&rt).expect("refresh without rotation");
        assert_eq!(again.refresh_token, None, "no new refresh token");
        assert!(oauth.is_active(&again.access_token));
    }
    oauth.revoke_all();
    assert_eq!(oauth.refresh(&rt), Err("invalid_grant".to_string()));
    assert_eq!(oauth.counters().refresh_reuse, 0);
}

#[test]
fn oauthbearer_works_too() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    let tokens = oauth.enrol(SCOPE);
    let mut auth = imap_oauthbearer(dovecot.imap_port, TOKEN_USER, &tokens.access_token);
    assert!(auth.ok(), "{auth:?}\n{}", dovecot.log_contents());
    assert!(auth
        .command("SELECT INBOX")
        .last()
        .unwrap()
        .starts_with("b OK"));

    let bad = imap_oauthbearer(dovecot.imap_port, TOKEN_USER, "at-wrong");
    assert_refused(&bad, OAUTHBEARER_CHALLENGE, "OAUTHBEARER, unknown token");
    oauth.revoke_all();
    let revoked = imap_oauthbearer(dovecot.imap_port, TOKEN_USER, &tokens.access_token);
    assert_refused(&revoked, OAUTHBEARER_CHALLENGE, "OAUTHBEARER, revoked");
}

#[test]
fn device_flow_gives_tokens_once_approved() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    oauth.set_device_interval(0);
    let device = oauth.device_authorization(SCOPE);
    assert_eq!(device.interval, 0);
    assert_eq!(device.user_code.len(), 9);
    assert!(device.expires_in > 0 && !device.verification_uri.is_empty());

    assert_eq!(
        oauth.poll_device(&device.device_code),
        Err("authorization_pending".to_string())
    );
    assert!(!oauth.approve_device("NOPE-NOPE"));
    assert!(oauth.approve_device(&device.user_code));
    let tokens = oauth.poll_device(&device.device_code).expect("approved");
    assert!(tokens.refresh_token.is_some());
    assert!(imap_xoauth2(dovecot.imap_port, TOKEN_USER, &tokens.access_token).ok());
    assert_eq!(
        oauth.poll_device(&device.device_code),
        Err("invalid_grant".to_string()),
        "a device code gives tokens once"
    );

    // Denied, too fast, expired.
    oauth.set_device_interval(30);
    let denied = oauth.device_authorization(SCOPE);
    assert_eq!(
        oauth.poll_device(&denied.device_code),
        Err("authorization_pending".to_string())
    );
    assert_eq!(
        oauth.poll_device(&denied.device_code),
        Err("slow_down".to_string())
    );
    assert!(oauth.deny_device(&denied.user_code));
    assert_eq!(
        oauth.poll_device(&denied.device_code),
        Err("access_denied".to_string())
    );
    let late = oauth.device_authorization(SCOPE);
    oauth.expire_device_codes();
    assert_eq!(
        oauth.poll_device(&late.device_code),
        Err("expired_token".to_string())
    );

    let c = oauth.counters();
    assert_eq!(
        (c.device, c.token_device_code, c.slow_down),
        (3, 7, 1),
        "{c:?}"
    );
}

#[test]
fn authorize_and_token_check_client_pkce_and_codes() {
    let oauth = OAuthServer::start();
    let redirect = "http://127.0.0.1:4711/cb";
    let query =
        |pairs: &[(&str, &str)]| format!("{}?{}", oauth.authorize_url(), form_encode(pairs));
    let (verifier, challenge) = pkce_pair();

    // Unknown client or a non-loopback redirect: 400, never a redirect.
    for (client, uri) in [("evil", redirect), (CLIENT_ID, "https://evil.example/cb")] {
        let r = http(
            "GET",
            &query(&[
                ("response_type", "code"),
                ("client_id", client),
                ("redirect_uri", uri),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ]),
            None,
        );
        assert_eq!(r.status, 400, "{client} {uri}: {r:?}");
    }
    // PKCE plain is refused, by redirect with the state.
    let r = http(
        "GET",
        &query(&[
            ("response_type", "code"),
            ("client_id", CLIENT_ID),
            ("redirect_uri", redirect),
            ("state", "s 1&x"),
            ("code_challenge", &verifier),
            ("code_challenge_method", "plain"),
        ]),
        None,
    );
    assert_eq!(r.status, 302);
    let location = r.header("location").unwrap();
    let params = parse_form(location.split_once('?').unwrap().1).unwrap();
    assert_eq!(params["error"], "invalid_request");
    assert_eq!(params["state"], "s 1&x", "state survives percent-encoding");

    // What a browser does: approve, then follow the redirect to the client's listener.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cb = format!("http://{}/cb", listener.local_addr().unwrap());
    let served = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let (location, followed) = browse(&query(&[
        ("response_type", "code"),
        ("client_id", CLIENT_ID),
        ("redirect_uri", &cb),
        ("state", "b"),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ]));
    assert!(location.starts_with(&format!("{cb}?code=")), "{location}");
    assert_eq!(followed.expect("followed").body, b"ok");
    let request = served.join().unwrap();
    assert!(request.starts_with("GET /cb?code="), "{request}");

    // A wrong verifier, a wrong redirect_uri; then the right one; then the code again.
    let code = oauth.authorize(redirect, SCOPE, &challenge, "st");
    let (other_verifier, _) = pkce_pair();
    assert_eq!(
        oauth.exchange_code(&code, redirect, &other_verifier),
        Err("invalid_grant".to_string())
    );
    assert_eq!(
        oauth.exchange_code(&code, "http://127.0.0.1:4712/cb", &verifier),
        Err("invalid_grant".to_string())
    );
    let tokens = oauth
        .exchange_code(&code, redirect, &verifier)
        .expect("code exchange");
    assert!(oauth.is_active(&tokens.access_token));
    assert_eq!(
        oauth.exchange_code(&code, redirect, &verifier),
        Err("invalid_grant".to_string())
    );
    assert!(!oauth.is_active(&tokens.access_token), "code reuse revokes");
    assert_eq!(oauth.counters().code_reuse, 1);

    // Client authentication: a wrong secret is 401; with the secret required, none is too.
    let rt_grant = oauth.issue(SCOPE);
    let rt = rt_grant.refresh_token.as_deref().unwrap();
    let refresh_with = |secret: Option<&str>| {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", CLIENT_ID),
        ];
        if let Some(s) = secret {
            form.push(("client_secret", s));
        }
        http("POST", &oauth.token_url(), Some(&form))
    };
    let r = refresh_with(Some("wrong"));
    assert_eq!(
        (r.status, r.error().as_deref()),
        (401, Some("invalid_client"))
    );
    oauth.set_require_client_secret(true);
    assert_eq!(refresh_with(None).status, 401);
    let ok = refresh_with(Some(CLIENT_SECRET));
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    let r = http(
        "POST",
        &oauth.token_url(),
        Some(&[("grant_type", "password"), ("client_id", CLIENT_ID)]),
    );
    assert_eq!(
        r.error().as_deref(),
        Some("invalid_client"),
        "secret still required"
    );
    oauth.set_require_client_secret(false);
    let r = http(
        "POST",
        &oauth.token_url(),
        Some(&[("grant_type", "password"), ("client_id", CLIENT_ID)]),
    );
    assert_eq!(r.error().as_deref(), Some("unsupported_grant_type"));
}

#[test]
fn provider_outages_are_temporary_failures_for_dovecot() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    let tokens = oauth.enrol(SCOPE);

    for outage in [
        Outage::Unavailable,
        Outage::RateLimited,
        Outage::Hangup,
        Outage::Refused,
    ] {
        oauth.set_down(outage);
        let auth = imap_xoauth2(dovecot.imap_port, TOKEN_USER, &tokens.access_token);
        eprintln!("{outage:?}: {:?} after {:?}", auth.tagged, auth.elapsed);
        assert!(
            auth.tagged.starts_with("a NO [UNAVAILABLE]"),
            "{outage:?}: {auth:?}\n{}",
            dovecot.log_contents()
        );
        assert_eq!(auth.challenge, None, "{outage:?}: no SASL challenge");
        let log = dovecot.log_contents();
        let why = log.lines().rev().find(|l| l.contains("oauth2 failed"));
        eprintln!("{outage:?}: Dovecot logs {why:?}");
        match outage {
            Outage::Unavailable => {
                let r = http("POST", &oauth.token_url(), Some(&[("grant_type", "x")]));
                assert_eq!(
                    (r.status, r.error().as_deref()),
                    (503, Some("temporarily_unavailable"))
                );
            }
            Outage::RateLimited => {
                let r = http("POST", &oauth.token_url(), Some(&[("grant_type", "x")]));
                assert_eq!(
                    (r.status, r.error().as_deref(), r.header("retry-after")),
                    (429, Some("temporarily_unavailable"), Some("1"))
                );
            }
            Outage::Hangup => {
                assert!(try_http("POST", &oauth.token_url(), Some(&[("grant_type", "x")])).is_err())
            }
            Outage::Refused => {
                let e = try_http("POST", &oauth.token_url(), Some(&[("grant_type", "x")]))
                    .expect_err("refused");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            Outage::Up => unreachable!(),
        }
    }
    oauth.set_down(Outage::Up);
    let mut back = None;
    // After Refused the server listens again within a few milliseconds.
    for _ in 0..100 {
        let auth = imap_xoauth2(dovecot.imap_port, TOKEN_USER, &tokens.access_token);
        if auth.ok() {
            back = Some(auth);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(back.is_some(), "back up:\n{}", dovecot.log_contents());
    let c = oauth.counters();
    assert!(c.while_down >= 6, "{c:?}");
}

#[test]
fn slow_provider_delays_the_login() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    let tokens = oauth.issue(SCOPE);
    oauth.set_delay(Duration::from_millis(700));
    let auth = imap_xoauth2(dovecot.imap_port, TOKEN_USER, &tokens.access_token);
    assert!(auth.ok(), "{auth:?}");
    assert!(auth.elapsed >= Duration::from_millis(700), "{auth:?}");
}

#[test]
fn a_failure_delays_the_next_login_from_that_address() {
    let oauth = OAuthServer::start();
    let dovecot = oauth.start_dovecot();
    let tokens = oauth.issue(SCOPE);
    let port = dovecot.imap_port;
    let source = fresh_source();
    let bad = xoauth2_initial(TOKEN_USER, "at-bad");
    let failed = imap_authenticate_from(source, port, "XOAUTH2", &bad);
    assert_refused(&failed, XOAUTH2_CHALLENGE, "bad token");
    let good = xoauth2_initial(TOKEN_USER, &tokens.access_token);
    let penalized = imap_authenticate_from(source, port, "XOAUTH2", &good);
    let elsewhere = imap_authenticate_from(fresh_source(), port, "XOAUTH2", &good);
    eprintln!(
        "failure {:?}, then from the same address {:?}, from another {:?}",
        failed.elapsed, penalized.elapsed, elsewhere.elapsed
    );
    assert!(penalized.ok() && elsewhere.ok());
    assert!(
        penalized.elapsed >= Duration::from_millis(3500),
        "{penalized:?}"
    );
    assert!(elsewhere.elapsed < Duration::from_secs(2), "{elsewhere:?}");
}
