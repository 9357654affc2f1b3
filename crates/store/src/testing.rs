//! A throwaway PostgreSQL server for tests (feature `testing`).
//!
//! [`PgCluster::start`] runs `initdb` and `pg_ctl` from the PostgreSQL server
//! binaries (on `PATH` or under `/usr/lib/postgresql/<version>/bin`) in a
//! temporary directory, listening on 127.0.0.1 only. As root (CI), the server
//! runs as the `postgres` system user, since PostgreSQL refuses to run as root.
//! Missing binaries are an error, never a silent skip.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const INSTALL_HINT: &str = "install the PostgreSQL server binaries, e.g. `apt-get install postgresql`";

/// A PostgreSQL server in a temporary directory; torn down on drop.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl PgCluster {
    /// Creates and starts a fresh cluster on a free port of 127.0.0.1 with
    /// trust authentication for user `lienthong`.
    pub fn start() -> io::Result<PgCluster> {
        let bin = find_bin_dir().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or under /usr/lib/postgresql/*/bin: {INSTALL_HINT}"),
            )
        })?;
        let as_postgres_user = effective_uid_is_root();
        let dir = tempfile::Builder::new().prefix("lienthong-pg-").tempdir()?;
        if as_postgres_user {
            let chown = Command::new("chown").arg("postgres:").arg(dir.path()).output()?;
            check(
                &chown,
                "chown the cluster directory to the postgres user (running as root needs the `postgres` system user, which the postgresql package creates)",
            )?;
        }
        let mut cluster = PgCluster {
            dir,
            bin,
            port: 0,
            as_postgres_user,
        };
        let data = cluster.data_dir();
        let initdb = cluster
            .pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "lienthong", "-E", "UTF8", "--no-sync"])
            .output()?;
        check(&initdb, "initdb")?;
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.configure()?;
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.spawn_watchdog();
                    return Ok(cluster);
                }
                // Another process took the port between our probe and the bind: try another.
                Err(e) if cluster.server_log().contains("already in use") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("could not start PostgreSQL on a free port")))
    }

    /// One cluster per test binary, started on first use.
    pub fn shared() -> io::Result<&'static PgCluster> {
        static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| PgCluster::start().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))
    }

    /// URL of the `postgres` database as user `lienthong`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// URL of database `name` on this cluster.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://lienthong@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database and returns its URL (one per test keeps
    /// tests isolated on a shared cluster).
    pub async fn create_database(&self) -> io::Result<String> {
        use sqlx::Connection;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut conn = sqlx::PgConnection::connect(&self.url())
            .await
            .map_err(io::Error::other)?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .map_err(io::Error::other)?;
        conn.close().await.map_err(io::Error::other)?;
        Ok(self.database_url(&name))
    }

    /// Serves TLS with `cert_pem` and `key_pem` (the server's certificate
    /// chain and key) from now on, for clients that ask for it; reloaded
    /// without a restart.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let data = self.data_dir();
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            // PostgreSQL refuses a key others can read.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(text.as_bytes())?;
            if self.as_postgres_user {
                let chown = Command::new("chown").arg("postgres:").arg(&path).output()?;
                check(&chown, "chown the server's TLS files to the postgres user")?;
            }
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?
            .write_all(b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")?;
        let out = self.pg_command("pg_ctl").arg("-D").arg(&data).arg("reload").output()?;
        check(&out, "pg_ctl reload")
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping its data, to simulate an outage.
    pub fn stop(&self) -> io::Result<()> {
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"])
            .output()?;
        check(&out, "pg_ctl stop")
    }

    /// Starts the server again after [`PgCluster::stop`], on the same port.
    pub fn restart(&self) -> io::Result<()> {
        self.pg_ctl_start()
    }

    /// Freezes the server and every backend (`SIGSTOP`): connections stay
    /// open and queries go unanswered, as with a database host that hangs.
    pub fn freeze(&self) -> io::Result<()> {
        self.signal_all("STOP")
    }

    /// Lets a [`PgCluster::freeze`]d server run again (`SIGCONT`).
    pub fn thaw(&self) -> io::Result<()> {
        self.signal_all("CONT")
    }

    /// Sends `signal` to the postmaster and each of its children.
    fn signal_all(&self, signal: &str) -> io::Result<()> {
        let pid_file = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))?;
        let postmaster = pid_file
            .lines()
            .next()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| io::Error::other("postmaster.pid names no process"))?
            .to_owned();
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        // The shell's builtin `kill`: no procps needed on a minimal machine.
        let out = Command::new("sh")
            .args(["-c", &format!("kill -{signal} \"$@\""), "kill"])
            .args(&pids)
            .output()?;
        check(&out, "kill")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    fn configure(&self) -> io::Result<()> {
        use std::io::Write;
        let socket_dir = self.dir.path().display().to_string().replace('\'', "''");
        // Later lines win, so a retry on another port just appends.
        let settings = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{socket_dir}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n",
            self.port
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))?
            .write_all(settings.as_bytes())
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "60", "start"])
            .output()?;
        check(&out, "pg_ctl start").map_err(|e| io::Error::other(format!("{e}\nserver log:\n{}", self.server_log())))
    }

    /// A command running PostgreSQL program `program`, as `postgres` when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // The postgres user may not be allowed into the caller's directory.
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// Statics are never dropped: a detached shell stops the server and removes
    /// the directory once this process is gone (or exits when `Drop` did it).
    fn spawn_watchdog(&self) {
        let script = r#"while kill -0 "$1" 2>/dev/null && [ -d "$3" ]; do sleep 1; done
if [ -d "$3" ]; then
  if [ "$5" = yes ]; then runuser -u postgres -- "$4" stop -D "$3" -m immediate; else "$4" stop -D "$3" -m immediate; fi
  rm -rf "$2"
fi"#;
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(self.dir.path())
            .arg(self.data_dir())
            .arg(self.bin.join("pg_ctl"))
            .arg(if self.as_postgres_user { "yes" } else { "no" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            eprintln!("cannot start the PostgreSQL watchdog ({e}); the test server may outlive the tests");
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        // `TempDir` removes the directory after this.
    }
}

fn check(out: &Output, what: &str) -> io::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|p| dir.join(p).is_file())
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_server_binaries(d))
    {
        return Some(dir);
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let entry = e.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

/// Reads the effective uid from `/proc/self/status` (no libc, no unsafe).
fn effective_uid_is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}
