//! The `wasmbassador` binary as a child process of a test: start it, read its stdout
//! and stderr as they come, ask its admin server, send it signals, wait for its exit.
//!
//! Unlike the rest of `support`, the waiting helpers here are async (tokio), because
//! the tests that drive the binary also hold database sessions whose connection
//! tasks must keep running while the test waits.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The binary under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_wasmbassador");

/// How long the binary may take to start and bind (generous: the machine is shared).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `wasmbassador` process owned by the test; killed (by its own PID) on
/// drop if it is still running.
pub struct Process {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    admin: Option<SocketAddr>,
}

impl Process {
    /// Starts the binary with `args`, stdout and stderr captured.
    pub fn spawn<I, S>(args: I) -> Process
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {BIN}: {e}"));
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        Process {
            child,
            stdout,
            stderr,
            admin: None,
        }
    }

    /// Runs `wasmbassador run --config <config>` and waits until its admin server
    /// listens (the config should say `[admin] listen = "127.0.0.1:0"`; the address
    /// is read from the startup log line).
    pub async fn run(config: &Path) -> Process {
        let mut p = Process::spawn([OsStr::new("run"), OsStr::new("--config"), config.as_os_str()]);
        let line = p.wait_for_stderr("admin listening", START_TIMEOUT).await;
        let addr = field(&line, "address")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in the startup line: {line}"));
        p.admin = Some(addr);
        p
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin server's address (only after [`Process::run`]).
    pub fn admin(&self) -> SocketAddr {
        self.admin
            .expect("admin address: start the process with Process::run")
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Everything the process wrote to stderr (its logs) so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until a stderr line contains `needle` and returns that line; panics with
    /// the whole stderr if the process exits first or `timeout` passes.
    pub async fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let stderr = self.stderr.clone();
        self.wait_for_line(&stderr, "stderr", needle, timeout).await
    }

    /// Like [`Process::wait_for_stderr`], for stdout.
    pub async fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> String {
        let stdout = self.stdout.clone();
        self.wait_for_line(&stdout, "stdout", needle, timeout).await
    }

    async fn wait_for_line(
        &mut self,
        buf: &Mutex<String>,
        what: &str,
        needle: &str,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = buf
                .lock()
                .ok()
                .and_then(|s| s.lines().find(|l| l.contains(needle)).map(str::to_string));
            if let Some(line) = found {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "wasmbassador exited ({status}) before its {what} said {needle:?}\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "wasmbassador's {what} did not say {needle:?} within {timeout:?}\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (`TERM`, `HUP`, ...) to this process only, with `kill -SIG PID`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|e| panic!("running kill -{signal}: {e}"));
        assert!(status.success(), "kill -{signal} {} failed: {status}", self.pid());
    }

    /// Waits for the process to exit; panics with its output after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    // Let the reader threads take the last lines.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return status;
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Ok(None) => panic!("wasmbassador did not exit within {timeout:?}\n{}", self.output()),
                Err(e) => panic!("waiting for wasmbassador: {e}"),
            }
        }
    }

    /// stdout and stderr so far, labelled, for panic messages.
    pub fn output(&self) -> String {
        format!(
            "--- wasmbassador stdout ---\n{}\n--- wasmbassador stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// `GET path` on the admin server: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin(), path).await
    }

    /// The current value of one sample in `/metrics`, such as
    /// `wasmbassador_config_reloads_total{result="failure"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        metric_value(&body, sample)
    }

    /// The bound address of listener `name` according to `/listeners`, if it exists.
    pub async fn listener(&self, name: &str) -> Option<SocketAddr> {
        let (status, body) = self.get("/listeners").await;
        assert_eq!(status, 200, "/listeners: {body}");
        let list: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("/listeners is not JSON ({e}): {body}"));
        list.as_array()?
            .iter()
            .find(|l| l["name"] == name)
            .and_then(|l| l["listen"].as_str()?.parse().ok())
    }

    /// Polls `/listeners` until listener `name` exists (up to `timeout`).
    pub async fn wait_listener(&self, name: &str, timeout: Duration) -> SocketAddr {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(addr) = self.listener(name).await {
                return addr;
            }
            if Instant::now() >= deadline {
                panic!(
                    "listener {name:?} did not appear in /listeners within {timeout:?}\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `/metrics` until `sample` is above `than` (up to `timeout`); returns it.
    pub async fn wait_metric_above(&self, sample: &str, than: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(sample).await;
            if v > than {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{sample} stayed at {v} (not above {than}) for {timeout:?}\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to this child's own PID only.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Reads `pipe` line by line on a thread into a shared string.
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let out = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut b) = out.lock() {
                b.push_str(&line);
                b.push('\n');
            }
        }
    });
    buf
}

/// The value of `name=value` in a human-format log line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    line[at..].split_whitespace().next()
}

/// `GET path` with HTTP/1.1 over a fresh TCP connection: (status, body). Panics
/// when nothing answers within 10 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        sock.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        sock.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET http://{addr}{path}: not an HTTP response: {raw:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET http://{addr}{path}: no status in {head:?}"));
    (status, body.to_string())
}

/// The value of the sample `sample` (name and labels exactly as exported) in a
/// Prometheus/OpenMetrics text body; 0 when absent.
pub fn metric_value(body: &str, sample: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Whether a TCP connection to `addr` is refused now (nothing listens).
pub async fn refused(addr: SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => false,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Polls until connections to `addr` are refused (up to `timeout`); panics otherwise.
pub async fn wait_refused(addr: SocketAddr, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while !refused(addr).await {
        if Instant::now() >= deadline {
            panic!("{what}: {addr} still accepts connections after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
