//! `wasmbassador webhook` as the API server meets it: the real binary, real TLS with a
//! certificate made at test time (the client verifies it against the test CA, under
//! the Service's DNS name), real AdmissionReview JSON. A pod that opts in gets a
//! JSONPatch that turns it into exactly what `inject` makes of it; others get none;
//! a labelled namespace injects by default; a bad opt-in value is refused; malformed
//! bodies get a 400 and the server goes on (and exits 0 on SIGTERM); a rotated
//! certificate reaches new handshakes without a restart, and a broken one is refused.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::mount::KubeletVolume;
use support::process::{Process, START_TIMEOUT, field};
use support::{CertFiles, Pki};
use wasmbassador::inject::{InjectOptions, inject_document};

const IMAGE: &str = "registry.example.com/wasmbassador:0.1.0";
/// The name the API server verifies: the Service's DNS name.
const SERVICE: &str = "wasmbassador-webhook.wasmbassador-system.svc";
/// A value that must never reach the log.
const SECRET: &str = "s3cr3t-password-in-env";

/// The webhook binary, serving `cert` and `key` on a free loopback port.
struct Webhook {
    process: Process,
    addr: SocketAddr,
}

impl Webhook {
    async fn start(cert: &Path, key: &Path) -> Webhook {
        let mut process = Process::spawn([
            "webhook".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--cert".as_ref(),
            cert.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
            "--image".as_ref(),
            IMAGE.as_ref(),
        ]);
        let line = process.wait_for_stderr("webhook listening", START_TIMEOUT).await;
        let addr = field(&line, "address")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Webhook { process, addr }
    }

    /// POSTs an AdmissionReview to `path`, trusting `ca`: (status, body).
    async fn post(&self, ca: &Pki, path: &str, body: impl Into<Bytes>) -> (u16, String) {
        let (status, body, _) = request(self.addr, ca, "POST", path, body.into())
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.process.output()));
        (status, body)
    }

    /// POSTs `review` and returns its `response`, requiring HTTP 200.
    async fn admit(&self, ca: &Pki, path: &str, review: &Value) -> Value {
        let (status, body) = self
            .post(ca, path, serde_json::to_vec(review).expect("json"))
            .await;
        assert_eq!(status, 200, "{path}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
        assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
        assert_eq!(
            answer["response"]["uid"], review["request"]["uid"],
            "the uid is echoed"
        );
        answer["response"].clone()
    }
}

/// One HTTPS request on a fresh connection (so a fresh handshake), verifying the
/// server's certificate for [`SERVICE`] against `ca`'s CA only. Returns the status,
/// the body and the certificate the server presented.
async fn request(
    addr: SocketAddr,
    ca: &Pki,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(u16, String, CertificateDer<'static>), String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).expect("CA PEM"))
        .expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SERVICE).expect("name"), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let presented = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, SERVICE)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("request");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            presented,
        ))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// A pod as the API server sends it for a ReplicaSet: no name yet, defaults filled in,
/// an owner, an environment with a secret value.
fn replica_pod(labels: Value, annotations: Value) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "orders-app-7d4b9c8f6-",
            "namespace": "shop",
            "creationTimestamp": null,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-app-7d4b9c8f6",
                "uid": "3f0c7a52-3e54-4a5e-9f42-1b2f0b8e2c11", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "initContainers": [{"name": "migrate", "image": "registry.example.com/orders-app:1.0", "args": ["migrate"], "resources": {}, "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
            "containers": [{
                "name": "app",
                "image": "registry.example.com/orders-app:1.0",
                "env": [{"name": "DATABASE_URL", "value": "postgres://orders@localhost:5432/orders"}, {"name": "DB_PASSWORD", "value": SECRET}],
                "resources": {},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 45,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

/// The AdmissionReview the API server sends for creating `pod` in namespace `shop`.
fn review(uid: &str, pod: &Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// Applies the base64 JSONPatch of `response` to `pod`.
fn apply(response: &Value, pod: &Value) -> Value {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("an RFC 6902 patch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies to the pod it was made for");
    patched
}

/// What `inject` makes of `pod`.
fn injected(pod: &Value, by_default: bool) -> Value {
    let mut want = pod.clone();
    let options = InjectOptions {
        image: IMAGE.into(),
        inject_by_default: by_default,
    };
    assert!(inject_document(&mut want, &options).expect("inject"));
    want
}

fn assert_no_patch(response: &Value, what: &str) {
    assert_eq!(response["allowed"], true, "{what}: {response}");
    assert!(response.get("patchType").is_none(), "{what}: {response}");
    assert!(response.get("patch").is_none(), "{what}: {response}");
}

fn opt_in(value: &str) -> Value {
    json!({"app.kubernetes.io/name": "orders-app", "wasmbassador.io/inject": value})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_pod_is_patched_into_exactly_what_inject_writes() {
    let pki = Pki::new();
    let cert = pki.server_cert(&[SERVICE]);
    let webhook = Webhook::start(&cert.cert, &cert.key).await;

    let pod = replica_pod(
        opt_in("true"),
        json!({"wasmbassador.io/plugins": "wasmbassador-plugins"}),
    );
    let response = webhook.admit(&pki, "/mutate", &review("6a1f-01", &pod)).await;
    let patched = apply(&response, &pod);
    assert_eq!(patched, injected(&pod, false));
    // The sidecar is first, before the app's own init container.
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "wasmbassador");
    assert_eq!(patched["spec"]["initContainers"][0]["image"], IMAGE);
    assert_eq!(patched["spec"]["initContainers"][1]["name"], "migrate");

    // A dry run is patched the same (the webhook has no side effects).
    let mut dry = review("6a1f-02", &pod);
    dry["request"]["dryRun"] = json!(true);
    assert_eq!(apply(&webhook.admit(&pki, "/mutate", &dry).await, &pod), patched);

    // Sent again (reinvocation), the injected pod needs no patch.
    let again = webhook.admit(&pki, "/mutate", &review("6a1f-03", &patched)).await;
    assert_no_patch(&again, "an injected pod");

    // The decision is logged with the namespace and pod, never the pod's contents.
    let mut process = webhook.process;
    let line = process.wait_for_stderr("uid=\"6a1f-01\"", START_TIMEOUT).await;
    assert!(line.contains("namespace=\"shop\""), "{line}");
    assert!(line.contains("pod=\"orders-app-7d4b9c8f6-*\""), "{line}");
    assert!(line.contains("decision=injected"), "{line}");
    assert!(!process.stderr().contains(SECRET), "{}", process.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pods_that_opt_in_or_live_in_a_labelled_namespace_are_patched() {
    let pki = Pki::new();
    let cert = pki.server_cert(&[SERVICE]);
    let webhook = Webhook::start(&cert.cert, &cert.key).await;
    let plain = replica_pod(json!({"app.kubernetes.io/name": "orders-app"}), json!({}));

    let response = webhook.admit(&pki, "/mutate", &review("n-1", &plain)).await;
    assert_no_patch(&response, "a pod without the label on /mutate");

    // The namespace opted in: its pods are injected unless they say "false".
    let response = webhook
        .admit(&pki, "/mutate-namespace", &review("n-2", &plain))
        .await;
    assert_eq!(apply(&response, &plain), injected(&plain, true));
    let opted_out = replica_pod(opt_in("false"), json!({}));
    let response = webhook
        .admit(&pki, "/mutate-namespace", &review("n-3", &opted_out))
        .await;
    assert_no_patch(&response, "a pod labelled \"false\" in a labelled namespace");
    let annotated_out = replica_pod(json!({}), json!({"wasmbassador.io/inject": "false"}));
    let response = webhook
        .admit(&pki, "/mutate-namespace", &review("n-4", &annotated_out))
        .await;
    assert_no_patch(&response, "a pod annotated \"false\" in a labelled namespace");

    // Other kinds pass unchanged, even on the namespace path.
    let mut config_map = review(
        "n-5",
        &json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x"}}),
    );
    config_map["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    let response = webhook.admit(&pki, "/mutate-namespace", &config_map).await;
    assert_no_patch(&response, "a ConfigMap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_answer_and_the_server_goes_on() {
    let pki = Pki::new();
    let cert = pki.server_cert(&[SERVICE]);
    let mut webhook = Webhook::start(&cert.cert, &cert.key).await;
    let good = review("b-ok", &replica_pod(opt_in("true"), json!({})));

    let cases: [(&str, Bytes, &str); 5] = [
        ("not JSON", Bytes::from_static(b"{\"apiVersion\": "), "not JSON"),
        ("a JSON array", Bytes::from_static(b"[1, 2]"), "expected apiVersion"),
        (
            "a v1beta1 review",
            Bytes::from(serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": good["request"]})).expect("json")),
            "admission.k8s.io/v1beta1",
        ),
        (
            "no request",
            Bytes::from_static(br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#),
            "request is missing",
        ),
        (
            "no uid",
            Bytes::from_static(br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"kind": {"kind": "Pod"}}}"#),
            "request.uid is missing",
        ),
    ];
    for (what, body, needle) in cases {
        let (status, text) = webhook.post(&pki, "/mutate", body).await;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text:?} should say {needle:?}");
        // Each is followed by a request that works.
        let response = webhook.admit(&pki, "/mutate", &good).await;
        assert_eq!(response["patchType"], "JSONPatch", "after {what}");
    }

    // The body is bounded.
    let huge = vec![b' '; wasmbassador::webhook::MAX_BODY + 1];
    let (status, text) = webhook.post(&pki, "/mutate", huge).await;
    assert_eq!(status, 413, "{text}");
    // Wrong method, unknown path, and the health check.
    let (status, _, _) = request(webhook.addr, &pki, "GET", "/mutate", Bytes::new())
        .await
        .expect("GET");
    assert_eq!(status, 405);
    let (status, text, _) = request(webhook.addr, &pki, "POST", "/validate", Bytes::new())
        .await
        .expect("POST");
    assert_eq!(status, 404, "{text}");
    let (status, text, _) = request(webhook.addr, &pki, "GET", "/healthz", Bytes::new())
        .await
        .expect("GET");
    assert_eq!((status, text.as_str()), (200, "ok\n"));

    // A bad opt-in value is refused, with a message naming it.
    let yes = replica_pod(json!({}), json!({"wasmbassador.io/inject": "yes"}));
    let response = webhook.admit(&pki, "/mutate", &review("b-yes", &yes)).await;
    assert_eq!(response["allowed"], false, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    let message = response["status"]["message"].as_str().expect("a message");
    assert!(
        message.contains("wasmbassador.io/inject") && message.contains("\"yes\""),
        "{message}"
    );
    webhook
        .process
        .wait_for_stderr("uid=\"b-yes\"", START_TIMEOUT)
        .await;

    let response = webhook.admit(&pki, "/mutate", &good).await;
    assert_eq!(response["patchType"], "JSONPatch", "still serving at the end");

    // SIGTERM (pod deletion) ends it cleanly.
    webhook.process.signal("TERM");
    let status = webhook.process.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}\n{}", webhook.process.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_verified_and_a_rotated_one_reaches_new_handshakes() {
    let first_ca = Pki::new();
    let second_ca = Pki::other();
    let first = first_ca.server_cert(&[SERVICE]);
    let second = second_ca.server_cert(&[SERVICE]);
    // The Secret mounted as a folder, as cert-manager's Secret reaches the pod.
    let dir = tempfile::tempdir().expect("mount folder");
    let mut secret = KubeletVolume::create(dir.path(), "..2026_11_22_10_00_00.000000001", &pair(&first));
    let mut webhook = Webhook::start(&secret.file("tls.crt"), &secret.file("tls.key")).await;
    let addr = webhook.addr;
    let health = async |ca: &Pki| request(addr, ca, "GET", "/healthz", Bytes::new()).await;

    let (status, _, presented) = health(&first_ca).await.expect("the first CA is trusted");
    assert_eq!(status, 200);
    assert_eq!(presented.as_ref(), der(&first).as_ref());
    // The client really verifies: a client trusting another CA is refused.
    let err = health(&second_ca).await.expect_err("an unknown issuer");
    assert!(err.contains("TLS handshake"), "{err}");

    // cert-manager renews the Secret; the kubelet swaps ..data. New handshakes see the
    // new certificate without a restart.
    secret.update("..2026_11_22_10_05_00.000000002", &pair(&second));
    let deadline = Instant::now() + Duration::from_secs(20);
    let presented = loop {
        match health(&second_ca).await {
            Ok((200, _, presented)) => break presented,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!(
                "the rotated certificate was not served: {other:?}\n{}",
                webhook.process.output()
            ),
        }
    };
    assert_eq!(presented.as_ref(), der(&second).as_ref());
    assert!(health(&first_ca).await.is_err(), "the old certificate is gone");
    webhook
        .process
        .wait_for_stderr("webhook certificate changed", START_TIMEOUT)
        .await;

    // A broken pair (a key that belongs to another certificate) is refused with a log
    // line, and the working certificate goes on serving.
    let stray = second_ca.server_cert(&[SERVICE]);
    let broken = [("tls.crt", read(&first.cert)), ("tls.key", read(&stray.key))];
    secret.update("..2026_11_22_10_10_00.000000003", &broken);
    let line = webhook
        .process
        .wait_for_stderr("cannot be used", START_TIMEOUT)
        .await;
    assert!(line.contains("tls.crt"), "the log line names the files: {line}");
    let (status, _, presented) = health(&second_ca).await.expect("still served");
    assert_eq!(status, 200);
    assert_eq!(presented.as_ref(), der(&second).as_ref());
}

/// `tls.crt` and `tls.key` of a `kubernetes.io/tls` Secret.
fn pair(files: &CertFiles) -> [(&'static str, Vec<u8>); 2] {
    [("tls.crt", read(&files.cert)), ("tls.key", read(&files.key))]
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn der(files: &CertFiles) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(&files.cert).expect("certificate PEM")
}
