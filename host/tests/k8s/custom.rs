//! cert-manager's Certificate and Issuer, which k8s-openapi has no types for: checked
//! loosely but usefully. The fields the webhook example relies on must be there with
//! the right type, and `spec` (and `issuerRef`, `privateKey`) may hold only keys
//! cert-manager's v1 API defines, so a misspelt field is still caught.

use serde_json::{Map, Value};

/// The API version of every cert-manager object accepted.
pub const CERT_MANAGER: &str = "cert-manager.io/v1";

const CERTIFICATE_SPEC: &[&str] = &[
    "secretName",
    "issuerRef",
    "dnsNames",
    "ipAddresses",
    "uris",
    "emailAddresses",
    "otherNames",
    "commonName",
    "literalSubject",
    "subject",
    "duration",
    "renewBefore",
    "renewBeforePercentage",
    "isCA",
    "usages",
    "privateKey",
    "secretTemplate",
    "keystores",
    "revisionHistoryLimit",
    "additionalOutputFormats",
    "encodeUsagesInRequest",
    "nameConstraints",
    "signatureAlgorithm",
];
const ISSUER_TYPES: &[&str] = &["selfSigned", "ca", "acme", "vault", "venafi"];
const ISSUER_REF: &[&str] = &["name", "kind", "group"];
const PRIVATE_KEY: &[&str] = &["algorithm", "size", "encoding", "rotationPolicy"];

/// A cert-manager object: what the webhook checks need of it.
#[derive(Debug, Clone)]
pub enum Custom {
    /// A Certificate.
    Certificate {
        /// metadata.namespace (empty when absent).
        namespace: String,
        /// metadata.name.
        name: String,
        /// spec.secretName: the Secret cert-manager writes.
        secret_name: String,
        /// spec.dnsNames.
        dns_names: Vec<String>,
        /// spec.issuerRef.name and kind (`Issuer` when absent).
        issuer: (String, String),
    },
    /// An Issuer or ClusterIssuer.
    Issuer {
        /// `Issuer` or `ClusterIssuer`.
        kind: String,
        /// metadata.namespace (empty when absent).
        namespace: String,
        /// metadata.name.
        name: String,
    },
}

fn only_known(path: &str, map: &Map<String, Value>, known: &[&str]) -> Result<(), String> {
    let unknown: Vec<_> = map
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("{path}.{k}"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown fields (cert-manager would reject them): {}",
            unknown.join(", ")
        ))
    }
}

fn string(doc: &Value, pointer: &str) -> Result<String, String> {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "{} is missing or not a string",
                pointer.trim_start_matches('/').replace('/', ".")
            )
        })
}

fn object<'a>(doc: &'a Value, pointer: &str) -> Result<&'a Map<String, Value>, String> {
    doc.pointer(pointer).and_then(Value::as_object).ok_or_else(|| {
        format!(
            "{} is missing or not a mapping",
            pointer.trim_start_matches('/').replace('/', ".")
        )
    })
}

/// Checks a `cert-manager.io/v1` document and returns what the checks need of it.
pub fn loose(doc: &Value) -> Result<Custom, String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = string(doc, "/metadata/name")?;
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spec = object(doc, "/spec")?;
    match kind {
        "Certificate" => {
            only_known("spec", spec, CERTIFICATE_SPEC)?;
            only_known("spec.issuerRef", object(doc, "/spec/issuerRef")?, ISSUER_REF)?;
            if let Some(key) = spec.get("privateKey") {
                only_known(
                    "spec.privateKey",
                    key.as_object().ok_or("spec.privateKey is not a mapping")?,
                    PRIVATE_KEY,
                )?;
            }
            let dns_names = match spec.get("dnsNames") {
                None => Vec::new(),
                Some(list) => list
                    .as_array()
                    .and_then(|l| l.iter().map(|n| n.as_str().map(str::to_string)).collect())
                    .ok_or("spec.dnsNames is not a list of strings")?,
            };
            Ok(Custom::Certificate {
                namespace,
                name,
                secret_name: string(doc, "/spec/secretName")?,
                dns_names,
                issuer: (
                    string(doc, "/spec/issuerRef/name")?,
                    doc["spec"]["issuerRef"]["kind"]
                        .as_str()
                        .unwrap_or("Issuer")
                        .to_string(),
                ),
            })
        }
        "Issuer" | "ClusterIssuer" => {
            only_known("spec", spec, ISSUER_TYPES)?;
            if spec.len() != 1 {
                return Err(format!(
                    "spec must name exactly one issuer type of {ISSUER_TYPES:?}"
                ));
            }
            Ok(Custom::Issuer {
                kind: kind.to_string(),
                namespace,
                name,
            })
        }
        other => Err(format!("unexpected cert-manager kind {other:?}")),
    }
}
