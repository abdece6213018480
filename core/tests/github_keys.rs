//! `github::private_key_pkcs8` against OpenSSL: a PKCS#1 key as GitHub downloads it (`openssl genrsa -traditional`) wraps into exactly the PKCS#8 DER `openssl pkcs8 -topk8` makes of it, a PKCS#8 PEM passes through, and keys pasted into one line still read.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nightshift_core::github::{private_key_pkcs8, KeyError};

/// One RSA key for every test in this file, as OpenSSL writes it.
struct OpensslKey {
    /// `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1), GitHub's download format.
    pkcs1_pem: String,
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8) of the same key.
    pkcs8_pem: String,
    /// The PKCS#8 DER of the same key.
    pkcs8_der: Vec<u8>,
}

/// Runs openssl, failing loudly when it is missing or refuses (it is on every dev machine and CI).
fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("openssl is required for this test: {error}"));
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_text(path: &Path) -> &str {
    path.to_str().expect("temp path is UTF-8")
}

fn key() -> &'static OpensslKey {
    static KEY: OnceLock<OpensslKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "nightshift-github-keys-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let pkcs1 = dir.join("app.pem");
        let pkcs8_pem = dir.join("app.pkcs8.pem");
        let pkcs8_der = dir.join("app.pkcs8.der");
        openssl(&["genrsa", "-traditional", "-out", path_text(&pkcs1), "2048"]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            path_text(&pkcs1),
            "-outform",
            "DER",
            "-out",
            path_text(&pkcs8_der),
        ]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            path_text(&pkcs1),
            "-out",
            path_text(&pkcs8_pem),
        ]);
        let key = OpensslKey {
            pkcs1_pem: std::fs::read_to_string(&pkcs1).expect("read PKCS#1 PEM"),
            pkcs8_pem: std::fs::read_to_string(&pkcs8_pem).expect("read PKCS#8 PEM"),
            pkcs8_der: std::fs::read(&pkcs8_der).expect("read PKCS#8 DER"),
        };
        let _ = std::fs::remove_dir_all(&dir);
        key
    })
}

#[test]
fn pkcs1_pem_wraps_into_openssls_pkcs8_der() {
    let key = key();
    assert!(key.pkcs1_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    // 2048-bit keys are over 127 bytes: the long-form DER lengths are exercised.
    assert!(key.pkcs8_der.len() > 1000);
    assert_eq!(private_key_pkcs8(&key.pkcs1_pem), Ok(key.pkcs8_der.clone()));
}

#[test]
fn pkcs8_pem_passes_through_unchanged() {
    let key = key();
    assert!(key.pkcs8_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(private_key_pkcs8(&key.pkcs8_pem), Ok(key.pkcs8_der.clone()));
}

#[test]
fn pasted_forms_still_read() {
    let key = key();
    let want = Ok(key.pkcs8_der.clone());
    // Pasted into a one-line secret: real newlines became the two characters `\n`.
    let one_line = key.pkcs1_pem.trim().replace('\n', "\\n");
    assert!(!one_line.contains('\n'));
    assert_eq!(private_key_pkcs8(&one_line), want);
    // Windows line endings and surrounding whitespace.
    let crlf = format!("\n  {}  \n\n", key.pkcs1_pem.replace('\n', "\r\n"));
    assert_eq!(private_key_pkcs8(&crlf), want);
    // The same for the PKCS#8 form.
    assert_eq!(
        private_key_pkcs8(&key.pkcs8_pem.trim().replace('\n', "\\n")),
        want
    );
}

#[test]
fn damaged_keys_are_refused() {
    let key = key();
    let truncated: String = {
        let mut lines: Vec<&str> = key.pkcs1_pem.lines().collect();
        // Drop a body line: valid base64, broken DER.
        lines.remove(3);
        lines.join("\n")
    };
    assert_eq!(private_key_pkcs8(&truncated), Err(KeyError::BadDer));
    let body_only: String = key
        .pkcs1_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    assert_eq!(private_key_pkcs8(&body_only), Err(KeyError::NotPem));
}
