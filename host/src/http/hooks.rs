//! The per-request plugin hooks of an `http` listener: `on-request` in the listener's
//! `plugins` order before the upstream is chosen, `on-response` in reverse order before
//! the response head goes to the application. Both paths use them: hyper's
//! ([`Ctx::with_plugins`]) and the HTTP/1.1 fast path (`fast.rs`), which hands a
//! request whose hooks already ran over to hyper as a [`Prepared`] when it cannot
//! carry it itself, so that no hook sees a request twice.
//!
//! Header edits are applied to the real header map between plugins, so each plugin
//! sees the edits of those before it. Edits that would change how the message is
//! framed or carried (hop-by-hop fields, `host`, `content-length`) are skipped and
//! logged: the host owns those, and a plugin that set them could desynchronise the
//! connection for every later request on it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::{Body, Ctx, Plan, Trace};
use crate::config::OnError;
use crate::plugin::packed::{RequestArgs, RequestHead, ResponseArgs, ResponseHead};
use crate::plugin::{HeaderEdit, Loaded, LocalResponse, RequestAction, ResponseSource, RouteTarget};

/// Fields a plugin may not set or remove.
fn reserved(name: &HeaderName) -> bool {
    name == HOST || name == CONTENT_LENGTH || super::headers::is_hop_by_hop(name)
}

/// A local answer made before any upstream was asked: a plugin's own, or the host's
/// when a plugin failed and its policy is `deny`.
pub(super) struct Early {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub source: ResponseSource,
}

impl Early {
    /// The host's plain-text answer (what [`super::local`] makes of it).
    pub fn text(status: StatusCode, text: String) -> Self {
        let mut headers = HeaderMap::with_capacity(1);
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Early {
            status,
            headers,
            body: Bytes::from(text),
            source: ResponseSource::Host,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(Either::Right(Full::new(self.body)));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers;
        resp
    }
}

/// What a listener's `on-request` hooks decided for one request.
pub(super) struct Decision {
    /// The chain the request met: the listener's plugins as loaded when it came.
    pub chain: Arc<[Arc<Loaded>]>,
    /// How many of `chain` ran; `on-response` runs for those only.
    pub reached: usize,
    /// The last route a plugin chose, and that plugin's name.
    pub route: Option<(RouteTarget, String)>,
    /// A plugin marked the request retryable.
    pub retryable: bool,
    /// The answer, when a plugin (or its failure) ended the chain.
    pub early: Option<Early>,
    /// When the request head was in.
    pub started: Instant,
}

impl Decision {
    /// The plugins whose `on-response` may run.
    pub fn ran(&self) -> &[Arc<Loaded>] {
        &self.chain[..self.reached]
    }

    /// Whether any plugin that ran wants to see the response.
    pub fn wants_responses(&self) -> bool {
        self.ran().iter().any(|p| p.wants_responses())
    }

    /// Where the request goes: upstream, endpoint tag, and the plugin that chose.
    pub fn target<'a>(&'a self, listener_upstream: &'a str) -> (&'a str, Option<&'a str>, Option<&'a str>) {
        match &self.route {
            None => (listener_upstream, None, None),
            Some((RouteTarget::Upstream(name), by)) => (name.as_str(), None, Some(by.as_str())),
            Some((RouteTarget::Tag(tag), by)) => (listener_upstream, Some(tag.as_str()), Some(by.as_str())),
        }
    }
}

/// A request whose `on-request` hooks ran on the fast path, handed to hyper with the
/// connection: hyper's first request on it is this one, and takes this decision and
/// these (edited) fields instead of running the hooks again.
pub(super) struct Prepared {
    pub decision: Decision,
    pub headers: HeaderMap,
}

/// The facts of a response that `on-response` sees besides its fields.
pub(super) struct Answered<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub upstream: &'a str,
    pub endpoint: Option<&'a str>,
    pub status: u16,
    pub source: ResponseSource,
    pub attempts: u32,
}

impl Ctx {
    /// The listener's plugins as loaded now.
    fn chain(&self) -> Arc<[Arc<Loaded>]> {
        self.st
            .chain
            .current(&self.shared.plugins, &self.st.config.plugins)
            .unwrap_or_default()
    }

    /// Runs `on-request` in chain order over a request whose hop-by-hop fields and
    /// `Host` are gone from `headers` (the authority is passed apart); the plugins'
    /// edits are applied to `headers`.
    pub(super) fn request_hooks(
        &self,
        method: &str,
        path: &str,
        authority: Option<&str>,
        headers: &mut HeaderMap,
    ) -> Decision {
        let started = Instant::now();
        let chain = self.chain();
        let listener_upstream = self.st.config.upstream.as_str();
        let listener = self.st.config.name.as_str();
        let client_addr = self
            .client_addr
            .get_or_init(|| crate::plugin::addr_text(self.peer))
            .as_str();
        // Where the request goes as the plugins see it: the listener's upstream until
        // a plugin routes it to another.
        let mut upstream_seen = std::borrow::Cow::Borrowed(listener_upstream);
        let mut args = RequestArgs::default();
        let mut route: Option<(RouteTarget, String)> = None;
        let mut retryable = false;
        let mut reached = 0;
        let mut early: Option<Early> = None;
        for p in chain.iter() {
            reached += 1;
            if !p.wants_requests() {
                continue;
            }
            let head = RequestHead {
                listener,
                client_addr,
                method,
                path,
                authority,
                headers,
                upstream: &upstream_seen,
            };
            let failed = match p.on_request(&head, &mut args) {
                Ok(RequestAction::Forward(f)) => {
                    if !f.headers.is_empty() {
                        apply_header_edits(headers, f.headers, p.name(), "request");
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
                    Ok(answer) => {
                        early = Some(answer);
                        break;
                    }
                    Err(why) => why,
                },
                Err(e) => format!("plugin {} failed ({})", p.name(), e.kind()),
            };
            if p.on_error() == OnError::Deny {
                tracing::warn!(listener = %self.st.config.name, plugin = %p.name(), "request refused: {failed}");
                early = Some(Early::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("wasmbassador: {failed}\n"),
                ));
                break;
            }
        }
        Decision {
            chain,
            reached,
            route,
            retryable,
            early,
            started,
        }
    }

    /// Runs `on-response` in reverse chain order over the plugins `d` reached; their
    /// edits are applied to `headers`. Whether any plugin asked for an edit.
    pub(super) fn response_hooks(&self, d: &Decision, a: &Answered<'_>, headers: &mut HeaderMap) -> bool {
        let mut edited = false;
        let duration_ns = d.started.elapsed().as_nanos() as u64;
        let mut args = ResponseArgs::default();
        for p in d.ran().iter().rev() {
            let head = ResponseHead {
                listener: &self.st.config.name,
                method: a.method,
                path: a.path,
                upstream: a.upstream,
                endpoint: a.endpoint,
                status: a.status,
                headers,
                source: a.source,
                duration_ns,
                attempts: a.attempts,
            };
            let edits = p.on_response(&head, &mut args);
            if !edits.is_empty() {
                apply_header_edits(headers, edits, p.name(), "response");
                args.clear();
                edited = true;
            }
        }
        edited
    }

    /// The request the fast path prepared, if it handed one over.
    fn take_prepared(&self) -> Option<Prepared> {
        self.prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Serves one request through the listener's plugins.
    pub(super) async fn with_plugins(&self, req: Request<Incoming>) -> Response<Body> {
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
        // Kept for `on-response` (the request moves upstream); clones of these share
        // their bytes with the request.
        let method = parts.method.clone();
        let path_and_query = parts.uri.path_and_query().cloned();
        let path = path_and_query.as_ref().map_or("/", |p| p.as_str());
        let mut decision = match self.take_prepared() {
            Some(p) => {
                parts.headers = p.headers;
                p.decision
            }
            None => self.request_hooks(method.as_str(), path, authority.as_deref(), &mut parts.headers),
        };
        let early = decision.early.take();
        let (upstream, tag, routed_by) = decision.target(listener_upstream);
        let mut trace = Trace::default();
        let (resp, source) = match early {
            Some(e) => {
                let source = e.source;
                (e.into_response(), source)
            }
            None => {
                let plan = Plan {
                    upstream,
                    tag,
                    retryable: decision.retryable,
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
        if !decision.wants_responses() {
            return resp;
        }
        let (mut resp_parts, body) = resp.into_parts();
        let answered = Answered {
            method: method.as_str(),
            path,
            upstream,
            endpoint: trace.endpoint.as_ref().map(|e| e.config.address.as_str()),
            status: resp_parts.status.as_u16(),
            source,
            attempts: trace.attempts,
        };
        self.response_hooks(&decision, &answered, &mut resp_parts.headers);
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
fn local_response(r: LocalResponse, plugin: &str) -> Result<Early, String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            format!(
                "plugin {plugin} answered with status {}, which is not 200 to 599",
                r.status
            )
        })?;
    let mut headers = HeaderMap::new();
    let edits = r.headers.into_iter().map(HeaderEdit::Append).collect();
    apply_header_edits(&mut headers, edits, plugin, "local response");
    Ok(Early {
        status,
        headers,
        body: Bytes::from(r.body),
        source: ResponseSource::Plugin,
    })
}
