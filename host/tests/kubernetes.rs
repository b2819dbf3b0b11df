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
