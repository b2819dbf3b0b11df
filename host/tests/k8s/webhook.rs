//! Checks that the admission webhook's objects fit together the way the API server and
//! `wasmbassador webhook` need them to: each MutatingWebhookConfiguration entry calls
//! a Service that exists, on a port it has, at a path the binary serves and that
//! matches how the entry selects pods; the Service reaches the port the Deployment's
//! `--listen` binds; the serving certificate is mounted whole from the Secret its
//! cert-manager Certificate writes, and is valid for the Service's name; the webhook
//! cannot block its own namespace or kube-system; probes ask `/healthz` over HTTPS.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhook;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use wasmbassador::inject::INJECT;
use wasmbassador::webhook::{NAMESPACE_PATH, OptIn, POD_PATH};

use super::custom::Custom;
use super::{Doc, Mounted, Object, flag, resolve};

/// Annotation with which cert-manager's cainjector fills in the caBundle.
pub const INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";

/// The webhook Deployment's pod spec and container (the one running `webhook`).
fn webhook_container<'a>(docs: &'a [Doc], namespace: &str) -> Option<(&'a Doc, &'a PodSpec, &'a Container)> {
    docs.iter().find_map(|d| {
        let Object::Deployment(dep) = &d.object else {
            return None;
        };
        if dep.metadata.namespace.as_deref().unwrap_or_default() != namespace {
            return None;
        }
        let spec = d.object.pod_spec()?;
        let c = spec.containers.iter().find(|c| {
            c.args
                .as_ref()
                .and_then(|a| a.first())
                .is_some_and(|a| a == "webhook")
        })?;
        Some((d, spec, c))
    })
}

fn service<'a>(docs: &'a [Doc], namespace: &str, name: &str) -> Option<&'a Service> {
    docs.iter().find_map(|d| match &d.object {
        Object::Service(s)
            if s.metadata.name.as_deref() == Some(name)
                && s.metadata.namespace.as_deref() == Some(namespace) =>
        {
            Some(s)
        }
        _ => None,
    })
}

fn certificate<'a>(docs: &'a [Doc], namespace: &str, name: &str) -> Option<&'a Custom> {
    docs.iter().find_map(|d| match &d.object {
        Object::Custom(
            c @ Custom::Certificate {
                namespace: ns,
                name: n,
                ..
            },
        ) if ns == namespace && n == name => Some(c),
        _ => None,
    })
}

/// Whether `selector` leaves out the namespace `name` (a `NotIn` on
/// `kubernetes.io/metadata.name`, the label every namespace carries since 1.22).
fn excludes(selector: Option<&LabelSelector>, name: &str) -> bool {
    selector
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .any(|e| {
            e.key == "kubernetes.io/metadata.name"
                && e.operator == "NotIn"
                && e.values.iter().flatten().any(|v| v == name)
        })
}

fn selects_label(selector: Option<&LabelSelector>) -> bool {
    selector
        .and_then(|s| s.match_labels.as_ref())
        .is_some_and(|l| l.get(INJECT).is_some_and(|v| v == "true"))
}

/// Every problem found in the webhook objects among `docs` (empty when all is well).
pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let configs: Vec<_> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::MutatingWebhookConfiguration(m) => Some((d, m)),
            _ => None,
        })
        .collect();
    if configs.is_empty() {
        p.push("no MutatingWebhookConfiguration".to_string());
    }
    for (d, config) in configs {
        let origin = &d.origin;
        if config.metadata.namespace.is_some() {
            p.push(format!(
                "{origin}: a MutatingWebhookConfiguration is cluster-scoped; drop metadata.namespace"
            ));
        }
        let ca_from = config
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INJECT_CA_FROM));
        let cert = match ca_from.and_then(|v| v.split_once('/')) {
            Some((ns, name)) => {
                let cert = certificate(docs, ns, name);
                if cert.is_none() {
                    p.push(format!(
                        "{origin}: {INJECT_CA_FROM} names Certificate {ns}/{name}, which is not defined"
                    ));
                }
                cert
            }
            None => None,
        };
        for w in config.webhooks.iter().flatten() {
            check_entry(docs, origin, w, ca_from.is_some(), cert, &mut p);
        }
    }
    p
}

fn check_entry(
    docs: &[Doc],
    origin: &str,
    w: &MutatingWebhook,
    ca_injected: bool,
    cert: Option<&Custom>,
    p: &mut Vec<String>,
) {
    let at = format!("{origin} webhook {:?}", w.name);
    if !w.admission_review_versions.iter().any(|v| v == "v1") {
        p.push(format!(
            "{at}: admissionReviewVersions lacks \"v1\", the only version served"
        ));
    }
    if w.side_effects != "None" {
        p.push(format!(
            "{at}: sideEffects should be None (the webhook only answers)"
        ));
    }
    if w.failure_policy.is_none() {
        p.push(format!("{at}: failurePolicy is not set; choose it (and say why)"));
    }
    let pods_on_create = w.rules.iter().flatten().any(|r| {
        r.operations.iter().flatten().any(|o| o == "CREATE" || o == "*")
            && r.resources.iter().flatten().any(|r| r == "pods")
            && r.api_groups.iter().flatten().any(|g| g.is_empty())
    });
    if !pods_on_create {
        p.push(format!("{at}: no rule sends pod CREATE requests"));
    }
    if w.client_config.ca_bundle.is_none() && !ca_injected {
        p.push(format!(
            "{at}: no caBundle and no {INJECT_CA_FROM} annotation: the API server cannot trust the webhook"
        ));
    }
    let Some(svc_ref) = &w.client_config.service else {
        p.push(format!("{at}: clientConfig names no Service"));
        return;
    };
    let (ns, name) = (svc_ref.namespace.as_str(), svc_ref.name.as_str());
    for protected in [ns, "kube-system"] {
        if !excludes(w.namespace_selector.as_ref(), protected) {
            p.push(format!(
                "{at}: namespaceSelector does not exclude namespace {protected:?}: with the webhook down, \
                 its own pods (or the cluster's) could not be created"
            ));
        }
    }
    // The path must say how the entry chose the pod: the API server never sends
    // namespace labels, so only the path tells the webhook a namespace opted in.
    let path = svc_ref.path.as_deref().unwrap_or("/");
    match OptIn::from_path(path) {
        None => p.push(format!(
            "{at}: calls {path}, which the webhook does not serve ({POD_PATH}, {NAMESPACE_PATH})"
        )),
        Some(OptIn::Pod) if selects_label(w.namespace_selector.as_ref()) => p.push(format!(
            "{at}: selects namespaces by label but calls {POD_PATH}, which injects only pods that opt in \
             themselves; call {NAMESPACE_PATH}"
        )),
        Some(OptIn::Namespace) if !selects_label(w.namespace_selector.as_ref()) => p.push(format!(
            "{at}: calls {NAMESPACE_PATH}, which injects every pod it is sent, but does not select \
             namespaces by the {INJECT} label"
        )),
        Some(OptIn::Pod) if !selects_label(w.object_selector.as_ref()) => p.push(format!(
            "{at}: calls {POD_PATH} without an objectSelector on the {INJECT} label: every pod is sent"
        )),
        Some(_) => {}
    }
    let Some(svc) = service(docs, ns, name) else {
        p.push(format!("{at}: calls Service {ns}/{name}, which is not defined"));
        return;
    };
    let port = svc_ref.port.unwrap_or(443);
    let Some(svc_port) = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|sp| sp.port == port)
    else {
        p.push(format!(
            "{at}: calls port {port}, which Service {name} does not have"
        ));
        return;
    };
    if let Some(Custom::Certificate { dns_names, .. }) = cert {
        let dns = format!("{name}.{ns}.svc");
        if !dns_names.contains(&dns) {
            p.push(format!(
                "{at}: the Certificate's dnsNames {dns_names:?} lack {dns}, the name the API server verifies"
            ));
        }
    }
    let Some((dep, spec, c)) = webhook_container(docs, ns) else {
        p.push(format!("{at}: no Deployment in {ns} runs `wasmbassador webhook`"));
        return;
    };
    let labels = match &dep.object {
        Object::Deployment(d) => d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref()?.labels.clone()),
        _ => None,
    }
    .unwrap_or_default();
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if selector.is_empty() || selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        p.push(format!(
            "{at}: Service {name}'s selector {selector:?} does not select the webhook's pods {labels:?}"
        ));
    }
    check_container(
        &at,
        spec,
        c,
        svc_port.target_port.as_ref().unwrap_or(&IntOrString::Int(port)),
        cert,
        p,
    );
}

/// The container port `port` names (by number or by name), if the container has it.
fn container_port(c: &Container, port: &IntOrString) -> Option<i32> {
    c.ports.iter().flatten().find_map(|cp| match port {
        IntOrString::Int(n) => (cp.container_port == *n).then_some(*n),
        IntOrString::String(s) => (cp.name.as_deref() == Some(s)).then_some(cp.container_port),
    })
}

fn check_container(
    at: &str,
    spec: &PodSpec,
    c: &Container,
    target: &IntOrString,
    cert: Option<&Custom>,
    p: &mut Vec<String>,
) {
    let args = c.args.clone().unwrap_or_default();
    let listen = flag(&args, "--listen").unwrap_or("0.0.0.0:8443");
    let listen_port = listen
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| i32::from(a.port()));
    if listen_port.is_none() {
        p.push(format!("{at}: --listen {listen} is not an address"));
    }
    match container_port(c, target) {
        None => p.push(format!(
            "{at}: the Service's targetPort {target:?} is not a port of the webhook container"
        )),
        Some(n) if Some(n) != listen_port => p.push(format!(
            "{at}: the Service reaches container port {n}, but the webhook listens on {listen}"
        )),
        Some(_) => {}
    }
    for (probe_name, probe) in [
        ("readinessProbe", &c.readiness_probe),
        ("livenessProbe", &c.liveness_probe),
    ] {
        let get = probe.as_ref().and_then(|pr| pr.http_get.as_ref());
        let Some(get) = get else {
            p.push(format!("{at}: the webhook container has no httpGet {probe_name}"));
            continue;
        };
        if get.path.as_deref() != Some("/healthz") || get.scheme.as_deref() != Some("HTTPS") {
            p.push(format!("{at}: {probe_name} should ask /healthz over HTTPS"));
        }
        if container_port(c, &get.port) != listen_port {
            p.push(format!(
                "{at}: {probe_name} port {:?} is not the port the webhook listens on",
                get.port
            ));
        }
    }
    let secret_name = match cert {
        Some(Custom::Certificate { secret_name, .. }) => Some(secret_name.as_str()),
        _ => None,
    };
    for (arg, key) in [("--cert", "tls.crt"), ("--key", "tls.key")] {
        let Some(path) = flag(&args, arg) else {
            p.push(format!("{at}: the webhook runs without {arg}"));
            continue;
        };
        match resolve(spec, c, path, p) {
            Mounted::Secret {
                name,
                key: k,
                sub_path,
            } => {
                if sub_path {
                    p.push(format!(
                        "{at}: {arg} {path} is mounted with subPath: a renewed certificate would never reach it"
                    ));
                }
                if k != key {
                    p.push(format!(
                        "{at}: {arg} {path} is key {k:?} of the Secret, expected {key:?}"
                    ));
                }
                if secret_name.is_some_and(|s| s != name) {
                    p.push(format!(
                        "{at}: {arg} comes from Secret {name:?}, but the Certificate writes {:?}",
                        secret_name.unwrap_or_default()
                    ));
                }
            }
            other => p.push(format!(
                "{at}: {arg} {path} is not mounted from a Secret ({other:?})"
            )),
        }
    }
    let non_root = c
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_non_root)
        .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_non_root));
    if non_root != Some(true) {
        p.push(format!("{at}: the webhook should run with runAsNonRoot: true"));
    }
    let memory_limit = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.contains_key("memory"));
    if !memory_limit {
        p.push(format!("{at}: the webhook container has no memory limit"));
    }
}
