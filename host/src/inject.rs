//! `wasmbassador inject`: add the wasmbassador native sidecar to Kubernetes workloads.
//!
//! Like `linkerd inject`, it reads a stream of YAML documents and writes it back with
//! the sidecar added to every pod template that opts in. Supported kinds: Pod,
//! Deployment, StatefulSet, DaemonSet, Job and CronJob. A pod opts in with
//! `wasmbassador.io/inject: "true"` as an annotation or a label on the pod (template);
//! further annotations say what to mount:
//!
//! | annotation | default | meaning |
//! |---|---|---|
//! | `wasmbassador.io/inject` | — | `"true"` adds the sidecar, `"false"` never |
//! | `wasmbassador.io/config` | `wasmbassador-config` | ConfigMap with `wasmbassador.toml`, mounted at `/etc/wasmbassador/config` |
//! | `wasmbassador.io/plugins` | none | ConfigMap of `.wasm` plugins, mounted as a folder at `/etc/wasmbassador/plugins` |
//! | `wasmbassador.io/tls-secret` | none | Secret with the upstream CA and client certificate, at `/etc/wasmbassador/tls` |
//! | `wasmbassador.io/image` | [`InjectOptions::image`] | the sidecar's image |
//! | `wasmbassador.io/cpu-request` | `50m` | |
//! | `wasmbassador.io/memory-request` | `32Mi` | |
//! | `wasmbassador.io/memory-limit` | `128Mi` | |
//!
//! What is added: an init container named `wasmbassador` with `restartPolicy: Always`
//! (a native sidecar, Kubernetes 1.29+) placed first, so it starts before the other
//! init containers and the app; exec startup, readiness and liveness probes
//! (`wasmbassador probe ...`, so that admin stays on 127.0.0.1); modest resources;
//! a locked-down security context; and the volumes above, mounted as whole folders
//! (never `subPath`, which never sees an update).
//!
//! Injection is idempotent: a previous `wasmbassador` container and `wasmbassador-*`
//! volumes are replaced, so injecting twice gives the same document, and a document
//! that would not change is written back byte for byte, comments included. Documents
//! that are changed are re-serialised: their leading comments are kept, comments inside
//! them are not.

use serde_json::{Map, Value, json};

/// The opt-in annotation (or label).
pub const INJECT: &str = "wasmbassador.io/inject";
/// Annotation naming the config ConfigMap.
pub const CONFIG: &str = "wasmbassador.io/config";
/// Annotation naming the plugin ConfigMap.
pub const PLUGINS: &str = "wasmbassador.io/plugins";
/// Annotation naming the upstream TLS Secret.
pub const TLS_SECRET: &str = "wasmbassador.io/tls-secret";
/// Annotation overriding the image.
pub const IMAGE: &str = "wasmbassador.io/image";

/// The injected container's name.
pub const CONTAINER: &str = "wasmbassador";
/// Where the config ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/wasmbassador/config";
/// The config file the sidecar runs with.
pub const CONFIG_FILE: &str = "/etc/wasmbassador/config/wasmbassador.toml";
/// Where the plugin ConfigMap is mounted.
pub const PLUGIN_DIR: &str = "/etc/wasmbassador/plugins";
/// Where the TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/wasmbassador/tls";
/// The binary inside the image.
pub const BINARY: &str = "/usr/local/bin/wasmbassador";

/// Settings that are not per pod.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The image when the pod does not name one with `wasmbassador.io/image`.
    pub image: String,
    /// Inject into pods that do not opt in (they can still opt out with `"false"`);
    /// the webhook uses this for namespaces selected by label.
    pub inject_by_default: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: format!("wasmbassador:{}", env!("CARGO_PKG_VERSION")),
            inject_by_default: false,
        }
    }
}

/// Why a stream or a document could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A document is not valid YAML.
    #[error("document {document}: not valid YAML: {source}")]
    Yaml {
        /// Index of the document in the stream, from 0.
        document: usize,
        /// The parser's error (with line and column).
        source: serde_yaml_ng::Error,
    },
    /// A document opts in but its shape is not what its kind requires.
    #[error("document {document} ({kind} {name}): {reason}")]
    Shape {
        /// Index of the document in the stream, from 0.
        document: usize,
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The changed document could not be written back as YAML.
    #[error("document {document}: cannot write YAML: {source}")]
    Write {
        /// Index of the document in the stream, from 0.
        document: usize,
        /// The serialiser's error.
        source: serde_yaml_ng::Error,
    },
}

/// Injects every opted-in workload of a multi-document YAML stream; other documents,
/// and the separators between documents, are copied unchanged.
pub fn inject_stream(text: &str, options: &InjectOptions) -> Result<String, InjectError> {
    let mut out = String::with_capacity(text.len() + 2048);
    for (document, (separator, body)) in split_documents(text).into_iter().enumerate() {
        out.push_str(separator);
        let value: Value = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_yaml_ng::from_str(body).map_err(|source| InjectError::Yaml { document, source })?
        };
        let mut changed = value.clone();
        let touched = inject_document(&mut changed, options).map_err(|reason| InjectError::Shape {
            document,
            kind: value["kind"].as_str().unwrap_or("?").to_string(),
            name: value["metadata"]["name"].as_str().unwrap_or("?").to_string(),
            reason,
        })?;
        if !touched || changed == value {
            out.push_str(body);
            continue;
        }
        // Keep the comments that head the document (they usually explain it).
        for line in body.lines() {
            let t = line.trim_start();
            if t.starts_with('#') || t.is_empty() {
                out.push_str(line);
                out.push('\n');
            } else {
                break;
            }
        }
        let yaml =
            serde_yaml_ng::to_string(&changed).map_err(|source| InjectError::Write { document, source })?;
        out.push_str(&yaml);
    }
    Ok(out)
}

/// Splits a YAML stream into (separator line, document body) pairs; the first pair has
/// an empty separator. Concatenating them gives the input back.
fn split_documents(text: &str) -> Vec<(&str, &str)> {
    let mut parts = Vec::new();
    let mut sep_start = 0;
    let mut body_start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        let is_separator = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_separator {
            parts.push((&text[sep_start..body_start], &text[body_start..pos]));
            sep_start = pos;
            body_start = pos + line.len();
        }
        pos += line.len();
    }
    parts.push((&text[sep_start..body_start], &text[body_start..]));
    parts
}

/// Injects one parsed document (any kind) in place. Returns whether it opted in;
/// documents of other kinds, or that do not opt in, are left alone.
pub fn inject_document(doc: &mut Value, options: &InjectOptions) -> Result<bool, String> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let template = match kind.as_str() {
        "Pod" => Some(&mut *doc),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => {
            doc.get_mut("spec").and_then(|s| s.get_mut("template"))
        }
        "CronJob" => doc.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => return Ok(false),
    };
    // Without a pod template there is nothing that could opt in: leave it alone.
    let Some(Value::Object(template)) = template else {
        return Ok(false);
    };
    let meta = template.get("metadata").cloned().unwrap_or(Value::Null);
    let setting = |key: &str| -> Option<String> {
        meta["annotations"][key]
            .as_str()
            .or_else(|| meta["labels"][key].as_str())
            .map(str::to_string)
    };
    match setting(INJECT).as_deref() {
        Some("true") => {}
        Some("false") => return Ok(false),
        Some(other) => return Err(format!("{INJECT} is {other:?}; write \"true\" or \"false\"")),
        None if options.inject_by_default => {}
        None => return Ok(false),
    }
    let spec = template.entry("spec").or_insert_with(|| json!({}));
    let Value::Object(spec) = spec else {
        return Err("the pod spec is not a mapping".into());
    };
    let image = setting(IMAGE).unwrap_or_else(|| options.image.clone());
    let config = setting(CONFIG).unwrap_or_else(|| "wasmbassador-config".into());
    let plugins = setting(PLUGINS);
    let tls = setting(TLS_SECRET);
    let resource = |key: &str, default: &str| {
        setting(&format!("wasmbassador.io/{key}")).unwrap_or_else(|| default.into())
    };

    let mut mounts = vec![json!({"name": "wasmbassador-config", "mountPath": CONFIG_DIR, "readOnly": true})];
    let mut volumes = vec![json!({"name": "wasmbassador-config", "configMap": {"name": config}})];
    if let Some(plugins) = &plugins {
        mounts.push(json!({"name": "wasmbassador-plugins", "mountPath": PLUGIN_DIR, "readOnly": true}));
        volumes.push(json!({"name": "wasmbassador-plugins", "configMap": {"name": plugins}}));
    }
    if let Some(tls) = &tls {
        mounts.push(json!({"name": "wasmbassador-tls", "mountPath": TLS_DIR, "readOnly": true}));
        volumes.push(json!({"name": "wasmbassador-tls", "secret": {"secretName": tls}}));
    }
    let probe = |kind: &str, period: u32, failures: u32| {
        json!({
            "exec": {"command": [BINARY, "probe", kind, "--config", CONFIG_FILE]},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let container = json!({
        "name": CONTAINER,
        "image": image,
        "restartPolicy": "Always",
        "args": ["run", "--config", CONFIG_FILE, "--log-format", "json"],
        "startupProbe": probe("startup", 1, 30),
        "readinessProbe": probe("ready", 5, 2),
        "livenessProbe": probe("healthz", 10, 3),
        "resources": {
            "requests": {"cpu": resource("cpu-request", "50m"), "memory": resource("memory-request", "32Mi")},
            "limits": {"memory": resource("memory-limit", "128Mi")},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    });

    let init = list(spec, "initContainers")?;
    init.retain(|c| c["name"] != CONTAINER);
    init.insert(0, container);
    let existing = list(spec, "volumes")?;
    existing.retain(|v| {
        !v["name"]
            .as_str()
            .is_some_and(|n| ["wasmbassador-config", "wasmbassador-plugins", "wasmbassador-tls"].contains(&n))
    });
    existing.extend(volumes);
    // A regular container of the same name (a hand-made sidecar) would clash.
    if let Some(Value::Array(containers)) = spec.get("containers")
        && containers.iter().any(|c| c["name"] == CONTAINER)
    {
        return Err(format!(
            "already has a regular container named {CONTAINER:?}; remove it or make it a native sidecar"
        ));
    }
    Ok(true)
}

fn list<'a>(spec: &'a mut Map<String, Value>, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let entry = spec.entry(key).or_insert_with(|| json!([]));
    if entry.is_null() {
        *entry = json!([]);
    }
    match entry {
        Value::Array(items) => Ok(items),
        _ => Err(format!("spec.{key} is not a list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_documents_gives_the_input_back() {
        for text in [
            "",
            "a: 1\n",
            "---\na: 1\n---\nb: 2\n",
            "# head\na: 1\n--- # c\nb: 2\n---\n",
            "a: 1\n---\n\n---\nb: 2",
        ] {
            let parts = split_documents(text);
            let joined: String = parts.iter().map(|(s, b)| format!("{s}{b}")).collect();
            assert_eq!(joined, text);
        }
        assert_eq!(split_documents("a: 1\n---\nb: 2\n").len(), 2);
    }

    #[test]
    fn a_bad_opt_in_value_is_an_error() {
        let mut doc = json!({"kind": "Pod", "metadata": {"annotations": {INJECT: "yes"}}, "spec": {}});
        let err = inject_document(&mut doc, &InjectOptions::default()).expect_err("refused");
        assert!(err.contains("\"yes\""), "{err}");
    }
}
