//! `wasmbassador inject` as a user pipes manifests through it: every example workload,
//! with its hand-written sidecar taken out and the opt-in annotations put on, comes
//! back with a native sidecar that passes the same checks as the examples (and whose
//! config passes `validate`); injecting twice changes nothing; documents that do not
//! opt in come back byte for byte; every workload kind is handled; bad YAML is an
//! error naming the document, and nothing is written.

mod k8s;
mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use support::process::BIN;

const IMAGE: &str = "registry.example.com/wasmbassador:0.1.0";

fn inject(input: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(["inject", "--image", IMAGE])
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wasmbassador inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for inject")
}

fn inject_ok(input: &str) -> String {
    let out = inject(input);
    assert!(
        out.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Takes the hand-written sidecar out of a workload and puts the opt-in annotations
/// (naming the ConfigMaps and Secret its volumes used) on its pod template.
fn strip_sidecar(doc: &mut Value) -> bool {
    let template = match doc["kind"].as_str() {
        Some("Pod") => Some(&mut *doc),
        Some("CronJob") => doc.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => doc.pointer_mut("/spec/template"),
    };
    let Some(template) = template else { return false };
    let Some(volumes) = template
        .pointer_mut("/spec/volumes")
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let mut annotations = serde_json::Map::new();
    annotations.insert("wasmbassador.io/inject".into(), json!("true"));
    for v in volumes.iter() {
        match v["name"].as_str() {
            Some("wasmbassador-config") => {
                annotations.insert("wasmbassador.io/config".into(), v["configMap"]["name"].clone());
            }
            Some("wasmbassador-plugins") => {
                annotations.insert("wasmbassador.io/plugins".into(), v["configMap"]["name"].clone());
            }
            Some("wasmbassador-tls") => {
                annotations.insert(
                    "wasmbassador.io/tls-secret".into(),
                    v["secret"]["secretName"].clone(),
                );
            }
            _ => {}
        }
    }
    volumes.retain(|v| !v["name"].as_str().is_some_and(|n| n.starts_with("wasmbassador-")));
    let init = template
        .pointer_mut("/spec/initContainers")
        .and_then(Value::as_array_mut)
        .expect("init containers");
    init.retain(|c| c["name"] != "wasmbassador");
    template["metadata"]["annotations"] = Value::Object(annotations);
    true
}

/// The examples as one stream, workloads without their sidecar and with annotations.
fn examples_without_sidecars() -> (String, usize) {
    let dir = support::plugins::repo().join("examples/kubernetes");
    let mut stream = String::new();
    let mut workloads = 0;
    for file in k8s::yaml_files(&dir) {
        let text = std::fs::read_to_string(&file).expect("read");
        for mut doc in k8s::yaml_values(&text).expect("yaml") {
            stream.push_str("---\n");
            if strip_sidecar(&mut doc) {
                workloads += 1;
            }
            stream.push_str(&serde_yaml_ng::to_string(&doc).expect("yaml"));
        }
    }
    (stream, workloads)
}

#[test]
fn inject_restores_a_sidecar_that_passes_every_check() {
    let (stream, workloads) = examples_without_sidecars();
    assert!(workloads >= 2, "the Deployment and the Job");
    // Without a sidecar the checks have nothing to look at.
    let before = k8s::parse("stripped", &stream).expect("parse");
    assert!(k8s::check(&before).0.is_empty(), "the sidecars were taken out");

    let injected = inject_ok(&stream);
    let docs = k8s::parse("injected", &injected).unwrap_or_else(|e| panic!("{e}\n{injected}"));
    let (facts, problems) = k8s::check(&docs);
    assert!(problems.is_empty(), "after inject:\n  {}", problems.join("\n  "));
    assert_eq!(facts.len(), workloads, "every workload got the sidecar");
    for d in &docs {
        let Some(spec) = d.object.pod_spec() else { continue };
        let (sidecar, native) = k8s::sidecar(spec).expect("sidecar");
        assert!(native);
        assert_eq!(sidecar.image.as_deref(), Some(IMAGE));
        assert_eq!(
            spec.init_containers
                .as_ref()
                .and_then(|i| i.first())
                .map(|c| c.name.as_str()),
            Some("wasmbassador"),
            "the sidecar starts first"
        );
    }
    for f in &facts {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = k8s::validate_config(f, dir.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    let (stream, _) = examples_without_sidecars();
    let once = inject_ok(&stream);
    assert_ne!(once, stream);
    let twice = inject_ok(&once);
    assert_eq!(twice, once, "a second inject must not change a byte");
}

#[test]
fn documents_that_do_not_opt_in_pass_through_byte_for_byte() {
    let untouched = r#"# a leading comment, kept
apiVersion: v1
kind: Service
metadata: {name: orders,   labels: {a: b}}   # flow style and odd spacing
spec:
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: no-annotation
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata:
      labels: {app: x}
    spec:
      containers:
        - name: app   # comment inside
          image: 'x:1'
--- # a separator with a comment
apiVersion: batch/v1
kind: Job
metadata: {name: opted-out}
spec:
  template:
    metadata:
      annotations: {wasmbassador.io/inject: "false"}
    spec:
      restartPolicy: Never
      containers: [{name: job, image: "x:1"}]
"#;
    assert_eq!(inject_ok(untouched), untouched);

    // Mixed with a document that is changed, the others still come back verbatim.
    let opted_in = "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    \
                    wasmbassador.io/inject: \"true\"\nspec:\n  containers: [{name: app, image: \"x:1\"}]\n";
    let mixed = format!("{untouched}{opted_in}");
    let out = inject_ok(&mixed);
    assert!(out.starts_with(untouched), "the untouched prefix changed:\n{out}");
    assert!(out.contains("restartPolicy: Always"), "{out}");
}

#[test]
fn every_workload_kind_gets_the_sidecar() {
    let dir = support::plugins::repo().join("examples/kubernetes");
    let config_map = std::fs::read_to_string(dir.join("wasmbassador-config.yaml")).expect("config map");
    let annotations = "annotations: {wasmbassador.io/inject: \"true\", wasmbassador.io/cpu-request: 20m}";
    let pod = |indent: &str| {
        format!(
            "{indent}metadata:\n{indent}  labels: {{app: x}}\n{indent}  {annotations}\n\
             {indent}spec:\n{indent}  restartPolicy: Never\n{indent}  containers: [{{name: app, image: \"x:1\"}}]\n"
        )
    };
    let selector = "  selector: {matchLabels: {app: x}}\n";
    let stream = format!(
        "{config_map}---\napiVersion: v1\nkind: Pod\n{pod0}\
         ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec:\n{selector}  template:\n{pod4}\
         ---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: s}}\nspec:\n{selector}  serviceName: s\n  template:\n{pod4}\
         ---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: ds}}\nspec:\n{selector}  template:\n{pod4}\
         ---\napiVersion: batch/v1\nkind: Job\nmetadata: {{name: j}}\nspec:\n  template:\n{pod4}\
         ---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: c}}\nspec:\n  schedule: \"0 3 * * *\"\n  \
         jobTemplate:\n    spec:\n      template:\n{pod8}",
        pod0 = pod("").replacen("metadata:\n", "metadata:\n  name: p\n", 1),
        pod4 = pod("    "),
        pod8 = pod("        "),
    );
    let injected = inject_ok(&stream);
    let docs = k8s::parse("kinds", &injected).unwrap_or_else(|e| panic!("{e}\n{injected}"));
    let (facts, problems) = k8s::check(&docs);
    // The sidecar's TLS files and plugins are not mounted here (no annotations for
    // them), so only those problems are expected.
    let other: Vec<_> = problems
        .iter()
        .filter(|p| !p.contains("is not mounted from a ConfigMap or Secret"))
        .collect();
    assert!(other.is_empty(), "{other:#?}");
    assert_eq!(
        facts.len(),
        6,
        "Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob"
    );
    for d in &docs {
        let Some(spec) = d.object.pod_spec() else { continue };
        let (sidecar, _) = k8s::sidecar(spec).expect("sidecar");
        let cpu = &sidecar
            .resources
            .as_ref()
            .expect("resources")
            .requests
            .as_ref()
            .expect("requests")["cpu"];
        assert_eq!(cpu.0, "20m", "{}: the resource annotation applies", d.origin);
    }
}

#[test]
fn bad_yaml_is_an_error_naming_the_document() {
    let out = inject("apiVersion: v1\nkind: Service\n---\nkind: [unclosed\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing is written on error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("document 1: not valid YAML"), "{stderr}");
    assert!(stderr.contains("line"), "{stderr}");

    let out = inject("kind: Pod\nmetadata: {annotations: {wasmbassador.io/inject: \"yes\"}}\nspec: {}\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("write \"true\" or \"false\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_annotated_example_injects_into_a_valid_deployment() {
    let dir = support::plugins::repo().join("examples/kubernetes");
    let mut stream = String::new();
    for file in [
        "wasmbassador-config.yaml",
        "wasmbassador-plugins.yaml",
        "wasmbassador-upstream-tls.yaml",
    ] {
        stream.push_str("---\n");
        stream.push_str(&std::fs::read_to_string(dir.join(file)).expect("read"));
    }
    stream.push_str("---\n");
    stream.push_str(&std::fs::read_to_string(dir.join("inject/app.yaml")).expect("read inject/app.yaml"));
    let injected = inject_ok(&stream);
    let docs = k8s::parse("inject/app.yaml", &injected).unwrap_or_else(|e| panic!("{e}"));
    let (facts, problems) = k8s::check(&docs);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(facts.len(), 1);
    // The head comment (the usage line) survives the rewrite.
    assert!(injected.contains("# The same app as ../deployment.yaml"));
}
