//! Key files through the built binary: every command that reads a private key
//! refuses one other users can access, and `certs` writes keys only into a
//! private directory, never through a planted link.
#![cfg(unix)]

use crate::harness::run_cli;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs the CLI as `member` of `certs` against a broker address nobody
/// listens on: the key is loaded before any connection is tried.
fn member_list(certs: &Path, member: &str) -> (bool, String) {
    run_cli(
        &[
            "--broker",
            "https://127.0.0.1:1",
            "--certs",
            s(certs),
            "--as",
            member,
            "member",
            "list",
        ],
        &[],
    )
}

fn assert_refused(ok: bool, out: &str, key: &Path) {
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("chmod 600 {}", key.display())), "{out}");
}

#[test]
fn every_command_refuses_a_private_key_other_users_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, out) = run_cli(&["certs", "init", "--dir", s(&certs), "--trust-domain", "gov"], &[]);
    assert!(ok, "{out}");
    assert_eq!(mode_of(&certs), 0o700, "certs init makes a private directory");
    for key in ["ca.key", "broker.key"] {
        assert_eq!(mode_of(&certs.join(key)), 0o600, "{key}");
    }

    // certs issue signs with ca.key.
    let ca_key = certs.join("ca.key");
    set_mode(&ca_key, 0o644);
    let (ok, out) = run_cli(&["certs", "issue", "--dir", s(&certs), "--member", "m2"], &[]);
    assert_refused(ok, &out, &ca_key);
    assert!(!certs.join("m2.key").exists(), "nothing issued with an exposed CA key");
    set_mode(&ca_key, 0o600);
    let (ok, out) = run_cli(&["certs", "issue", "--dir", s(&certs), "--member", "m2"], &[]);
    assert!(ok, "{out}");

    // A client, by --certs/--as and by --ca/--cert/--key.
    let m2_key = certs.join("m2.key");
    set_mode(&m2_key, 0o604);
    let (ok, out) = member_list(&certs, "m2");
    assert_refused(ok, &out, &m2_key);
    let (ok, out) = run_cli(
        &[
            "--broker",
            "https://127.0.0.1:1",
            "--ca",
            s(&certs.join("ca.pem")),
            "--cert",
            s(&certs.join("m2.pem")),
            "--key",
            s(&m2_key),
            "certs",
            "revoked",
        ],
        &[],
    );
    assert_refused(ok, &out, &m2_key);

    // The broker.
    let broker_key = certs.join("broker.key");
    set_mode(&broker_key, 0o644);
    let (data, ca, cert) = (dir.path().join("data"), certs.join("ca.pem"), certs.join("broker.pem"));
    let env = [
        ("LIENTHONG_LISTEN", "127.0.0.1:0"),
        ("LIENTHONG_DATA_DIR", s(&data)),
        ("LIENTHONG_TRUST_DOMAIN", "gov"),
        ("LIENTHONG_TLS_CA", s(&ca)),
        ("LIENTHONG_TLS_CERT", s(&cert)),
        ("LIENTHONG_TLS_KEY", s(&broker_key)),
    ];
    let (ok, out) = run_cli(&["serve"], &env);
    assert_refused(ok, &out, &broker_key);

    // A demo register.
    let (ok, out) = run_cli(
        &[
            "demo-provider",
            "civil-status",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            s(&certs),
            "--member",
            "broker",
            "--trust-domain",
            "gov",
        ],
        &[],
    );
    assert_refused(ok, &out, &broker_key);
}

/// A Kubernetes Secret mounted with fsGroup is 0440: accepted, with a warning.
#[test]
fn a_group_readable_key_is_used_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, out) = run_cli(&["certs", "init", "--dir", s(&certs), "--trust-domain", "gov"], &[]);
    assert!(ok, "{out}");
    let (ok, out) = run_cli(&["certs", "issue", "--dir", s(&certs), "--member", "m2"], &[]);
    assert!(ok, "{out}");
    set_mode(&certs.join("m2.key"), 0o440);
    let (ok, out) = member_list(&certs, "m2");
    assert!(!ok, "nobody listens at the broker address: {out}");
    assert!(!out.contains("chmod 600 "), "not refused: {out}");
    assert!(out.contains("cannot connect to the broker"), "{out}");
    assert!(
        out.contains("readable by its group") && out.contains("m2.key"),
        "warned: {out}"
    );
}

/// `ln -s /some/victim.txt certs/evil.key; lienthong certs issue --member evil`
/// used to write the key into victim.txt and make it 0600.
#[test]
fn certs_issue_does_not_write_through_a_planted_link() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, out) = run_cli(&["certs", "init", "--dir", s(&certs), "--trust-domain", "gov"], &[]);
    assert!(ok, "{out}");
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    set_mode(&victim, 0o644);
    std::os::unix::fs::symlink(&victim, certs.join("evil.key")).unwrap();

    let (ok, out) = run_cli(&["certs", "issue", "--dir", s(&certs), "--member", "evil"], &[]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(mode_of(&victim), 0o644);
    let key = certs.join("evil.key");
    assert!(std::fs::symlink_metadata(&key).unwrap().file_type().is_file());
    assert_eq!(mode_of(&key), 0o600);
    assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
}

#[test]
fn certs_refuses_a_directory_others_can_write_in() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o777);
    let (ok, out) = run_cli(&["certs", "init", "--dir", s(&shared), "--trust-domain", "gov"], &[]);
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("chmod go-w {}", shared.display())), "{out}");
    assert!(!shared.join("ca.key").exists());

    set_mode(&shared, 0o700);
    let (ok, out) = run_cli(&["certs", "init", "--dir", s(&shared), "--trust-domain", "gov"], &[]);
    assert!(ok, "{out}");
    set_mode(&shared, 0o770);
    let (ok, out) = run_cli(&["certs", "issue", "--dir", s(&shared), "--member", "m2"], &[]);
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("chmod go-w {}", shared.display())), "{out}");
    assert!(!shared.join("m2.key").exists());
}

/// `demo-provider` says it serves only once it does: a register whose own
/// certificate the broker would refuse stops without having said so.
#[test]
fn a_demo_register_that_refuses_to_start_never_says_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, out) = run_cli(&["certs", "init", "--dir", s(&certs), "--trust-domain", "gov"], &[]);
    assert!(ok, "{out}");
    // Without --host: a client certificate only, which a register cannot serve.
    let (ok, out) = run_cli(&["certs", "issue", "--dir", s(&certs), "--member", "civil-status"], &[]);
    assert!(ok, "{out}");
    let (ok, out) = run_cli(
        &[
            "demo-provider",
            "civil-status",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            s(&certs),
            "--trust-domain",
            "gov",
        ],
        &[("RUST_LOG", "warn")],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("--host"), "says why: {out}");
    assert!(!out.contains("serving on"), "{out}");
}
