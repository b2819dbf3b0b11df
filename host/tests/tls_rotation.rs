//! Certificate rotation: a Kubernetes Secret mount swaps the client certificate and
//! key files under a running ambassador; new connections use the new files without a
//! restart, and a half-written rotation never replaces a working certificate.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{CertFiles, Pki, Redis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmbassador::{Ambassador, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_certificate_is_picked_up_without_restart() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    // The first certificate comes from a CA that Redis does not trust.
    let other_ca = Pki::other();
    let stranger = other_ca.client_cert("app");
    let good = pki.client_cert("app");
    let mount = tempfile::tempdir().expect("temp dir for the secret mount");
    install(mount.path(), &stranger);

    let config = Config::parse(
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
[[listener]]
name = "cache"
listen = "127.0.0.1:0"
upstream = "redis"
[[upstream]]
name = "redis"
retry = {{ attempts = 1 }}
tls = {{ ca = "{ca}", server_name = "localhost", client_cert = "{dir}/tls.crt", client_key = "{dir}/tls.key" }}
endpoint = [{{ address = "127.0.0.1:{port}" }}]
"#,
            ca = pki.ca_pem_path().display(),
            dir = mount.path().display(),
            port = redis.tls_port(),
        ),
        "rotation",
    )
    .expect("config");
    let ambassador = Ambassador::start(config).await.expect("start");
    let listener = ambassador.listener_addr("cache").expect("listener address");

    assert_eq!(
        ping(listener).await,
        None,
        "Redis must refuse a certificate from an unknown CA"
    );

    install(mount.path(), &good);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut answer = None;
    while answer.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = ping(listener).await;
    }
    assert_eq!(
        answer.as_deref(),
        Some("+PONG"),
        "the rotated certificate was not picked up"
    );

    // A rotation that leaves a broken key behind is refused; the working
    // certificate stays in use.
    std::fs::write(mount.path().join("tls.key"), "not a key").expect("write broken key");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        assert_eq!(ping(listener).await.as_deref(), Some("+PONG"));
    }
    ambassador.shutdown().await;
}

/// Writes the pair the way a Secret update lands: new files renamed into place.
fn install(dir: &Path, files: &CertFiles) {
    for (src, name) in [(&files.cert, "tls.crt"), (&files.key, "tls.key")] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::copy(src, &tmp).expect("copy certificate file");
        std::fs::rename(&tmp, dir.join(name)).expect("rename certificate file into place");
    }
}

/// Sends PING through the ambassador; `None` when the connection is closed instead.
async fn ping(addr: std::net::SocketAddr) -> Option<String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}
