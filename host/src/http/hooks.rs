//! The per-request plugin hooks of an `http` listener: `on-request` in the listener's
//! `plugins` order before the upstream is chosen, `on-response` in reverse order before
//! the response head goes to the application.
//!
//! Header edits are applied to the real header map between plugins, so each plugin
//! sees the edits of those before it. Edits that would change how the message is
//! framed or carried (hop-by-hop fields, `host`, `content-length`) are skipped and
//! logged: the host owns those, and a plugin that set them could desynchronise the
//! connection for every later request on it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::{Body, Ctx, Plan, Trace, local};
use crate::config::OnError;
use crate::plugin::packed::{RequestArgs, RequestHead, ResponseArgs, ResponseHead};
use crate::plugin::{HeaderEdit, Loaded, LocalResponse, RequestAction, ResponseSource, RouteTarget};

/// Fields a plugin may not set or remove.
fn reserved(name: &HeaderName) -> bool {
    name == HOST || name == CONTENT_LENGTH || super::headers::is_hop_by_hop(name)
}

impl Ctx {
    /// Serves one request through the listener's plugins.
    pub(super) async fn with_plugins(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let chain: Arc<[Arc<Loaded>]> = self
            .st
            .chain
            .current(&self.shared.plugins, &self.st.config.plugins)
            .unwrap_or_default();
        let listener_upstream = self.st.config.upstream.as_str();
        if super::headers::wants_upgrade(&req) {
            // The hooks see requests and responses; an upgraded connection is neither.
            let plan = Plan {
                upstream: listener_upstream,
                tag: None,
                retryable: false,
                routed_by: None,
            };
            return self.forward(req, &plan, &mut Trace::default()).await;
        }
        // Hop-by-hop fields went in `proxy`.
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts
                .headers
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        parts.headers.remove(HOST);
        let listener = self.st.config.name.as_str();
        let client_addr = self
            .client_addr
            .get_or_init(|| crate::plugin::addr_text(self.peer))
            .as_str();
        // Kept for `on-response` (the request moves upstream); clones of these share
        // their bytes with the request.
        let method = parts.method.clone();
        let path_and_query = parts.uri.path_and_query().cloned();
        let path = path_and_query.as_ref().map_or("/", |p| p.as_str());
        // Where the request goes as the plugins see it: the listener's upstream until
        // a plugin routes it to another.
        let mut upstream_seen = std::borrow::Cow::Borrowed(listener_upstream);
        let mut args = RequestArgs::default();
        let mut route: Option<(RouteTarget, String)> = None;
        let mut retryable = false;
        let mut reached = 0;
        let mut early: Option<(Response<Body>, ResponseSource)> = None;
        for p in chain.iter() {
            reached += 1;
            if !p.wants_requests() {
                continue;
            }
            let head = RequestHead {
                listener,
                client_addr,
                method: method.as_str(),
                path,
                authority: authority.as_deref(),
                headers: &parts.headers,
                upstream: &upstream_seen,
            };
            let failed = match p.on_request(&head, &mut args) {
                Ok(RequestAction::Forward(f)) => {
                    if !f.headers.is_empty() {
                        apply_header_edits(&mut parts.headers, f.headers, p.name(), "request");
                        args.clear();
                    }
                    if let Some(target) = f.route {
                        if let RouteTarget::Upstream(name) = &target {
                            upstream_seen = std::borrow::Cow::Owned(name.clone());
                            args.clear();
                        }
                        route = Some((target, p.name().to_string()));
                    }
                    retryable |= f.retryable;
                    continue;
                }
                Ok(RequestAction::Respond(r)) => match local_response(r, p.name()) {
                    Ok(resp) => {
                        early = Some((resp, ResponseSource::Plugin));
                        break;
                    }
                    Err(why) => why,
                },
                Err(e) => format!("plugin {} failed ({})", p.name(), e.kind()),
            };
            if p.on_error() == OnError::Deny {
                tracing::warn!(listener = %self.st.config.name, plugin = %p.name(), "request refused: {failed}");
                early = Some((
                    local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("wasmbassador: {failed}\n"),
                    ),
                    ResponseSource::Host,
                ));
                break;
            }
        }
        let (upstream, tag, routed_by) = match &route {
            None => (listener_upstream, None, None),
            Some((RouteTarget::Upstream(name), by)) => (name.as_str(), None, Some(by.as_str())),
            Some((RouteTarget::Tag(tag), by)) => (listener_upstream, Some(tag.as_str()), Some(by.as_str())),
        };
        let mut trace = Trace::default();
        let (resp, source) = match early {
            Some(pair) => pair,
            None => {
                let plan = Plan {
                    upstream,
                    tag,
                    retryable,
                    routed_by,
                };
                let resp = self
                    .forward(Request::from_parts(parts, body), &plan, &mut trace)
                    .await;
                let source = if trace.from_upstream {
                    ResponseSource::Upstream
                } else {
                    ResponseSource::Host
                };
                (resp, source)
            }
        };
        let ran = &chain[..reached];
        if !ran.iter().any(|p| p.wants_responses()) {
            return resp;
        }
        let (mut resp_parts, body) = resp.into_parts();
        let endpoint = trace.endpoint.as_ref().map(|e| e.config.address.as_str());
        let duration_ns = started.elapsed().as_nanos() as u64;
        let mut args = ResponseArgs::default();
        for p in ran.iter().rev() {
            let head = ResponseHead {
                listener,
                method: method.as_str(),
                path,
                upstream,
                endpoint,
                status: resp_parts.status.as_u16(),
                headers: &resp_parts.headers,
                source,
                duration_ns,
                attempts: trace.attempts,
            };
            let edits = p.on_response(&head, &mut args);
            if !edits.is_empty() {
                apply_header_edits(&mut resp_parts.headers, edits, p.name(), "response");
                args.clear();
            }
        }
        Response::from_parts(resp_parts, body)
    }
}

/// The most header edits one hook call may make; the rest are skipped and logged. A
/// header map holds at most 32,768 fields, and a plugin has no business near that.
const MAX_EDITS: usize = 1024;

/// Applies a plugin's header edits in order, as a request or response passes it (`side`
/// names which, in the log); an invalid or reserved one is skipped and logged. Public
/// so that the plugin bench edits headers as a listener does.
pub fn apply_header_edits(headers: &mut HeaderMap, edits: Vec<HeaderEdit>, plugin: &str, side: &str) {
    if edits.len() > MAX_EDITS {
        tracing::warn!(%plugin, side, edits = edits.len(), "plugin header edits past the first {MAX_EDITS} skipped");
    }
    for edit in edits.into_iter().take(MAX_EDITS) {
        let (name, value) = match &edit {
            HeaderEdit::Set(h) | HeaderEdit::Append(h) => (&h.name, Some(&h.value)),
            HeaderEdit::Remove(name) => (name, None),
        };
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            tracing::warn!(%plugin, side, name = %name.escape_debug(), "plugin header edit skipped: not a valid field name");
            continue;
        };
        if reserved(&name) {
            tracing::warn!(%plugin, side, %name, "plugin header edit skipped: the host manages this field");
            continue;
        }
        let value = match value.map(|v| HeaderValue::from_bytes(v)) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => {
                tracing::warn!(%plugin, side, %name, "plugin header edit skipped: not a valid field value");
                continue;
            }
        };
        let full = match (edit, value) {
            (HeaderEdit::Set(_), Some(v)) => headers.try_insert(name, v).is_err(),
            (HeaderEdit::Append(_), Some(v)) => headers.try_append(name, v).is_err(),
            _ => {
                headers.remove(name);
                false
            }
        };
        if full {
            tracing::warn!(%plugin, side, "plugin header edits skipped: the header map is full");
            return;
        }
    }
}

/// A plugin's local answer, or why it cannot be sent (counted as the plugin failing).
fn local_response(r: LocalResponse, plugin: &str) -> Result<Response<Body>, String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            format!(
                "plugin {plugin} answered with status {}, which is not 200 to 599",
                r.status
            )
        })?;
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(r.body))));
    *resp.status_mut() = status;
    let edits = r.headers.into_iter().map(HeaderEdit::Append).collect();
    apply_header_edits(resp.headers_mut(), edits, plugin, "local response");
    Ok(resp)
}
