//! Workload 7 (`oauth`): what an OAuth user's token store adds to a login (issue 14: at most
//! 50 ms, peak RSS at most 32 MB). The store's key comes from the POP3 password by Argon2id with
//! the default parameters. Timed twice: in this process (`Store::open`: the KDF and the
//! unseal), and end to end as aiopopd pays it, PASS for a user with a token store and a wrong
//! password (key derived, store refused, no request to any provider) against PASS for a name
//! with no per-user file (refused at once), both with `--auth-failure-delay 0`. The difference
//! is the KDF's cost per login; a right password pays the same derivation. The peak RSS is each
//! process's VmHWM.

use super::{fmt_kb, fmt_time, median, percentile, servers, Bench, Table};
use aiopopd::oauth::store::{KdfParams, Store, Tokens};
use aiopopd::secret::Secret;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const TARGET_S: f64 = 0.050;
/// 32 MB, in the KiB `fmt_kb` takes.
const TARGET_KB: f64 = 32.0 * 1024.0;
const USER: &str = "oauthbench";
const PASSWORD: &str = "bench-store-password";

/// One aiopopd on pipes: USER `user`, PASS `password`, which must be refused; (time from PASS
/// to the answer, peak RSS in KiB).
fn refused(bin: &str, args: &[String], user: &str, password: &str) -> Result<(f64, f64), String> {
    let mut took = 0.0;
    let peak = servers::pipe_session(bin, args, |c| {
        c.simple(&format!("USER {user}"))?;
        let t = Instant::now();
        let line = c.reply(&format!("PASS {password}"))?;
        took = t.elapsed().as_secs_f64();
        if !line.starts_with("-ERR [AUTH]") {
            return Err(format!("PASS for {user} answered {line}"));
        }
        Ok(())
    })?;
    Ok((took, peak.hwm_kb as f64))
}

impl Bench {
    pub(super) fn oauth(&mut self) {
        let rounds = self.plan.kdf_rounds;
        let params = KdfParams::default();
        println!(
            "\n== 7. oauth: the token store's key (Argon2id, {} MiB, {} passes) per login, {rounds} rounds",
            params.memory_kib / 1024,
            params.iterations
        );
        let state = tempfile::tempdir().expect("temp dir");
        let users = tempfile::tempdir().expect("temp dir");
        let secret = || Secret::new(PASSWORD.as_bytes().to_vec());
        let store = Store::new(state.path(), USER);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Tokens of a realistic size (Microsoft's are 1-2 KB).
        let tokens = Tokens {
            refresh_token: Some("r".repeat(1500)),
            access_token: Some("a".repeat(2000)),
            expires_at: Some(now + 3600),
        };
        store
            .create(&secret(), params, &tokens)
            .expect("create the token store");
        // The provider is never asked: a wrong password stops at the store.
        let file = format!(
            r#"{{"hostname": "127.0.0.1", "port": {}, "ssl": false,
                "oauth2": {{"authorize_url": "http://127.0.0.1:9/authorize",
                            "token_url": "http://127.0.0.1:9/token",
                            "client_id": "bench", "scope": "mail"}}}}"#,
            self.d.imap_port
        );
        std::fs::write(users.path().join(USER), file).expect("write the user file");
        let args: Vec<String> = [
            "--user-dir",
            users.path().to_str().expect("UTF-8 path"),
            "--state-dir",
            state.path().to_str().expect("UTF-8 path"),
            "--allow-plaintext-auth",
            "-d",
            "bench.test",
            "--auth-failure-delay",
            "0",
        ]
        .map(String::from)
        .to_vec();

        let (mut open, mut plain, mut kdf) = (Vec::new(), Vec::new(), Vec::new());
        let (mut plain_kb, mut kdf_kb) = (Vec::new(), Vec::new());
        // One round of warm-up (page cache, the binary), then the measured ones, interleaved.
        for round in 0..=rounds {
            let t = Instant::now();
            if let Err(e) = store.open(&secret()) {
                self.failures
                    .add(format!("oauth: the store doesn't open: {e:?}"));
                return;
            }
            let o = t.elapsed().as_secs_f64();
            let p = refused(&self.opts.aiopopd, &args, "nobody", PASSWORD);
            let k = refused(&self.opts.aiopopd, &args, USER, "not-the-password");
            match (p, k) {
                (Ok(p), Ok(k)) if round > 0 => {
                    open.push(o);
                    plain.push(p.0);
                    plain_kb.push(p.1);
                    kdf.push(k.0);
                    kdf_kb.push(k.1);
                }
                (Ok(_), Ok(_)) => {}
                (Err(e), _) | (_, Err(e)) => self.failures.add(format!("oauth: {e}")),
            }
        }
        if kdf.is_empty() {
            return;
        }
        let mut table = Table::new(&["what", "time median", "time max", "peak RSS max"]);
        table.row(vec![
            "store opened in this process (Argon2id, unseal)".into(),
            fmt_time(median(&open)),
            fmt_time(percentile(&open, 100.0)),
            "—".into(),
        ]);
        table.row(vec![
            "aiopopd: PASS refused, no per-user file".into(),
            fmt_time(median(&plain)),
            fmt_time(percentile(&plain, 100.0)),
            fmt_kb(percentile(&plain_kb, 100.0)),
        ]);
        table.row(vec![
            "aiopopd: PASS refused by the token store".into(),
            fmt_time(median(&kdf)),
            fmt_time(percentile(&kdf, 100.0)),
            fmt_kb(percentile(&kdf_kb, 100.0)),
        ]);
        let cost = median(&kdf) - median(&plain);
        let peak = percentile(&kdf_kb, 100.0);
        let verdict = |ok: bool| if ok { "within" } else { "ABOVE" };
        let line = format!(
            "The token store adds {} to a login ({} the target of {}); the process peaks at {} \
             ({} the target of {}).",
            fmt_time(cost),
            verdict(cost <= TARGET_S),
            fmt_time(TARGET_S),
            fmt_kb(peak),
            verdict(peak <= TARGET_KB),
            fmt_kb(TARGET_KB),
        );
        let t = table.markdown();
        println!("\n{t}\n{line}");
        self.md.push(format!(
            "### 7. OAuth token store\n\n\
             An OAuth user's POP3 password unlocks the token store: Argon2id (the defaults: {} MiB, \
             t = {} passes, p = {} lane) derives the key, ChaCha20-Poly1305 opens the store. \
             {rounds} rounds after one of warm-up: the store opened in the benchmark's own \
             process, and aiopopd on pipes answering PASS with `--auth-failure-delay 0`, for a \
             name with no per-user file (no KDF) and for the store's user with a wrong password \
             (the KDF, then the refusal; no provider is asked). The difference of the medians is \
             the KDF's cost per login; a right password pays the same. Peak RSS is the process's \
             VmHWM.\n\n{t}\n{line}\n",
            params.memory_kib / 1024,
            params.iterations,
            params.parallelism,
        ));
    }
}
