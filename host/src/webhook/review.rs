//! The pure half of the webhook: the body of an AdmissionReview request in, the
//! AdmissionReview to answer with out. No I/O, so tests and embedders call it directly.

use base64::Engine;
use serde_json::{Value, json};

use crate::inject::{self, InjectOptions};

/// The only AdmissionReview version served; the MutatingWebhookConfiguration must say
/// `admissionReviewVersions: ["v1"]` (v1beta1 was removed in Kubernetes 1.22).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Path for pods that opt in themselves (label, or annotation, `wasmbassador.io/inject: "true"`).
pub const POD_PATH: &str = "/mutate";
/// Path for pods in a namespace labelled `wasmbassador.io/inject: "true"`: injects by default.
pub const NAMESPACE_PATH: &str = "/mutate-namespace";

/// Which opt-in rule judges a request. The API server sends the pod but never its
/// namespace's labels, so the webhook cannot tell by itself whether a namespace opted
/// in; the MutatingWebhookConfiguration can (its `namespaceSelector`), and says so by
/// the path it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    /// [`POD_PATH`]: only pods that carry `wasmbassador.io/inject: "true"` are injected.
    Pod,
    /// [`NAMESPACE_PATH`]: every pod is injected unless it says `"false"`.
    Namespace,
}

impl OptIn {
    /// The rule a URL path stands for; `None` for paths that are not admission paths.
    pub fn from_path(path: &str) -> Option<OptIn> {
        match path {
            POD_PATH => Some(OptIn::Pod),
            NAMESPACE_PATH => Some(OptIn::Namespace),
            _ => None,
        }
    }

    /// The URL path of this rule.
    pub fn path(self) -> &'static str {
        match self {
            OptIn::Pod => POD_PATH,
            OptIn::Namespace => NAMESPACE_PATH,
        }
    }
}

/// Why a request body is not an AdmissionReview that can be answered. The server
/// turns these into HTTP 400 with the message: there is no `uid` to answer to.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The body does not parse as JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but not an `admission.k8s.io/v1` `AdmissionReview`.
    #[error(
        "expected apiVersion {API_VERSION:?} kind \"AdmissionReview\", got apiVersion {api_version} kind {kind}"
    )]
    NotAdmissionReview {
        /// The `apiVersion` found (JSON text, `null` when absent).
        api_version: String,
        /// The `kind` found (JSON text, `null` when absent).
        kind: String,
    },
    /// A required field is absent or of the wrong type.
    #[error("{field} is missing or not {expected}")]
    Field {
        /// Its path, such as `request.uid`.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
}

/// What the webhook decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allowed with a JSONPatch that adds the sidecar.
    Injected,
    /// Allowed unchanged, for the reason given.
    Skipped(&'static str),
    /// Not allowed, with this message for the user.
    Refused(String),
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Injected => f.write_str("injected"),
            Decision::Skipped(why) => write!(f, "not injected: {why}"),
            Decision::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// The answer to one AdmissionReview, with what the log needs to say about it.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The request's `uid`, echoed in the response.
    pub uid: String,
    /// The request's namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// The pod's name, or its `generateName` followed by `*` when the name is not yet
    /// chosen (pods of a ReplicaSet or Job).
    pub pod: String,
    /// Whether the request is a dry run (patching one is fine: the webhook has no side
    /// effects).
    pub dry_run: bool,
    /// What was decided.
    pub decision: Decision,
    /// The patch, when [`Decision::Injected`].
    pub patch: Option<json_patch::Patch>,
    /// The AdmissionReview to send back.
    pub response: Value,
}

/// Answers the AdmissionReview in `body` under the rule `opt_in`.
///
/// A pod that opts in (or, under [`OptIn::Namespace`], does not opt out) is allowed
/// with a JSONPatch that turns it into exactly what [`inject::inject_document`]
/// makes of it. Anything else is allowed unchanged: other kinds, sub-resources,
/// operations other than CREATE (a pod's containers cannot change after creation),
/// pods that do not opt in, and pods that already have the sidecar.
///
/// A pod whose `wasmbassador.io/inject` is neither `"true"` nor `"false"` (say
/// `"yes"`) is **refused** with a message naming the value. Skipping it would start a
/// pod whose app finds nothing on `localhost:5432`, and injecting it would guess at
/// what the author meant; refusing makes `kubectl apply` (or the ReplicaSet's events)
/// say what to fix. Pods that cannot be injected for another reason (a regular
/// container already named `wasmbassador`, ...) are refused the same way.
pub fn review(body: &[u8], opt_in: OptIn, options: &InjectOptions) -> Result<Admission, ReviewError> {
    let review: Value = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    if review["apiVersion"] != API_VERSION || review["kind"] != "AdmissionReview" {
        return Err(ReviewError::NotAdmissionReview {
            api_version: review["apiVersion"].to_string(),
            kind: review["kind"].to_string(),
        });
    }
    let request = &review["request"];
    if !request.is_object() {
        return Err(ReviewError::Field {
            field: "request",
            expected: "an object",
        });
    }
    let uid = request["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or(ReviewError::Field {
            field: "request.uid",
            expected: "a non-empty string",
        })?
        .to_string();
    let object = &request["object"];
    let metadata = &object["metadata"];
    let pod = match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) => format!("{prefix}*"),
        _ => request["name"].as_str().unwrap_or_default().to_string(),
    };
    let mut admission = Admission {
        uid,
        namespace: request["namespace"]
            .as_str()
            .or_else(|| metadata["namespace"].as_str())
            .unwrap_or_default()
            .to_string(),
        pod,
        dry_run: request["dryRun"].as_bool().unwrap_or(false),
        decision: Decision::Skipped("not a pod"),
        patch: None,
        response: Value::Null,
    };

    // `request.kind` is the kind the API server decoded; the object itself may lack
    // apiVersion and kind.
    let kind = request["kind"]["kind"]
        .as_str()
        .or_else(|| object["kind"].as_str());
    let is_pod = kind == Some("Pod") && request["kind"]["group"].as_str().unwrap_or_default().is_empty();
    let sub_resource = request["subResource"].as_str().unwrap_or_default();
    let operation = request["operation"].as_str().unwrap_or("CREATE");
    if !is_pod {
        admission.decision = Decision::Skipped("not a pod");
    } else if !sub_resource.is_empty() {
        admission.decision = Decision::Skipped("a sub-resource");
    } else if operation != "CREATE" {
        admission.decision = Decision::Skipped("not a CREATE");
    } else if !object.is_object() {
        return Err(ReviewError::Field {
            field: "request.object",
            expected: "the pod (an object)",
        });
    } else {
        let mut original = object.clone();
        // inject_document dispatches on `kind`; set it on both sides so the patch
        // does not touch it.
        original["kind"] = json!("Pod");
        let mut injected = original.clone();
        let options = InjectOptions {
            inject_by_default: opt_in == OptIn::Namespace,
            ..options.clone()
        };
        admission.decision = match inject::inject_document(&mut injected, &options) {
            Ok(false) if opt_in == OptIn::Namespace => Decision::Skipped("the pod opts out"),
            Ok(false) => Decision::Skipped("the pod does not opt in"),
            Ok(true) => {
                let patch = json_patch::diff(&original, &injected);
                if patch.0.is_empty() {
                    Decision::Skipped("the pod already has the sidecar")
                } else {
                    admission.patch = Some(patch);
                    Decision::Injected
                }
            }
            Err(reason) => Decision::Refused(reason),
        };
    }
    admission.response = response(&admission);
    Ok(admission)
}

/// The AdmissionReview answering `admission`.
fn response(admission: &Admission) -> Value {
    let mut response = json!({"uid": admission.uid, "allowed": true});
    match (&admission.decision, &admission.patch) {
        (Decision::Refused(message), _) => {
            response["allowed"] = json!(false);
            // 400: the pod as written is wrong; the API server passes the message on.
            response["status"] = json!({"code": 400, "message": message});
        }
        (Decision::Injected, Some(patch)) => {
            // Serialising a Patch (plain strings and JSON values) cannot fail.
            let bytes = serde_json::to_vec(patch).unwrap_or_default();
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        _ => {}
    }
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_of(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION,
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "shop",
                "object": object,
            }
        }))
        .expect("json")
    }

    fn pod(labels: Value) -> Value {
        json!({
            "metadata": {"generateName": "orders-", "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        })
    }

    #[test]
    fn a_labelled_pod_without_kind_is_patched_into_what_inject_makes() {
        let object = pod(json!({inject::INJECT: "true"}));
        let a = review(&review_of(object.clone()), OptIn::Pod, &InjectOptions::default()).expect("review");
        assert_eq!(a.decision, Decision::Injected);
        assert_eq!(a.pod, "orders-*");
        let mut patched = object.clone();
        json_patch::patch(&mut patched, &a.patch.expect("patch")).expect("applies");
        let mut want = object;
        want["kind"] = json!("Pod");
        inject::inject_document(&mut want, &InjectOptions::default()).expect("inject");
        want.as_object_mut().expect("object").remove("kind");
        assert_eq!(patched, want);
    }

    #[test]
    fn other_operations_kinds_and_sub_resources_pass_unchanged() {
        let labelled: Value =
            serde_json::from_slice(&review_of(pod(json!({inject::INJECT: "true"})))).expect("json");
        for (field, value, why) in [
            ("operation", json!("UPDATE"), "not a CREATE"),
            (
                "kind",
                json!({"group": "", "version": "v1", "kind": "ConfigMap"}),
                "not a pod",
            ),
            ("subResource", json!("ephemeralcontainers"), "a sub-resource"),
        ] {
            let mut body = labelled.clone();
            body["request"][field] = value;
            let body = serde_json::to_vec(&body).expect("json");
            let a = review(&body, OptIn::Namespace, &InjectOptions::default()).expect("review");
            assert_eq!(a.decision, Decision::Skipped(why));
            assert_eq!(a.response["response"], json!({"uid": "u-1", "allowed": true}));
        }
    }

    #[test]
    fn malformed_reviews_are_errors_not_panics() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"kind":"Pod"},"object":"x"}}"#,
        ] {
            assert!(review(body, OptIn::Pod, &InjectOptions::default()).is_err());
        }
    }
}
