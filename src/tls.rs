//! TLS towards the POP3 client: the rustls server configuration (ring provider, TLS 1.2 and
//! 1.3 only), read from the PEM files on every start so a renewed certificate is used by the
//! next connection; and `--ssl-generate`, which creates a self-signed pair once, atomically.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Create a self-signed pair for this host name when both files are missing.
    pub generate_for: Option<String>,
}

/// Loads (or first generates) the certificate and key, and builds the server configuration.
pub fn server_config(files: &Files) -> Result<Arc<rustls::ServerConfig>, String> {
    if let Some(name) = &files.generate_for {
        if !files.cert.exists() || !files.key.exists() {
            generate(&files.cert, &files.key, name)?;
        }
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("reading certificates from {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| match e {
        // rustls-pki-types says only "no items found".
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "no private key in {} (expected a PEM block such as BEGIN PRIVATE KEY)",
            files.key.display()
        ),
        e => format!("reading the private key from {}: {e}", files.key.display()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(Arc::new(config))
}

/// TLS that STLS may start: the files until the client first asks, then the configuration read
/// from them. A session that never sends STLS never reads the key; and a certificate or key that
/// can't be loaded is met at STLS, where the client can be told `-ERR` in clear, rather than
/// before the greeting, where the only thing left to do is close the connection.
#[derive(Debug)]
pub enum Deferred {
    Files(Files),
    Ready(Arc<rustls::ServerConfig>),
}

impl Deferred {
    /// The configuration, read now if it wasn't yet. An error names the file and the problem;
    /// the next call tries again.
    pub fn load(&mut self) -> Result<Arc<rustls::ServerConfig>, String> {
        let config = match self {
            Deferred::Ready(config) => return Ok(config.clone()),
            Deferred::Files(files) => server_config(files)?,
        };
        *self = Deferred::Ready(config.clone());
        Ok(config)
    }
}

/// Creates a self-signed pair unless both files exist. Many first connections may arrive at
/// once: a lock serialises them, and each file appears whole (temp file + rename). A file that
/// exists is never overwritten.
fn generate(cert: &Path, key: &Path, name: &str) -> Result<(), String> {
    let ctx =
        |what: &str, p: &Path, e: io::Error| format!("--ssl-generate: {what} {}: {e}", p.display());
    let lock_path = lock_path(key);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| ctx("creating", &lock_path, e))?;
    lock.lock().map_err(|e| ctx("locking", &lock_path, e))?;
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok(()),
        (false, false) => {}
        _ => {
            return Err(format!(
                "--ssl-generate: only one of {} and {} exists; remove it or supply the other",
                cert.display(),
                key.display()
            ))
        }
    }
    let pair = rcgen::generate_simple_self_signed(vec![name.to_string()])
        .map_err(|e| format!("--ssl-generate: {e}"))?;
    write_new(key, pair.signing_key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| ctx("writing", key, e))?;
    write_new(cert, pair.cert.pem().as_bytes(), 0o644).map_err(|e| ctx("writing", cert, e))?;
    crate::log::warning(&format!(
        "generated a self-signed certificate for {name} in {}; clients such as Gmail will refuse it",
        cert.display()
    ));
    Ok(())
}

fn lock_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    key.with_file_name(name)
}

/// Writes `path` atomically: a temp file in the same directory, then rename.
fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f: File = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_once_with_a_private_key_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            generate_for: Some("pop.example".into()),
        };
        // Concurrent first connections.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let f = files.clone();
                std::thread::spawn(move || server_config(&f).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let cert = fs::read(&files.cert).unwrap();
        server_config(&files).unwrap();
        assert_eq!(fs::read(&files.cert).unwrap(), cert, "never overwritten");
    }

    #[test]
    fn deferred_loading_names_the_file_and_the_problem_and_tries_again() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            generate_for: None,
        };
        let mut d = Deferred::Files(files.clone());
        let e = d.load().unwrap_err();
        assert!(e.contains("cert.pem") && e.contains("No such file"), "{e}");
        let pair = rcgen::generate_simple_self_signed(vec!["pop.example".into()]).unwrap();
        fs::write(&files.cert, pair.cert.pem()).unwrap();
        let e = d.load().unwrap_err();
        assert!(e.contains("key.pem") && e.contains("No such file"), "{e}");
        fs::write(&files.key, "not a key").unwrap();
        let e = d.load().unwrap_err();
        assert!(e.contains("key.pem"), "{e}");
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        fs::write(&files.key, other.signing_key.serialize_pem()).unwrap();
        let e = d.load().unwrap_err();
        assert!(e.contains("cert.pem") && e.contains("key.pem"), "{e}");
        fs::write(&files.key, pair.signing_key.serialize_pem()).unwrap();
        d.load().unwrap();
        fs::remove_file(&files.key).unwrap();
        d.load().expect("read once, kept");
    }

    #[test]
    fn one_missing_file_is_an_error_not_a_new_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            generate_for: Some("pop.example".into()),
        };
        fs::write(&files.cert, "x").unwrap();
        assert!(server_config(&files).unwrap_err().contains("only one"));
    }
}
