//! wasmbassador inside your own tokio program.
//!
//! The configuration is built in code (no file): one `tcp` listener on a local port in
//! front of an upstream given on the command line, optionally over verified TLS. The
//! program prints the bound address and runs until its shutdown future resolves —
//! Ctrl-C, or `--for SECS` — then drains and returns.
//!
//! ```text
//! cargo run -p wasmbassador-embed-example -- UPSTREAM_HOST:PORT \
//!     [--listen 127.0.0.1:0] [--ca ca.pem [--server-name NAME]] [--for SECS]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use wasmbassador::Ambassador;
use wasmbassador::config::{
    AdminConfig, Config, EndpointConfig, ListenerConfig, Protocol, TlsConfig, UpstreamConfig,
};

const USAGE: &str = "usage: wasmbassador-embed-example UPSTREAM_HOST:PORT \
                     [--listen ADDR] [--ca FILE [--server-name NAME]] [--for SECS]";

/// What the command line asked for.
struct Args {
    upstream: String,
    listen: String,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    run_for: Option<Duration>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        upstream: String::new(),
        listen: "127.0.0.1:0".into(),
        ca: None,
        server_name: None,
        run_for: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => parsed.listen = value("--listen")?,
            "--ca" => parsed.ca = Some(value("--ca")?.into()),
            "--server-name" => parsed.server_name = Some(value("--server-name")?),
            "--for" => {
                let secs: f64 = value("--for")?
                    .parse()
                    .map_err(|_| "--for takes a number of seconds".to_string())?;
                parsed.run_for = Some(Duration::try_from_secs_f64(secs).map_err(|e| format!("--for: {e}"))?);
            }
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            upstream if parsed.upstream.is_empty() => parsed.upstream = upstream.to_string(),
            extra => return Err(format!("unexpected argument {extra:?}")),
        }
    }
    if parsed.upstream.is_empty() {
        return Err("the upstream address is required".into());
    }
    Ok(parsed)
}

/// The whole configuration as a value: what a TOML file would say, built in code.
fn config(args: &Args) -> Config {
    let tls = args.ca.as_ref().map(|ca| TlsConfig {
        ca: Some(ca.clone()),
        roots: None,
        server_name: args.server_name.clone(),
        client_cert: None,
        client_key: None,
        postgres: Default::default(),
        insecure_skip_verify: false,
    });
    Config {
        admin: AdminConfig {
            // Port 0: a free port, so that this never clashes with a sidecar.
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_timeout: Duration::from_secs(5),
            ..AdminConfig::default()
        },
        listeners: vec![ListenerConfig {
            name: "local".into(),
            listen: args.listen.clone(),
            protocol: Protocol::Tcp,
            upstream: "remote".into(),
            plugins: Vec::new(),
            max_connections: 1_000,
            idle_timeout: Some(Duration::from_secs(600)),
            request_timeout: None,
        }],
        upstreams: vec![UpstreamConfig {
            name: "remote".into(),
            connect_timeout: Duration::from_secs(2),
            retry: Default::default(),
            health: Default::default(),
            eject: Default::default(),
            tls,
            http: Default::default(),
            endpoint: vec![EndpointConfig {
                address: args.upstream.clone(),
                priority: 0,
                weight: 1,
                tags: Vec::new(),
            }],
        }],
        plugins: Vec::new(),
    }
}

/// Resolves on Ctrl-C, or after `run_for` when given.
async fn shutdown_signal(run_for: Option<Duration>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match run_for {
        Some(limit) => tokio::select! {
            _ = ctrl_c => {}
            _ = tokio::time::sleep(limit) => {}
        },
        None => ctrl_c.await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The library logs through `tracing`; the host program decides where logs go.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    // `wasmbassador::run(config, shutdown)` does start + wait + drain in one call;
    // `Ambassador` is used here to learn the bound address first.
    let ambassador = match Ambassador::start(config(&args)).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match ambassador.listener_addr("local") {
        Some(addr) => println!("listening on {addr} -> {}", args.upstream),
        None => println!("listening -> {}", args.upstream),
    }
    println!("admin on http://{}/metrics", ambassador.admin_addr());

    shutdown_signal(args.run_for).await;
    ambassador.shutdown().await;
    println!("stopped");
    ExitCode::SUCCESS
}
