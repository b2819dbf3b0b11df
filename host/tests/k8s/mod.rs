//! Checks on Kubernetes manifests that catch the mistakes a user would make when
//! adding wasmbassador to a pod, shared by the example, `inject` and webhook tests.
//!
//! - [`parse`]: every YAML document into a typed k8s-openapi object, strictly: the
//!   object is serialised back and compared, so a misspelt or misplaced field (which
//!   k8s-openapi, like the API server without `--validate=strict`, would drop) is an
//!   error naming its path.
//! - [`check`]: the sidecar is a native sidecar, its probes ask the admin address the
//!   mounted config names, volumes and ConfigMaps resolve, plugin folders are not
//!   mounted with `subPath`, and every file the config names is mounted.
//! - [`validate_config`]: the config from the ConfigMap passes `wasmbassador validate`
//!   with generated certificates and the real built plugins.
//! - [`webhook::check`]: the admission webhook's objects fit together (paths, ports,
//!   Service, certificate, exclusions).
//!
//! Kinds that k8s-openapi does not know (cert-manager's Certificate and Issuer) are
//! checked loosely by [`custom`]: the fields that matter, and no unknown key in `spec`.
#![allow(dead_code)]

pub mod custom;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, Probe, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the image keeps the ready-made plugins (see the Dockerfile).
pub const IMAGE_PLUGINS: &str = "/usr/lib/wasmbassador/plugins/";

/// One parsed document and where it came from.
#[derive(Debug, Clone)]
pub struct Doc {
    /// `file.yaml#2`
    pub origin: String,
    /// The typed object.
    pub object: Object,
}

/// The kinds the examples and `inject` deal with.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a handful per test; boxing would only add noise
pub enum Object {
    ConfigMap(ConfigMap),
    Secret(Secret),
    Service(Service),
    ServiceAccount(ServiceAccount),
    Namespace(Namespace),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    MutatingWebhookConfiguration(MutatingWebhookConfiguration),
    PodDisruptionBudget(PodDisruptionBudget),
    /// A cert-manager object, checked loosely (k8s-openapi has no type for it).
    Custom(custom::Custom),
    Pod(Pod),
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    DaemonSet(DaemonSet),
    Job(Job),
    CronJob(CronJob),
}

impl Object {
    /// The pod spec of a workload (a Pod, or the template of a controller).
    pub fn pod_spec(&self) -> Option<&PodSpec> {
        match self {
            Object::Pod(p) => p.spec.as_ref(),
            Object::Deployment(d) => d.spec.as_ref()?.template.spec.as_ref(),
            Object::StatefulSet(s) => s.spec.as_ref()?.template.spec.as_ref(),
            Object::DaemonSet(d) => d.spec.as_ref()?.template.spec.as_ref(),
            Object::Job(j) => j.spec.as_ref()?.template.spec.as_ref(),
            Object::CronJob(c) => c
                .spec
                .as_ref()?
                .job_template
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref(),
            _ => None,
        }
    }

    /// True for workloads whose pods run to completion (a sidecar there needs no
    /// readiness or liveness probe).
    pub fn runs_to_completion(&self) -> bool {
        match self {
            Object::Job(_) | Object::CronJob(_) => true,
            Object::Pod(p) => p
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.as_deref())
                .is_some_and(|r| r != "Always"),
            _ => false,
        }
    }
}

/// Parses a stream of YAML documents into JSON values (empty documents skipped).
pub fn yaml_values(text: &str) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| format!("document {i}: {e}"))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Deserialises `doc` as `T` and requires that serialising it back gives `doc` again.
pub fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T =
        serde_path_to_error::deserialize(doc).map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    diff("", doc, &back, &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "unknown or mistyped fields (Kubernetes would drop or reject them): {}",
            lost.join(", ")
        ))
    }
}

fn diff(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match g.get(k) {
                    Some(gv) => diff(&p, wv, gv, out),
                    // An explicit null is the same as leaving the field out.
                    None if wv.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                diff(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        (w, g) if w == g => {}
        // Numbers given as strings where the API takes int-or-string, and the like.
        (w, g) if w.to_string().trim_matches('"') == g.to_string().trim_matches('"') => {}
        (w, g) => out.push(format!("{path} ({w} became {g})")),
    }
}

/// Parses one document into its typed object by `apiVersion` and `kind`.
pub fn typed(doc: &Value) -> Result<Object, String> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    Ok(match (api, kind) {
        ("v1", "ConfigMap") => Object::ConfigMap(strict(doc)?),
        ("v1", "Secret") => Object::Secret(strict(doc)?),
        ("v1", "Service") => Object::Service(strict(doc)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(doc)?),
        ("v1", "Namespace") => Object::Namespace(strict(doc)?),
        ("v1", "Pod") => Object::Pod(strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => Object::ClusterRoleBinding(strict(doc)?),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            Object::MutatingWebhookConfiguration(strict(doc)?)
        }
        ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(strict(doc)?),
        (custom::CERT_MANAGER, _) => Object::Custom(custom::loose(doc)?),
        ("apps/v1", "Deployment") => Object::Deployment(strict(doc)?),
        ("apps/v1", "StatefulSet") => Object::StatefulSet(strict(doc)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(strict(doc)?),
        ("batch/v1", "Job") => Object::Job(strict(doc)?),
        ("batch/v1", "CronJob") => Object::CronJob(strict(doc)?),
        _ => return Err(format!("unexpected apiVersion {api:?} kind {kind:?}")),
    })
}

/// Parses every document of a YAML stream strictly; `name` labels the origins.
pub fn parse(name: &str, text: &str) -> Result<Vec<Doc>, String> {
    yaml_values(text)
        .map_err(|e| format!("{name}: {e}"))?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            typed(v)
                .map(|object| Doc {
                    origin: format!("{name}#{i}"),
                    object,
                })
                .map_err(|e| format!("{name}#{i}: {e}"))
        })
        .collect()
}

/// The YAML files under `dir` (sorted), by file name.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

/// The ConfigMaps and Secrets of a set of documents, by name: key → bytes.
#[derive(Default)]
pub struct Sources {
    /// ConfigMap name → key → contents (data and binaryData).
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Secret name → key → contents (data and stringData).
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Sources {
    /// Collects the ConfigMaps and Secrets among `docs`.
    pub fn of(docs: &[Doc]) -> Sources {
        let mut s = Sources::default();
        for d in docs {
            match &d.object {
                Object::ConfigMap(cm) => {
                    let mut keys: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                    for (k, v) in cm.data.iter().flatten() {
                        keys.insert(k.clone(), v.clone().into_bytes());
                    }
                    for (k, v) in cm.binary_data.iter().flatten() {
                        keys.insert(k.clone(), v.0.clone());
                    }
                    s.config_maps
                        .insert(cm.metadata.name.clone().unwrap_or_default(), keys);
                }
                Object::Secret(sec) => {
                    let mut keys: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                    for (k, v) in sec.data.iter().flatten() {
                        keys.insert(k.clone(), v.0.clone());
                    }
                    for (k, v) in sec.string_data.iter().flatten() {
                        keys.insert(k.clone(), v.clone().into_bytes());
                    }
                    s.secrets
                        .insert(sec.metadata.name.clone().unwrap_or_default(), keys);
                }
                _ => {}
            }
        }
        s
    }
}

/// A file as the sidecar sees it: which volume and key it comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Mounted {
    /// A key of a ConfigMap.
    ConfigMap {
        name: String,
        key: String,
        sub_path: bool,
    },
    /// A key of a Secret.
    Secret {
        name: String,
        key: String,
        sub_path: bool,
    },
    /// Something else (an image path, an emptyDir, ...).
    Other,
}

/// The sidecar of a pod spec: a container running `wasmbassador run`.
pub fn sidecar(spec: &PodSpec) -> Option<(&Container, bool)> {
    let is_sidecar = |c: &Container| {
        c.image.as_deref().is_some_and(|i| i.contains("wasmbassador"))
            && c.args
                .as_ref()
                .and_then(|a| a.first())
                .is_some_and(|a| a == "run")
    };
    if let Some(c) = spec.init_containers.iter().flatten().find(|c| is_sidecar(c)) {
        return Some((c, true));
    }
    spec.containers.iter().find(|c| is_sidecar(c)).map(|c| (c, false))
}

/// The value following `flag` in `args`.
pub fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Resolves `path` through the container's volume mounts and the pod's volumes.
pub fn resolve(spec: &PodSpec, c: &Container, path: &str, problems: &mut Vec<String>) -> Mounted {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| {
            path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))) || path == m.mount_path
        })
        .max_by_key(|m| m.mount_path.len());
    let Some(mount) = mount else {
        return Mounted::Other;
    };
    let rest = path
        .strip_prefix(mount.mount_path.trim_end_matches('/'))
        .unwrap_or_default()
        .trim_start_matches('/');
    let sub_path = mount.sub_path.is_some() || mount.sub_path_expr.is_some();
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name);
    let Some(volume) = volume else {
        problems.push(format!("volumeMount {:?} names no volume of the pod", mount.name));
        return Mounted::Other;
    };
    // With subPath the mount point is the key itself.
    let key = if sub_path {
        mount.sub_path.clone().unwrap_or_default()
    } else {
        rest.to_string()
    };
    let key_of = |items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>| match items {
        Some(items) => items
            .iter()
            .find(|i| i.path == key)
            .map(|i| i.key.clone())
            .unwrap_or_else(|| format!("<no item with path {key}>")),
        None => key.clone(),
    };
    if let Some(cm) = &volume.config_map {
        Mounted::ConfigMap {
            name: cm.name.clone(),
            key: key_of(cm.items.as_ref()),
            sub_path,
        }
    } else if let Some(s) = &volume.secret {
        Mounted::Secret {
            name: s.secret_name.clone().unwrap_or_default(),
            key: key_of(s.items.as_ref()),
            sub_path,
        }
    } else {
        Mounted::Other
    }
}

/// What [`check`] learnt about one workload's sidecar.
#[derive(Debug)]
pub struct SidecarFacts {
    /// The config file path passed to `run --config`.
    pub config_path: String,
    /// The config text from the ConfigMap.
    pub config_text: String,
    /// The secret files the config names, by path: (secret, key).
    pub files: BTreeMap<String, Mounted>,
}

/// Checks every workload that runs the sidecar; returns the facts of each and every
/// problem found (empty when all is well).
pub fn check(docs: &[Doc]) -> (Vec<SidecarFacts>, Vec<String>) {
    let sources = Sources::of(docs);
    let mut facts = Vec::new();
    let mut problems = Vec::new();
    for d in docs {
        let Some(spec) = d.object.pod_spec() else { continue };
        let Some((c, in_init)) = sidecar(spec) else {
            continue;
        };
        let mut p = Vec::new();
        if let Some(f) = check_pod(&d.object, spec, c, in_init, &sources, &mut p) {
            facts.push(f);
        }
        problems.extend(p.into_iter().map(|e| format!("{}: {e}", d.origin)));
    }
    problems.dedup();
    (facts, problems)
}

fn check_pod(
    object: &Object,
    spec: &PodSpec,
    c: &Container,
    in_init: bool,
    sources: &Sources,
    p: &mut Vec<String>,
) -> Option<SidecarFacts> {
    if !in_init {
        p.push(format!(
            "container {:?} runs wasmbassador as a regular container: make it an init container with \
             restartPolicy: Always (a native sidecar), or it starts after the app and keeps Jobs running",
            c.name
        ));
    } else if c.restart_policy.as_deref() != Some("Always") {
        p.push(format!(
            "init container {:?} lacks restartPolicy: Always: the pod would wait for it to exit",
            c.name
        ));
    }
    // Every mount names a volume of the pod, and every ConfigMap/Secret volume exists.
    for m in c.volume_mounts.iter().flatten() {
        if !spec.volumes.iter().flatten().any(|v| v.name == m.name) {
            p.push(format!("volumeMount {:?} names no volume of the pod", m.name));
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map
            && !cm.optional.unwrap_or(false)
            && !sources.config_maps.contains_key(&cm.name)
        {
            p.push(format!(
                "volume {:?} names ConfigMap {:?}, which is not defined",
                v.name, cm.name
            ));
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if !s.optional.unwrap_or(false) && !sources.secrets.contains_key(&name) {
                p.push(format!(
                    "volume {:?} names Secret {name:?}, which is not defined",
                    v.name
                ));
            }
        }
    }
    let args = c.args.clone().unwrap_or_default();
    let Some(config_path) = flag(&args, "--config").or_else(|| flag(&args, "-c")) else {
        p.push("the sidecar runs without --config".into());
        return None;
    };
    let config_text = match resolve(spec, c, config_path, p) {
        Mounted::ConfigMap { name, key, sub_path } => {
            if sub_path {
                p.push(format!(
                    "the config {config_path} is mounted with subPath: it would never see an update"
                ));
            }
            match sources.config_maps.get(&name).and_then(|keys| keys.get(&key)) {
                Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                None => {
                    p.push(format!("ConfigMap {name:?} has no key {key:?} for {config_path}"));
                    return None;
                }
            }
        }
        other => {
            p.push(format!(
                "the config {config_path} does not come from a ConfigMap ({other:?})"
            ));
            return None;
        }
    };
    let config = match wasmbassador::Config::parse(&config_text, config_path) {
        Ok(c) => c,
        Err(e) => {
            p.push(format!("the config in the ConfigMap does not parse: {e}"));
            return None;
        }
    };
    let admin = config.admin.listen;
    check_probes(object, c, config_path, admin, p);

    // Every file the config names is mounted (plugins from a folder, not subPath) or
    // shipped in the image.
    let mut files = BTreeMap::new();
    let mut named: Vec<(String, &str)> = Vec::new();
    for u in &config.upstreams {
        if let Some(tls) = &u.tls {
            for f in [&tls.ca, &tls.client_cert, &tls.client_key].into_iter().flatten() {
                named.push((f.display().to_string(), "TLS file"));
            }
        }
    }
    for pl in &config.plugins {
        named.push((pl.path.display().to_string(), "plugin"));
    }
    for (path, what) in named {
        let mounted = resolve(spec, c, &path, p);
        match &mounted {
            Mounted::ConfigMap { name, key, sub_path } | Mounted::Secret { name, key, sub_path } => {
                let keys = match mounted {
                    Mounted::ConfigMap { .. } => sources.config_maps.get(name),
                    _ => sources.secrets.get(name),
                };
                if *sub_path {
                    p.push(format!(
                        "{what} {path} is mounted with subPath: its folder never sees an update \
                         (mount the whole {name:?} as a folder)"
                    ));
                }
                if keys.is_some_and(|k| !k.contains_key(key)) {
                    p.push(format!("{what} {path}: {name:?} has no key {key:?}"));
                }
            }
            Mounted::Other if what == "plugin" && path.starts_with(IMAGE_PLUGINS) => {}
            Mounted::Other => p.push(format!("{what} {path} is not mounted from a ConfigMap or Secret")),
        }
        files.insert(path, mounted);
    }
    Some(SidecarFacts {
        config_path: config_path.to_string(),
        config_text,
        files,
    })
}

fn check_probes(
    object: &Object,
    c: &Container,
    config_path: &str,
    admin: std::net::SocketAddr,
    p: &mut Vec<String>,
) {
    let long_running = !object.runs_to_completion();
    let probes: [(&str, Option<&Probe>, &str, &str, bool); 3] = [
        (
            "startupProbe",
            c.startup_probe.as_ref(),
            "startup",
            "/startup",
            true,
        ),
        (
            "readinessProbe",
            c.readiness_probe.as_ref(),
            "ready",
            "/ready",
            long_running,
        ),
        (
            "livenessProbe",
            c.liveness_probe.as_ref(),
            "healthz",
            "/healthz",
            long_running,
        ),
    ];
    for (field, probe, kind, path, required) in probes {
        let Some(probe) = probe else {
            if required {
                p.push(format!("the sidecar has no {field}"));
            }
            continue;
        };
        if let Some(exec) = &probe.exec {
            let cmd = exec.command.clone().unwrap_or_default();
            let ok_cmd = cmd.first().is_some_and(|b| b.ends_with("wasmbassador"))
                && cmd.get(1).is_some_and(|a| a == "probe")
                && cmd.get(2).is_some_and(|a| a == kind);
            if !ok_cmd {
                p.push(format!(
                    "{field} should run `wasmbassador probe {kind}`, runs {cmd:?}"
                ));
            }
            match (flag(&cmd, "--admin"), flag(&cmd, "--config")) {
                (Some(a), _) if a.parse() != Ok(admin) => p.push(format!(
                    "{field} asks {a}, but the config's admin.listen is {admin}"
                )),
                (Some(_), _) => {}
                (None, Some(cfg)) if cfg != config_path => {
                    p.push(format!("{field} reads {cfg}, but the sidecar runs {config_path}"))
                }
                (None, Some(_)) => {}
                (None, None) if admin != "127.0.0.1:9901".parse().expect("addr") => p.push(format!(
                    "{field} asks the default 127.0.0.1:9901, but admin.listen is {admin}"
                )),
                (None, None) => {}
            }
            if admin.port() == 0 {
                p.push(format!(
                    "{field}: admin.listen {admin} has port 0, which no probe can find"
                ));
            }
        } else if let Some(get) = &probe.http_get {
            use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
            if get.path.as_deref() != Some(path) {
                p.push(format!("{field} asks {:?}, should ask {path}", get.path));
            }
            let port_ok = match &get.port {
                IntOrString::Int(n) => *n == i32::from(admin.port()),
                IntOrString::String(name) => c.ports.iter().flatten().any(|cp| {
                    cp.name.as_deref() == Some(name) && cp.container_port == i32::from(admin.port())
                }),
            };
            if !port_ok {
                p.push(format!(
                    "{field} port {:?} is not admin.listen's port {}",
                    get.port,
                    admin.port()
                ));
            }
            if admin.ip().is_loopback() && get.host.is_none() {
                p.push(format!(
                    "{field} is an httpGet to the pod IP, but admin listens on {admin}: the kubelet cannot \
                     reach it (bind admin to 0.0.0.0, or use an exec probe)"
                ));
            }
        } else {
            p.push(format!("{field} is neither exec nor httpGet"));
        }
    }
}

/// Writes the sidecar's config into `root` with every file it names rewritten under
/// it: the CA, client certificate and key from a fresh PKI, plugins from the real
/// builds; then runs `wasmbassador validate` on it. Returns validate's output.
pub fn validate_config(facts: &SidecarFacts, root: &Path) -> std::process::Output {
    let pki = crate::support::Pki::new();
    let client = pki.client_cert("wasmbassador");
    let mut text = facts.config_text.clone();
    for (path, _) in facts.files.iter() {
        let local = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(local.parent().expect("parent")).expect("mkdir");
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(stem) = name.strip_suffix(".wasm") {
            std::fs::copy(crate::support::plugins::wasm(stem), &local).expect("copy plugin");
        } else if name.ends_with(".key") {
            std::fs::write(&local, client.key_pem()).expect("write key");
        } else if name.contains("ca") {
            std::fs::write(&local, pki.ca_pem()).expect("write CA");
        } else {
            std::fs::write(&local, client.cert_pem()).expect("write cert");
        }
        text = text.replace(&format!("\"{path}\""), &format!("\"{}\"", local.display()));
    }
    let config = root.join("wasmbassador.toml");
    std::fs::write(&config, text).expect("write config");
    std::process::Command::new(crate::support::process::BIN)
        .args(["validate", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run validate")
}
