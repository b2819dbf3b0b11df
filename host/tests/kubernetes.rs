//! The Kubernetes examples as a user applies them: every document is a valid typed
//! object with no misspelt field, the sidecar is a native sidecar whose probes ask the
//! admin address its mounted config names, every volume and ConfigMap resolves, the
//! plugin folder updates (no `subPath`), the plugin ConfigMap holds real components
//! within the 1 MiB limit, and the config inside the ConfigMap passes `validate`.
//! The checks themselves are shown to catch each mistake they are there for.

mod k8s;
mod support;

use std::path::PathBuf;

use k8s::{Doc, Object};

fn examples() -> PathBuf {
    support::plugins::repo().join("examples/kubernetes")
}

/// Every document of every YAML file in examples/kubernetes (not its subfolders).
fn example_docs() -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in k8s::yaml_files(&examples()) {
        let text = std::fs::read_to_string(&file).expect("read example");
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        docs.extend(k8s::parse(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    docs
}

fn kinds(docs: &[Doc]) -> Vec<&'static str> {
    docs.iter()
        .map(|d| match d.object {
            Object::ConfigMap(_) => "ConfigMap",
            Object::Secret(_) => "Secret",
            Object::Deployment(_) => "Deployment",
            Object::Job(_) => "Job",
            _ => "other",
        })
        .collect()
}

#[test]
fn every_document_parses_strictly_into_typed_objects() {
    let docs = example_docs();
    let kinds = kinds(&docs);
    for wanted in ["Deployment", "Job", "ConfigMap", "Secret"] {
        assert!(
            kinds.contains(&wanted),
            "examples/kubernetes has no {wanted}: {kinds:?}"
        );
    }
    // The strict parse is what catches a misspelt field: k8s-openapi (like a lenient
    // API server) would drop it silently and the pod would run without it.
    let text = std::fs::read_to_string(examples().join("deployment.yaml")).expect("read");
    let typo = text.replacen(
        "          restartPolicy: Always",
        "          restartPolcy: Always",
        1,
    );
    let err = k8s::parse("deployment.yaml", &typo).expect_err("a misspelt field is an error");
    assert!(
        err.contains("spec.template.spec.initContainers[0].restartPolcy"),
        "the error names the field's path: {err}"
    );
    let wrong_type = text.replacen("periodSeconds: 1\n", "periodSeconds: soon\n", 1);
    let err = k8s::parse("deployment.yaml", &wrong_type).expect_err("a mistyped field is an error");
    assert!(err.contains("periodSeconds"), "{err}");
}

#[test]
fn the_sidecar_is_native_and_its_probes_match_the_mounted_config() {
    let docs = example_docs();
    let (facts, problems) = k8s::check(&docs);
    assert!(
        problems.is_empty(),
        "problems in examples/kubernetes:\n  {}",
        problems.join("\n  ")
    );
    let workloads = docs.iter().filter(|d| d.object.pod_spec().is_some()).count();
    assert_eq!(facts.len(), workloads, "every workload runs the sidecar");
    assert!(facts.len() >= 2, "the Deployment and the Job");

    let workloads = docs.iter().filter(|d| d.object.pod_spec().is_some());
    for (d, facts) in workloads.zip(&facts) {
        let Some(spec) = d.object.pod_spec() else { continue };
        let (sidecar, _) = k8s::sidecar(spec).expect("sidecar");
        // The sidecar starts before the app: it is the first init container.
        assert_eq!(
            spec.init_containers
                .as_ref()
                .and_then(|i| i.first())
                .map(|c| &c.name),
            Some(&sidecar.name),
            "{}: the sidecar should be the first init container",
            d.origin
        );
        let config = facts.config_text.clone();
        let config = wasmbassador::Config::parse(&config, "configmap").expect("parses");
        // Admin stays on loopback: the probes are exec probes inside the pod.
        assert!(config.admin.listen.ip().is_loopback());
        // The app reaches the database on localhost:5432.
        assert!(config.listeners.iter().any(|l| l.listen == "127.0.0.1:5432"));
        // terminationGracePeriodSeconds covers the drain.
        let grace = spec.termination_grace_period_seconds.unwrap_or(30);
        assert!(
            grace as u64 > config.admin.drain_timeout.as_secs(),
            "{}: terminationGracePeriodSeconds {grace} must exceed drain_timeout {:?}",
            d.origin,
            config.admin.drain_timeout
        );
    }
}

/// Applies `edit` to the example Deployment's text and returns the problems found.
fn problems_after(edit: impl Fn(&str) -> String) -> Vec<String> {
    let mut docs = Vec::new();
    for file in k8s::yaml_files(&examples()) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let mut text = std::fs::read_to_string(&file).expect("read");
        if name == "deployment.yaml" {
            let edited = edit(&text);
            assert_ne!(edited, text, "the edit must change the Deployment");
            text = edited;
        }
        docs.extend(k8s::parse(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    k8s::check(&docs).1
}

fn assert_caught(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

#[test]
fn the_checks_catch_the_usual_mistakes() {
    // A plain init container (no restartPolicy: Always) blocks the app forever.
    let p = problems_after(|t| t.replacen("          restartPolicy: Always", "", 1));
    assert_caught(&p, "lacks restartPolicy: Always");
    // The plugin folder mounted with subPath never sees a ConfigMap update.
    let p = problems_after(|t| {
        t.replacen(
            "mountPath: /etc/wasmbassador/plugins\n",
            "mountPath: /etc/wasmbassador/plugins/allow_list.wasm\n              subPath: allow_list.wasm\n",
            1,
        )
    });
    assert_caught(&p, "mounted with subPath");
    // A ConfigMap name with a typo.
    let p = problems_after(|t| {
        t.replacen(
            "configMap:\n            name: wasmbassador-plugins\n",
            "configMap:\n            name: wasmbassador-plugin\n",
            1,
        )
    });
    assert_caught(
        &p,
        "names ConfigMap \"wasmbassador-plugin\", which is not defined",
    );
    // An httpGet probe to the pod IP cannot reach an admin bound on 127.0.0.1.
    let p = problems_after(|t| {
        t.replacen(
            "exec:\n              command: [\"/usr/local/bin/wasmbassador\", \"probe\", \"ready\", \"--config\", \"/etc/wasmbassador/config/wasmbassador.toml\"]",
            "httpGet:\n              path: /ready\n              port: 9901",
            1,
        )
    });
    assert_caught(&p, "the kubelet cannot reach it");
    // A probe asking another admin address than the config's.
    let p = problems_after(|t| {
        t.replacen(
            "\"probe\", \"healthz\", \"--config\", \"/etc/wasmbassador/config/wasmbassador.toml\"",
            "\"probe\", \"healthz\", \"--admin\", \"127.0.0.1:9902\"",
            1,
        )
    });
    assert_caught(&p, "but the config's admin.listen is 127.0.0.1:9901");
    // A startup probe that waits on readiness (and so, possibly, on the database).
    let p = problems_after(|t| t.replacen("\"probe\", \"startup\"", "\"probe\", \"ready\"", 1));
    assert_caught(&p, "startupProbe should run `wasmbassador probe startup`");
    // The sidecar as a regular container starts after the app and keeps Jobs alive.
    let p = problems_after(|t| {
        t.replacen("      initContainers:\n", "      containers:\n", 1)
            .replacen("      containers:\n        - name: app", "        - name: app", 1)
    });
    assert_caught(&p, "as a regular container");
}

#[test]
fn the_config_inside_the_configmap_passes_validate() {
    let docs = example_docs();
    let (facts, problems) = k8s::check(&docs);
    assert!(problems.is_empty(), "{problems:#?}");
    for f in &facts {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = k8s::validate_config(f, dir.path());
        assert!(
            out.status.success(),
            "validate of the ConfigMap's config failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
    }
}

#[test]
fn the_plugin_configmap_holds_components_within_the_size_limit() {
    let docs = example_docs();
    let sources = k8s::Sources::of(&docs);
    let (facts, _) = k8s::check(&docs);
    let plugins = sources
        .config_maps
        .get("wasmbassador-plugins")
        .expect("the plugin ConfigMap");
    assert!(!plugins.is_empty());
    for (key, bytes) in plugins {
        // A component (layer 1), not a core module: the host refuses core modules.
        assert_eq!(&bytes[..4], b"\0asm", "{key} is not WebAssembly");
        assert_eq!(&bytes[6..8], &[1, 0], "{key} is a core module, not a component");
        assert!(
            facts.iter().any(|f| f
                .config_text
                .contains(&format!("/etc/wasmbassador/plugins/{key}"))),
            "{key} is in the ConfigMap but no config loads it"
        );
    }
    // The API server refuses a ConfigMap over 1 MiB; base64 makes binaryData 4/3 larger.
    let text = std::fs::read_to_string(examples().join("wasmbassador-plugins.yaml")).expect("read");
    assert!(text.len() < 1024 * 1024, "{} bytes", text.len());
}

// ---------------------------------------------------------------------------------
// The admission webhook (examples/kubernetes/webhook/)

/// Every document of examples/kubernetes/webhook/, each file's text passed through
/// `edit(file name, text)` first.
fn webhook_docs(edit: impl Fn(&str, &str) -> String) -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in k8s::yaml_files(&examples().join("webhook")) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let text = std::fs::read_to_string(&file).expect("read");
        let text = edit(&name, &text);
        docs.extend(k8s::parse(&format!("webhook/{name}"), &text).unwrap_or_else(|e| panic!("{e}")));
    }
    docs
}

/// The webhook problems after replacing `from` with `to` (once) in `file`.
fn webhook_problems_after(file: &str, from: &str, to: &str) -> Vec<String> {
    let docs = webhook_docs(|name, text| {
        if name != file {
            return text.to_string();
        }
        let edited = text.replacen(from, to, 1);
        assert_ne!(edited, text, "{from:?} is not in {file}");
        edited
    });
    k8s::webhook::check(&docs)
}

#[test]
fn the_webhook_example_parses_strictly_and_fits_together() {
    let docs = webhook_docs(|_, t| t.to_string());
    let has = |f: fn(&Object) -> bool| docs.iter().any(|d| f(&d.object));
    assert!(has(|o| matches!(o, Object::MutatingWebhookConfiguration(_))));
    assert!(has(|o| matches!(o, Object::Service(_))));
    assert!(has(|o| matches!(o, Object::Deployment(_))));
    assert!(has(|o| matches!(
        o,
        Object::Custom(k8s::custom::Custom::Certificate { .. })
    )));
    let problems = k8s::webhook::check(&docs);
    assert!(
        problems.is_empty(),
        "problems in examples/kubernetes/webhook:\n  {}",
        problems.join("\n  ")
    );

    // A misspelt field is an error, in the typed objects and in cert-manager's.
    let text =
        std::fs::read_to_string(examples().join("webhook/mutatingwebhookconfiguration.yaml")).expect("read");
    let typo = text.replacen("reinvocationPolicy: IfNeeded", "reinvokationPolicy: IfNeeded", 1);
    let err = k8s::parse("mwc", &typo).expect_err("a misspelt field is an error");
    assert!(
        err.contains("webhooks.0.reinvokationPolicy") || err.contains("reinvokationPolicy"),
        "{err}"
    );
    let text = std::fs::read_to_string(examples().join("webhook/certificate.yaml")).expect("read");
    let typo = text.replacen("renewBefore: 720h", "renewBefor: 720h", 1);
    let err = k8s::parse("certificate", &typo).expect_err("a misspelt cert-manager field is an error");
    assert!(err.contains("spec.renewBefor"), "{err}");
}

#[test]
fn the_webhook_checks_catch_the_usual_mistakes() {
    let mwc = "mutatingwebhookconfiguration.yaml";
    // The namespace entry calling the pod path would inject nothing it was sent for.
    let p = webhook_problems_after(mwc, "path: /mutate-namespace", "path: /mutate");
    assert_caught(&p, "selects namespaces by label but calls /mutate");
    let p = webhook_problems_after(mwc, "path: /mutate\n", "path: /inject\n");
    assert_caught(&p, "calls /inject, which the webhook does not serve");
    // Without the exclusion a down webhook blocks the system pods (and itself).
    let p = webhook_problems_after(
        mwc,
        "values: [\"wasmbassador-system\", \"kube-system\"]",
        "values: [\"wasmbassador-system\"]",
    );
    assert_caught(&p, "does not exclude namespace \"kube-system\"");
    let p = webhook_problems_after(mwc, "name: wasmbassador-webhook\n", "name: wasmbassador-webhok\n");
    assert_caught(
        &p,
        "calls Service wasmbassador-system/wasmbassador-webhok, which is not defined",
    );
    // The Service, the container port and --listen must agree.
    let p = webhook_problems_after("webhook.yaml", "containerPort: 8443", "containerPort: 9443");
    assert_caught(
        &p,
        "reaches container port 9443, but the webhook listens on 0.0.0.0:8443",
    );
    let p = webhook_problems_after("webhook.yaml", "      port: 443\n", "      port: 8443\n");
    assert_caught(
        &p,
        "calls port 443, which Service wasmbassador-webhook does not have",
    );
    // A subPath mount never sees the renewed certificate.
    let p = webhook_problems_after(
        "webhook.yaml",
        "mountPath: /etc/wasmbassador/webhook-tls\n",
        "mountPath: /etc/wasmbassador/webhook-tls/tls.crt\n              subPath: tls.crt\n",
    );
    assert_caught(&p, "mounted with subPath");
    // The certificate must be valid for the name the API server calls.
    let p = webhook_problems_after(
        "certificate.yaml",
        "- wasmbassador-webhook.wasmbassador-system.svc\n",
        "- webhook.wasmbassador-system.svc\n",
    );
    assert_caught(&p, "lack wasmbassador-webhook.wasmbassador-system.svc");
    let p = webhook_problems_after(
        "certificate.yaml",
        "secretName: wasmbassador-webhook-tls",
        "secretName: other",
    );
    assert_caught(&p, "but the Certificate writes \"other\"");
}

/// The Deployment's args, with the paths and address swapped for test ones, start the
/// real binary: the flags exist and the image it injects is the one written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_deployment_args_start_the_binary() {
    let docs = webhook_docs(|_, t| t.to_string());
    let args = docs
        .iter()
        .filter_map(|d| d.object.pod_spec())
        .flat_map(|s| s.containers.iter())
        .find_map(|c| {
            c.args
                .clone()
                .filter(|a| a.first().is_some_and(|a| a == "webhook"))
        })
        .expect("a container running `wasmbassador webhook`");
    let pki = support::Pki::new();
    let cert = pki.server_cert(&["wasmbassador-webhook.wasmbassador-system.svc"]);
    let mut local = args.clone();
    for (flag, value) in [
        ("--listen", "127.0.0.1:0".to_string()),
        ("--cert", cert.cert.display().to_string()),
        ("--key", cert.key.display().to_string()),
    ] {
        let at = local.iter().position(|a| a == flag).expect(flag) + 1;
        local[at] = value;
    }
    let mut process = support::process::Process::spawn(&local);
    let line = process
        .wait_for_stderr("webhook listening", support::process::START_TIMEOUT)
        .await;
    let image = k8s::flag(&args, "--image").expect("--image");
    assert!(line.contains(image), "{line}");
}
