//! Connecting to a broker as a member (mutual TLS) and the typed clients.

use anyhow::{Context, Result};
use lienthong::v1::admin_client::AdminClient;
use lienthong::v1::audit_client::AuditClient;
use lienthong::v1::exchange_client::ExchangeClient;
use lienthong::v1::schema_registry_client::SchemaRegistryClient;
use lienthong_tls::{TlsFiles, TlsMaterial};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// Where the broker is and which certificate to present.
#[derive(Clone, Debug, clap::Args)]
pub struct ConnectArgs {
    /// Broker address.
    #[arg(
        long,
        env = "LIENTHONG_BROKER",
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    pub broker: String,
    /// Directory holding `ca.pem` and `<member>.pem`/`<member>.key` (as made by `lienthong certs`).
    #[arg(long, env = "LIENTHONG_CERTS", global = true)]
    pub certs: Option<PathBuf>,
    /// Member to act as; picks `<member>.pem` and `<member>.key` in `--certs`.
    #[arg(long = "as", env = "LIENTHONG_AS", global = true)]
    pub member: Option<String>,
    /// Federation CA certificate (overrides `ca.pem` in `--certs`, or in `demo-provider`'s `--tls-dir`).
    #[arg(long, env = "LIENTHONG_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Certificate to present (overrides `--certs`/`--as`; for `demo-provider`, the register's in `--tls-dir`).
    #[arg(long, env = "LIENTHONG_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Private key of that certificate (overrides `--certs`/`--as`; for `demo-provider`, the register's in `--tls-dir`).
    #[arg(long, env = "LIENTHONG_KEY", global = true)]
    pub key: Option<PathBuf>,
}

/// `value` when it was typed on the command line, not taken from `var`.
fn typed_flag(value: &Option<PathBuf>, var: &str) -> Option<PathBuf> {
    value
        .clone()
        .filter(|v| std::env::var_os(var).is_none_or(|e| std::path::Path::new(&e) != v.as_path()))
}

impl ConnectArgs {
    /// `files` with `--ca`, `--cert` and `--key` put in place of theirs
    /// where typed on the command line (the environment's are for the
    /// client commands: the container image sets `LIENTHONG_CA` for its
    /// health probe).
    pub fn typed_over(&self, files: TlsFiles) -> TlsFiles {
        TlsFiles {
            ca: typed_flag(&self.ca, "LIENTHONG_CA").unwrap_or(files.ca),
            cert: typed_flag(&self.cert, "LIENTHONG_CERT").unwrap_or(files.cert),
            key: typed_flag(&self.key, "LIENTHONG_KEY").unwrap_or(files.key),
        }
    }

    /// The certificate files to use. A value typed on the command line beats
    /// one from the environment, so `--certs DIR` is not overridden by the
    /// `LIENTHONG_CA` the container image sets for its health probe; from
    /// the same source, a file named on its own beats the one in `--certs`.
    pub fn files(&self) -> Result<TlsFiles> {
        let typed = typed_flag;
        let member = self.member.as_deref();
        let in_dir = |dir: &Option<PathBuf>, name: &str| dir.as_ref().map(|d| d.join(name));
        let dir_typed = typed(&self.certs, "LIENTHONG_CERTS");
        let pick = |own: &Option<PathBuf>, var: &str, name: Option<String>| -> Option<PathBuf> {
            let name = name.as_deref();
            typed(own, var)
                .or_else(|| name.and_then(|n| in_dir(&dir_typed, n)))
                .or_else(|| own.clone())
                .or_else(|| name.and_then(|n| in_dir(&self.certs, n)))
        };
        let ca = pick(&self.ca, "LIENTHONG_CA", Some("ca.pem".into()));
        let cert = pick(&self.cert, "LIENTHONG_CERT", member.map(|m| format!("{m}.pem")));
        let key = pick(&self.key, "LIENTHONG_KEY", member.map(|m| format!("{m}.key")));
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(TlsFiles { ca, cert, key }),
            _ => anyhow::bail!(
                "no client certificate: pass --certs DIR --as MEMBER (or --ca, --cert and --key, or the LIENTHONG_CERTS and LIENTHONG_AS variables)"
            ),
        }
    }

    /// Opens a mutual-TLS channel to the broker.
    pub async fn connect(&self) -> Result<Clients> {
        let files = self.files()?;
        connect(&self.broker, &files).await
    }
}

/// Typed clients sharing one channel.
#[derive(Clone)]
pub struct Clients {
    /// The channel.
    pub channel: Channel,
}

impl Clients {
    /// Admin service.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }
    /// Schema registry.
    pub fn schemas(&self) -> SchemaRegistryClient<Channel> {
        SchemaRegistryClient::new(self.channel.clone())
    }
    /// Exchange.
    pub fn exchange(&self) -> ExchangeClient<Channel> {
        ExchangeClient::new(self.channel.clone())
    }
    /// Audit.
    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel.clone())
    }
}

/// Connects to the broker at `url` presenting the certificate in `files`.
/// The server must prove it is the federation's broker
/// (`spiffe://<trust-domain>/broker`, the trust domain read from the CA
/// certificate): any member's certificate chains to the same CA, and one
/// answering at the broker's address must not receive queries or admin
/// commands.
pub async fn connect(url: &str, files: &TlsFiles) -> Result<Clients> {
    lienthong_tls::install_crypto_provider();
    // The error names the file; the context says which ones were asked for.
    let material = TlsMaterial::load(files).with_context(|| {
        format!(
            "loading the client's TLS files (--ca {}, --cert {}, --key {})",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        )
    })?;
    let trust_domain = lienthong_tls::trust_domain_from_ca_cert(&files.ca)?;
    let config = lienthong_tls::client_config(&material, Some((&trust_domain, lienthong_tls::Identity::Broker)))?;
    let channel = lienthong_tls::connect_channel(url, config, Duration::from_secs(5))
        .await
        .map_err(|e| match e {
            // Said once: the TLS error names the URL too.
            lienthong_tls::TlsError::Connect { url, detail } => {
                anyhow::anyhow!("cannot connect to the broker at {url}: {detail}")
            }
            e => anyhow::Error::new(e).context(format!("cannot connect to the broker at {url}")),
        })?;
    Ok(Clients { channel })
}

/// Certificate files of `member` in a directory made by `lienthong certs`.
pub fn member_files(dir: &Path, member: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{member}.pem")),
        key: dir.join(format!("{member}.key")),
    }
}

/// Turns a gRPC status into an error a person can read.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), shown(s.message()))
}

/// Text from the broker as a terminal may show it. Much of it was typed by
/// other members (a purpose, a reason, a name): a line break would start a
/// row that looks like another entry, and an escape sequence or a bidi
/// override would rewrite or reorder what is on the screen. Those, every
/// other control or invisible formatting character, and the backslash (so
/// that an escape cannot be faked) are printed escaped, as `\n` or `\u{1b}`.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    fn escaped(c: char) -> bool {
        c == '\\'
            || c.is_control()
            || matches!(
                c,
                '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}'
            )
    }
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_broker_cannot_break_a_line_or_drive_the_terminal() {
        assert_eq!(shown("decree-47-2020/art-12"), "decree-47-2020/art-12");
        assert_eq!(shown("Sở Tư pháp Hà Nội"), "Sở Tư pháp Hà Nội");
        assert_eq!(
            shown("x\n#999 federation-admin grant.revoke allowed forged"),
            "x\\n#999 federation-admin grant.revoke allowed forged"
        );
        assert_eq!(shown("\u{1b}[2K\r\tok"), "\\u{1b}[2K\\r\\tok");
        assert_eq!(shown("a\u{202e}b\u{9b}c"), "a\\u{202e}b\\u{9b}c");
        // A backslash typed as such cannot pass for an escape.
        assert_eq!(shown("a\\nb"), "a\\\\nb");
        let message = status_error(tonic::Status::not_found("no \u{1b}[31mred\nline")).to_string();
        assert!(!message.contains('\u{1b}') && !message.contains('\n'), "{message:?}");
    }

    /// `demo-provider --ca BUNDLE` (a CA roll) serves with the bundle, and
    /// the files not typed stay those of `--tls-dir`.
    #[test]
    fn typed_files_replace_only_their_own() {
        let args = ConnectArgs {
            broker: String::new(),
            certs: None,
            member: None,
            ca: Some("/roll/bundle.pem".into()),
            cert: None,
            key: None,
        };
        let files = args.typed_over(member_files(Path::new("/tls"), "civil-status"));
        if std::env::var_os("LIENTHONG_CA").is_none() {
            assert_eq!(files.ca, Path::new("/roll/bundle.pem"));
        }
        assert_eq!(files.cert, Path::new("/tls/civil-status.pem"));
        assert_eq!(files.key, Path::new("/tls/civil-status.key"));
    }
}
