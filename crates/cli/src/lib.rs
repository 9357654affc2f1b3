//! The `lienthong` command line: serve, demo, certificates, administration,
//! lookups, audit and benchmarks. The binary is `src/main.rs`; this library
//! holds the pieces the end-to-end tests reuse (the in-process federation).
#![forbid(unsafe_code)]

pub mod bare;
pub mod bench;
pub mod client;
pub mod commands;
pub mod demo;
pub mod federation;

/// Domain role to wire role.
pub fn convert_role(r: lienthong_core::Role) -> lienthong::v1::Role {
    use lienthong::v1::Role as P;
    use lienthong_core::Role as D;
    match r {
        D::Admin => P::Admin,
        D::Provider => P::Provider,
        D::Consumer => P::Consumer,
        D::Integrator => P::Integrator,
        D::Auditor => P::Auditor,
        D::SubjectPortal => P::SubjectPortal,
    }
}

/// An error and its causes on one line, outermost first, as `{:#}` writes
/// them, but without a cause its outer message already ends with: many
/// errors (thiserror's `#[from]`, or a `{source}` in the message) print their
/// cause themselves and also name it as their source.
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal sent as soon as
/// the caller has said it is ready is not lost (it would kill the process).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP, each time it arrives: `lienthong serve` then reloads its TLS files.
/// The handler is installed when this is made, so a SIGHUP no longer ends the
/// process from then on. Never arrives on systems without SIGHUP.
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Installs the handler (within a Tokio runtime).
    pub fn new() -> Hangups {
        Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Resolves at the next SIGHUP.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.signal.as_mut()
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Hangups::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names its cause in its message and as its source, as thiserror's
    /// `#[from]` does.
    #[derive(Debug)]
    struct Io {
        source: std::io::Error,
    }

    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot access ca.pem: {}", self.source)
        }
    }

    impl std::error::Error for Io {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn error_text_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let error = anyhow::Error::new(Io { source: io }).context("loading client certificate ca.pem");
        assert_eq!(
            error_text(&error),
            "loading client certificate ca.pem: cannot access ca.pem: No such file or directory"
        );
        let plain = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_text(&plain), "outer: middle: inner");
    }
}
