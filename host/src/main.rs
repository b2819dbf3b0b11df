//! The `wasmbassador` command: parse the CLI, set up logging, load the config and
//! wait for signals. Everything else lives in the library.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use wasmbassador::{Ambassador, Config, demo, reload};

#[derive(Parser)]
#[command(
    name = "wasmbassador",
    version,
    about = "An embeddable, WASM-extensible ambassador sidecar"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    /// Threads that serve connections, each with its own event loop (a connection stays
    /// on one thread). By default as many as the CPUs this process may use; a sidecar
    /// that shares its pod's cores with the app may do better with fewer.
    #[arg(long, env = "WASMBASSADOR_WORKERS", global = true)]
    workers: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run with a config file; reloads it on change or SIGHUP, drains on SIGTERM.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and report every problem; exits 1 if there is any.
    Validate {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Everything in one process: a local TLS upstream and a listener in front of it.
    Demo {
        /// Where the demo listener accepts plain text.
        #[arg(long, default_value = "127.0.0.1:15432")]
        listen: SocketAddr,
        /// Where the admin server listens.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Folder with the built ready-made plugins (`allow_list.wasm`, `access_log.wasm`);
        /// by default plugins/target/wasm32-wasip2/release under the current folder.
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Ask the admin server of a running wasmbassador (on loopback) for its startup,
    /// readiness or liveness: exit 0 on HTTP 200, 1 otherwise, with one line of output.
    /// Made for Kubernetes exec probes, so that admin can stay on 127.0.0.1.
    Probe {
        /// Which endpoint: `startup`, `ready` or `healthz`.
        #[arg(value_enum)]
        probe: ProbeKind,
        /// The admin address; by default `admin.listen` of `--config`, else 127.0.0.1:9901.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// The config file to read `admin.listen` from.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Add the wasmbassador native sidecar to Kubernetes YAML (Pod, Deployment,
    /// StatefulSet, DaemonSet, Job, CronJob) whose pod template carries the annotation
    /// `wasmbassador.io/inject: "true"`; writes the result to stdout. Other documents
    /// pass through unchanged; injecting twice changes nothing.
    Inject {
        /// The YAML file; `-` or nothing reads stdin.
        file: Option<PathBuf>,
        /// The sidecar image for pods that do not name one (`wasmbassador.io/image`).
        #[arg(long)]
        image: Option<String>,
    },
    /// Serve the mutating admission webhook (AdmissionReview v1 over TLS) that adds the
    /// sidecar to new pods: `POST /mutate` for pods labelled `wasmbassador.io/inject:
    /// "true"`, `POST /mutate-namespace` for pods of a labelled namespace (injected
    /// unless they say "false"), `GET /healthz`. The certificate files are re-read
    /// when they change. Stops on SIGTERM after answering requests under way.
    Webhook {
        /// Where to accept HTTPS.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// The serving certificate (PEM, leaf first), e.g. `tls.crt` of a cert-manager Secret.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM), e.g. `tls.key`.
        #[arg(long)]
        key: PathBuf,
        /// The sidecar image for pods that do not name one (`wasmbassador.io/image`).
        #[arg(long)]
        image: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProbeKind {
    Startup,
    Ready,
    Healthz,
}

/// `wasmbassador probe`: blocking and one-shot, so it runs before any runtime starts.
fn probe(
    kind: ProbeKind,
    admin: Option<SocketAddr>,
    config: Option<PathBuf>,
    timeout: std::time::Duration,
) -> ExitCode {
    use wasmbassador::probe::{self, Probe};
    let kind = match kind {
        ProbeKind::Startup => Probe::Startup,
        ProbeKind::Ready => Probe::Ready,
        ProbeKind::Healthz => Probe::Healthz,
    };
    let result =
        probe::admin_address(admin, config.as_deref()).and_then(|addr| probe::check(kind, addr, timeout));
    match result {
        Ok(message) => {
            println!("{}: {message}", kind.path());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}: {e}", kind.path());
            ExitCode::FAILURE
        }
    }
}

/// Log lines are formatted on the thread that logs and written to stderr by a thread of
/// their own, in batches (`wasmbassador::logs`): a connection thread never waits on a
/// slow stderr pipe, and under load (an access-log plugin writes a line per connection)
/// many lines share one write instead of a wake-up and a system call each. Lossless:
/// when 8 MiB wait, the loggers wait too. The guard writes what is left when dropped.
fn init_logs(format: LogFormat) -> anyhow::Result<wasmbassador::logs::FlushGuard> {
    let (writer, guard) =
        wasmbassador::logs::batched(std::io::stderr()).context("cannot start the log writer thread")?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and `kubectl logs` get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        // Same lines as the default field formatter, escaped in runs (`logs::Fields`).
        LogFormat::Human => builder.fmt_fields(wasmbassador::logs::Fields).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(guard)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Probe {
        probe: kind,
        admin,
        config,
        timeout,
    } = cli.command
    {
        return probe(kind, admin, config, timeout);
    }
    let logs = match init_logs(cli.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // This runtime runs the control side (admin, reloads, health checks, accepting);
    // connections run on the ambassador's connection threads (`crate::workers`).
    let threads = cli
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN));
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config, threads).await,
            Command::Validate { config } => validate(&config),
            Command::Demo {
                listen,
                admin,
                plugins,
            } => run_demo(listen, admin, plugins, threads).await,
            Command::Probe { .. } => unreachable!("handled before the runtime starts"),
            Command::Inject { file, image } => inject(file, image),
            Command::Webhook {
                listen,
                cert,
                key,
                image,
            } => webhook(listen, cert, key, image).await,
        }
    });
    // The log lines still queued go out before the final error line.
    drop(logs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn inject(file: Option<PathBuf>, image: Option<String>) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let (name, text) = match file.filter(|f| f.as_os_str() != "-") {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
            ("stdin".to_string(), text)
        }
    };
    let mut options = wasmbassador::inject::InjectOptions::default();
    if let Some(image) = image {
        options.image = image;
    }
    let out = wasmbassador::inject::inject_stream(&text, &options).with_context(|| name.clone())?;
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("cannot write stdout")?;
    Ok(())
}

async fn webhook(
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    image: Option<String>,
) -> anyhow::Result<()> {
    let mut options = wasmbassador::inject::InjectOptions::default();
    if let Some(image) = image {
        options.image = image;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    };
    let settings = wasmbassador::webhook::Settings { cert, key, options };
    wasmbassador::webhook::serve(listener, settings, shutdown)
        .await
        .context("webhook")?;
    Ok(())
}

fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    for u in &config.upstreams {
        if let Some(tls) = &u.tls {
            wasmbassador::tls::TlsClient::new(tls).with_context(|| format!("upstream {:?}", u.name))?;
        }
    }
    // Every plugin is compiled, checked against the world and initialised with its
    // config, exactly as `run` would; all failures are reported, not just the first.
    let metrics = std::sync::Arc::new(wasmbassador::metrics::Metrics::new());
    let shared = wasmbassador::plugin::PluginShared {
        plugin_metrics: metrics.plugin_metrics.clone(),
        metrics,
    };
    let failed: Vec<String> = config
        .plugins
        .iter()
        .filter_map(|p| wasmbassador::plugin::load_slot(p, &shared, None).err())
        .map(|e| e.to_string())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "{}: {} plugin(s) refused\n  {}",
            path.display(),
            failed.len(),
            failed.join("\n  ")
        );
    }
    println!(
        "{}: ok ({} listener(s), {} upstream(s), {} plugin(s))",
        path.display(),
        config.listeners.len(),
        config.upstreams.len(),
        config.plugins.len()
    );
    Ok(())
}

async fn run(path: PathBuf, threads: NonZeroUsize) -> anyhow::Result<()> {
    let mut last_text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = Config::parse_and_check_files(&last_text, &path.display().to_string())?;
    let ambassador = Ambassador::start_with_threads(config, Some(threads)).await?;
    let (_watcher, mut changes) = reload::watch(&path).context("cannot watch the config folder")?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break; }
            _ = int.recv() => { tracing::info!("SIGINT"); break; }
            _ = hup.recv() => { reload::reload_file(&ambassador, &path, &mut last_text, true).await; }
            Some(()) = changes.recv() => { reload::reload_file(&ambassador, &path, &mut last_text, false).await; }
        }
    }
    ambassador.shutdown().await;
    Ok(())
}

async fn run_demo(
    listen: SocketAddr,
    admin: SocketAddr,
    plugins: Option<PathBuf>,
    threads: NonZeroUsize,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("wasmbassador-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (chain, key) = demo::make_pki(&dir).context("making demo certificates")?;
    let upstream = demo::start_upstream(chain, key).await?;
    // Fixed ports make the printed commands stable; fall back to free ones if taken.
    let listen = free_or_any(listen).await;
    let admin = free_or_any(admin).await;
    let plugins = plugins.unwrap_or_else(|| PathBuf::from("plugins/target/wasm32-wasip2/release"));
    let plugins = demo::PLUGINS
        .iter()
        .all(|p| plugins.join(p).is_file())
        .then_some(plugins);
    let config = demo::config(
        listen,
        admin,
        upstream.addr,
        &dir.join("ca.pem"),
        plugins.as_deref(),
    )?;
    let ambassador = Ambassador::start_with_threads(config, Some(threads)).await?;
    let listen = ambassador.listener_addr("demo").unwrap_or(listen);
    let admin = ambassador.admin_addr();
    println!(
        "\nwasmbassador demo is running.\n\
         \n  upstream  https://{up} (TLS only; certificate for {name}, CA made just now)\
         \n  listener  {listen} (plain text) -> upstream \"demo-https\" over verified TLS\
         \n  admin     http://{admin}\n\
         \nTry, in another terminal:\
         \n  curl http://{listen}/                       # the upstream answers, over TLS\
         \n  curl http://{admin}/upstreams               # endpoint health\
         \n  curl -s http://{admin}/metrics | grep listener_bytes\n\
         \n{plugin_note}\
         \nCtrl-C stops the demo.\n",
        up = upstream.addr,
        name = demo::DEMO_SERVER_NAME,
        plugin_note = match &plugins {
            Some(dir) => format!(
                "  plugins   allow-list (clients in 127.0.0.0/8) and access-log, from {}:\
                 \n            every connection logs an access line; see also http://{admin}/plugins\n",
                dir.display()
            ),
            None => "  plugins   none loaded: build them first with\
                     \n            cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release\n"
                .to_string(),
        },
    );
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    ambassador.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn free_or_any(addr: SocketAddr) -> SocketAddr {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}
