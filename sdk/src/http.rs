//! The per-request hooks' types, on `http` listeners: [`Request`] and [`Action`] for
//! [`Plugin::on_request`](crate::Plugin::on_request), [`Response`] and [`HeaderEdit`]
//! for [`Plugin::on_response`](crate::Plugin::on_response).
//!
//! A request or response keeps the bytes the host sent (`packed-http-hooks`) and the
//! accessors lend slices of them: reading a field or looking up a header copies
//! nothing.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use crate::__private::bindings::exports::wasmbassador::plugin::packed_http_hooks::{
    RequestSpans, ResponseSpans,
};
use crate::__private::bindings::wasmbassador::plugin::http_types as wit;
use crate::__private::bindings::wasmbassador::plugin::types as wit_types;
use crate::Route;

use crate::connection::span_range;

/// Header fields in order, as the host passed them. Lookups ignore ASCII case.
///
/// ```
/// use wasmbassador_sdk::http::Headers;
/// let h = Headers::from_pairs(&[("x-team", "payments"), ("accept", "a"), ("Accept", "b")]);
/// assert_eq!(h.get("X-Team"), Some("payments"));
/// assert_eq!(h.get_all("accept").collect::<Vec<_>>(), [&b"a"[..], &b"b"[..]]);
/// assert!(!h.contains("authorization"));
/// ```
#[derive(Clone, Default)]
pub struct Headers {
    /// The bytes of the whole request or response; the fields are in `region`, each
    /// as `name NUL value NUL`.
    bytes: Vec<u8>,
    region: Range<usize>,
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, v)| (n, String::from_utf8_lossy(v))))
            .finish()
    }
}

impl Headers {
    /// Headers from `(name, value)` text pairs, for unit tests.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Headers {
        let mut h = Headers::default();
        for (name, value) in pairs {
            h.push(name, value.as_bytes());
        }
        h
    }

    /// Appends a field, moving the fields to the end of the bytes first if something
    /// follows them (only values built by hand, never the host's, need that).
    fn push(&mut self, name: &str, value: &[u8]) {
        if self.region.end != self.bytes.len() {
            let start = self.bytes.len();
            self.bytes.extend_from_within(self.region.clone());
            self.region = start..self.bytes.len();
        }
        // A NUL would split the field; HTTP allows none in names or values.
        if name.contains('\0') || value.contains(&0) {
            return;
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.bytes.extend_from_slice(value);
        self.bytes.push(0);
        self.region.end = self.bytes.len();
    }

    /// A text field of the same bytes (empty if it is not UTF-8, which the host never
    /// sends).
    fn text(&self, field: &Range<usize>) -> &str {
        self.bytes
            .get(field.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// Appends a text field to the bytes, after the header fields.
    fn push_text(&mut self, text: &str) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(text.as_bytes());
        start..self.bytes.len()
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let region = self.bytes.get(self.region.clone()).unwrap_or_default();
        let mut parts = region.split(|b| *b == 0);
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
    }

    /// The first value of `name` as text; `None` when there is none or it is not UTF-8
    /// (then [`get_bytes`](Headers::get_bytes) has it).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first value of `name`, as bytes.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.fields()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// Whether a field `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get_bytes(name).is_some()
    }

    /// Every field as `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields()
            .map(|(n, v)| (std::str::from_utf8(n).unwrap_or(""), v))
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.fields().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }
}

/// A request from the application, as [`Plugin::on_request`](crate::Plugin::on_request)
/// sees it: hop-by-hop fields are already gone, and `host` is [`authority`](Request::authority).
#[derive(Clone)]
pub struct Request {
    /// Its header fields, whose bytes hold the other fields too.
    headers: Headers,
    listener: Range<usize>,
    client_addr: Range<usize>,
    method: Range<usize>,
    path: Range<usize>,
    authority: Option<Range<usize>>,
    upstream: Range<usize>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("listener", &self.listener())
            .field("client_addr", &self.client_addr())
            .field("method", &self.method())
            .field("path", &self.path())
            .field("authority", &self.authority())
            .field("headers", &self.headers)
            .field("upstream", &self.upstream())
            .finish()
    }
}

impl Request {
    /// A request for unit tests: `method` and `path` (with any query) on listener `api`
    /// from `127.0.0.1:40000`, going to upstream `backend`.
    ///
    /// ```
    /// use wasmbassador_sdk::http::Request;
    /// let r = Request::new("GET", "/v1/items?limit=3").header("x-team", "payments");
    /// assert_eq!(r.path_only(), "/v1/items");
    /// assert_eq!(r.query(), Some("limit=3"));
    /// assert_eq!(r.header_value("X-Team"), Some("payments"));
    /// ```
    pub fn new(method: &str, path: &str) -> Request {
        Request::build(
            "api",
            "127.0.0.1:40000",
            method,
            path,
            Some("localhost"),
            "backend",
        )
    }

    fn build(
        listener: &str,
        client_addr: &str,
        method: &str,
        path: &str,
        authority: Option<&str>,
        upstream: &str,
    ) -> Request {
        let mut headers = Headers::default();
        let listener = headers.push_text(listener);
        let client_addr = headers.push_text(client_addr);
        let method = headers.push_text(method);
        let path = headers.push_text(path);
        let authority = authority.map(|a| headers.push_text(a));
        let upstream = headers.push_text(upstream);
        // The fields come last, where `header` can append to them.
        headers.region = headers.bytes.len()..headers.bytes.len();
        Request {
            headers,
            listener,
            client_addr,
            method,
            path,
            authority,
            upstream,
        }
    }

    /// Adds a header field (for unit tests).
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push(&name.to_ascii_lowercase(), value.as_bytes());
        self
    }

    /// The listener that received it (`listener.name`).
    pub fn listener(&self) -> &str {
        self.headers.text(&self.listener)
    }

    /// The application's address, `ip:port`.
    pub fn client_addr(&self) -> &str {
        self.headers.text(&self.client_addr)
    }

    /// The method, as sent (`GET`, `POST`, ...).
    pub fn method(&self) -> &str {
        self.headers.text(&self.method)
    }

    /// The path and query, as sent (`/v1/items?limit=10`).
    pub fn path(&self) -> &str {
        self.headers.text(&self.path)
    }

    /// The path without the query (`/v1/items`).
    pub fn path_only(&self) -> &str {
        path_only(self.path())
    }

    /// The query, without the `?`, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.path().split_once('?').map(|(_, q)| q)
    }

    /// The authority the application named (`Host` / `:authority`), if any.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_ref().map(|a| self.headers.text(a))
    }

    /// The header fields, with earlier plugins' edits applied.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Shorthand for `headers().get(name)`.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The upstream it goes to unless routed: the listener's, or an earlier plugin's
    /// route.
    pub fn upstream(&self) -> &str {
        self.headers.text(&self.upstream)
    }
}

impl From<wit::RequestInfo> for Request {
    fn from(i: wit::RequestInfo) -> Self {
        let mut r = Request::build(
            &i.listener,
            &i.client_addr,
            &i.method,
            &i.path,
            i.authority.as_deref(),
            &i.upstream,
        );
        for h in &i.headers {
            r.headers.push(&h.name, &h.value);
        }
        r
    }
}

/// `packed-http-hooks.on-request`'s argument, kept as it came: nothing is copied. A
/// span outside the bytes reads as an empty field.
pub(crate) fn unpack_request(bytes: Vec<u8>, s: &RequestSpans) -> Request {
    let f = |span| span_range(span, bytes.len());
    Request {
        listener: f(s.listener).unwrap_or(0..0),
        client_addr: f(s.client_addr).unwrap_or(0..0),
        method: f(s.method).unwrap_or(0..0),
        path: f(s.path).unwrap_or(0..0),
        authority: f(s.authority),
        upstream: f(s.upstream).unwrap_or(0..0),
        headers: Headers {
            region: f(s.headers).unwrap_or(0..0),
            bytes,
        },
    }
}

/// `/a/b?x=1` -> `/a/b`.
fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// A change to header fields. Names and values must be valid in HTTP; an invalid edit
/// is skipped by the host, which logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace every field of this name with one holding this value.
    Set(String, Vec<u8>),
    /// Add a field, keeping those of the same name.
    Append(String, Vec<u8>),
    /// Remove every field of this name.
    Remove(String),
}

impl HeaderEdit {
    /// [`HeaderEdit::Set`].
    pub fn set(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        HeaderEdit::Set(name.into(), value.into())
    }

    /// [`HeaderEdit::Append`].
    pub fn append(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        HeaderEdit::Append(name.into(), value.into())
    }

    /// [`HeaderEdit::Remove`].
    pub fn remove(name: impl Into<String>) -> Self {
        HeaderEdit::Remove(name.into())
    }
}

impl From<HeaderEdit> for wit::HeaderEdit {
    fn from(e: HeaderEdit) -> Self {
        match e {
            HeaderEdit::Set(name, value) => wit::HeaderEdit::Set(wit::Header { name, value }),
            HeaderEdit::Append(name, value) => wit::HeaderEdit::Append(wit::Header { name, value }),
            HeaderEdit::Remove(name) => wit::HeaderEdit::Remove(name),
        }
    }
}

/// What [`Plugin::on_request`](crate::Plugin::on_request) answers: send the request on
/// (changed or not), or answer the application at once.
///
/// ```
/// use wasmbassador_sdk::http::Action;
/// use wasmbassador_sdk::Route;
/// // On to the upstream with a header added and a different target:
/// let a = Action::forward()
///     .set_header("authorization", "Bearer t0ken")
///     .route(Route::Tag("canary".into()));
/// // A local answer; the upstream is not contacted:
/// let b = Action::respond(401)
///     .set_header("www-authenticate", "Bearer")
///     .body("no token\n");
/// assert!(matches!(b, Action::Respond { status: 401, .. }));
/// # let _ = a;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Go on with the chain, then to the upstream, with these changes. Build it with
    /// [`Action::forward`].
    Forward {
        /// Header edits, applied in order.
        headers: Vec<HeaderEdit>,
        /// A new target; `None` keeps the current one.
        route: Option<Route>,
        /// Let the host retry it like an idempotent request (see
        /// [`retryable`](Action::retryable)).
        retryable: bool,
    },
    /// Answer now; the chain stops. Build it with [`Action::respond`].
    Respond {
        /// The status, 200 to 599.
        status: u16,
        /// Header fields of the answer.
        headers: Vec<(String, Vec<u8>)>,
        /// Its body.
        body: Vec<u8>,
    },
}

impl Action {
    /// Forward the request unchanged (add changes with the methods below).
    pub fn forward() -> Action {
        Action::Forward {
            headers: Vec::new(),
            route: None,
            retryable: false,
        }
    }

    /// Answer the application with `status` (200 to 599; anything else counts as a plugin
    /// failure) and an empty body.
    pub fn respond(status: u16) -> Action {
        Action::Respond {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Sets a header field: of the request (replacing any of that name) when forwarding,
    /// of the answer when responding.
    pub fn set_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Action {
        match &mut self {
            Action::Forward { headers, .. } => headers.push(HeaderEdit::set(name, value)),
            Action::Respond { headers, .. } => {
                let name = name.into();
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
                headers.push((name, value.into()));
            }
        }
        self
    }

    /// Adds a header field, keeping any of the same name.
    pub fn append_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Action {
        match &mut self {
            Action::Forward { headers, .. } => headers.push(HeaderEdit::append(name, value)),
            Action::Respond { headers, .. } => headers.push((name.into(), value.into())),
        }
        self
    }

    /// Removes every request header field of this name (forwarding only).
    pub fn remove_header(mut self, name: impl Into<String>) -> Action {
        if let Action::Forward { headers, .. } = &mut self {
            headers.push(HeaderEdit::remove(name));
        }
        self
    }

    /// Sends the request to `route` (forwarding only): an upstream by name, or the
    /// endpoints of the current upstream with a tag. A later plugin's route replaces it.
    pub fn route(mut self, to: Route) -> Action {
        if let Action::Forward { route, .. } = &mut self {
            *route = Some(to);
        }
        self
    }

    /// Lets the host retry this request on a reset or a 502/503/504 like a GET, whatever
    /// its method (forwarding only). Only for requests that are safe to send twice; a
    /// body over `upstream.http.retry.buffer_body`, or of unknown length, is never
    /// retried.
    pub fn retryable(mut self) -> Action {
        if let Action::Forward { retryable, .. } = &mut self {
            *retryable = true;
        }
        self
    }

    /// Sets the body of the answer (responding only).
    pub fn body(mut self, bytes: impl Into<Vec<u8>>) -> Action {
        if let Action::Respond { body, .. } = &mut self {
            *body = bytes.into();
        }
        self
    }
}

impl From<Action> for wit::RequestAction {
    fn from(a: Action) -> Self {
        match a {
            Action::Forward {
                headers,
                route,
                retryable,
            } => wit::RequestAction::Forward(wit::Forward {
                headers: headers.into_iter().map(Into::into).collect(),
                route: route.map(|r| match r {
                    Route::Upstream(name) => wit_types::RouteTarget::Upstream(name),
                    Route::Tag(tag) => wit_types::RouteTarget::Tag(tag),
                }),
                retryable,
            }),
            Action::Respond {
                status,
                headers,
                body,
            } => wit::RequestAction::Respond(wit::LocalResponse {
                status,
                headers: headers
                    .into_iter()
                    .map(|(name, value)| wit::Header { name, value })
                    .collect(),
                body,
            }),
        }
    }
}

/// Who made a [`Response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The upstream.
    Upstream,
    /// A plugin's [`Action::respond`].
    Plugin,
    /// The host: a 502/504 when the upstream failed, a 503 for a failed plugin.
    Host,
}

impl Source {
    /// `"upstream"`, `"plugin"` or `"host"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Plugin => "plugin",
            Source::Host => "host",
        }
    }
}

/// A response head on its way to the application, as
/// [`Plugin::on_response`](crate::Plugin::on_response) sees it.
#[derive(Clone)]
pub struct Response {
    /// Its header fields, whose bytes hold the other text fields too.
    headers: Headers,
    listener: Range<usize>,
    method: Range<usize>,
    path: Range<usize>,
    upstream: Range<usize>,
    endpoint: Option<Range<usize>>,
    status: u16,
    source: Source,
    duration_ns: u64,
    attempts: u32,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("listener", &self.listener())
            .field("method", &self.method())
            .field("path", &self.path())
            .field("upstream", &self.upstream())
            .field("endpoint", &self.endpoint())
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("source", &self.source)
            .field("duration", &self.duration())
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl Response {
    /// A response for unit tests: `status` from upstream `backend` to `GET /` on
    /// listener `api`, after `duration`, one attempt.
    pub fn new(status: u16, duration: Duration) -> Response {
        Response::build("api", "GET", "/", "backend", Some("127.0.0.1:8443")).with(
            status,
            Source::Upstream,
            duration.as_nanos() as u64,
            1,
        )
    }

    fn build(listener: &str, method: &str, path: &str, upstream: &str, endpoint: Option<&str>) -> Response {
        let mut headers = Headers::default();
        let listener = headers.push_text(listener);
        let method = headers.push_text(method);
        let path = headers.push_text(path);
        let upstream = headers.push_text(upstream);
        let endpoint = endpoint.map(|e| headers.push_text(e));
        headers.region = headers.bytes.len()..headers.bytes.len();
        Response {
            headers,
            listener,
            method,
            path,
            upstream,
            endpoint,
            status: 200,
            source: Source::Upstream,
            duration_ns: 0,
            attempts: 1,
        }
    }

    fn with(mut self, status: u16, source: Source, duration_ns: u64, attempts: u32) -> Response {
        self.status = status;
        self.source = source;
        self.duration_ns = duration_ns;
        self.attempts = attempts;
        self
    }

    /// Sets the request's method and path (for unit tests).
    pub fn for_request(mut self, method: &str, path: &str) -> Response {
        self.method = self.headers.push_text(method);
        self.path = self.headers.push_text(path);
        self
    }

    /// Adds a header field (for unit tests).
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push(&name.to_ascii_lowercase(), value.as_bytes());
        self
    }

    /// Sets who made it (for unit tests).
    pub fn from_source(mut self, source: Source) -> Response {
        self.source = source;
        if source != Source::Upstream {
            self.endpoint = None;
        }
        self
    }

    /// The listener that received the request.
    pub fn listener(&self) -> &str {
        self.headers.text(&self.listener)
    }

    /// The request's method.
    pub fn method(&self) -> &str {
        self.headers.text(&self.method)
    }

    /// The request's path and query.
    pub fn path(&self) -> &str {
        self.headers.text(&self.path)
    }

    /// The request's path without the query.
    pub fn path_only(&self) -> &str {
        path_only(self.path())
    }

    /// The upstream the request was sent to, after routing.
    pub fn upstream(&self) -> &str {
        self.headers.text(&self.upstream)
    }

    /// The endpoint that answered (`endpoint.address`), if an upstream did.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_ref().map(|e| self.headers.text(e))
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// `"1xx"` to `"5xx"`: a label with few values, for metrics.
    pub fn status_class(&self) -> &'static str {
        match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        }
    }

    /// The header fields.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Who made it.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Time from the request head's arrival to this response head.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.duration_ns)
    }

    /// How many times the request went upstream (0: never; over 1: retried).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

fn source(s: wit::ResponseSource) -> Source {
    match s {
        wit::ResponseSource::Upstream => Source::Upstream,
        wit::ResponseSource::Plugin => Source::Plugin,
        wit::ResponseSource::Host => Source::Host,
    }
}

/// `packed-http-hooks.on-response`'s argument, kept as it came.
pub(crate) fn unpack_response(bytes: Vec<u8>, s: &ResponseSpans) -> Response {
    let f = |span| span_range(span, bytes.len());
    Response {
        listener: f(s.listener).unwrap_or(0..0),
        method: f(s.method).unwrap_or(0..0),
        path: f(s.path).unwrap_or(0..0),
        upstream: f(s.upstream).unwrap_or(0..0),
        endpoint: f(s.endpoint),
        status: s.status,
        source: source(s.source),
        duration_ns: s.duration_ns,
        attempts: s.attempts,
        headers: Headers {
            region: f(s.headers).unwrap_or(0..0),
            bytes,
        },
    }
}

impl From<wit::ResponseInfo> for Response {
    fn from(i: wit::ResponseInfo) -> Self {
        let mut r = Response::build(
            &i.listener,
            &i.method,
            &i.path,
            &i.upstream,
            i.endpoint.as_deref(),
        )
        .with(i.status, source(i.source), i.duration_ns, i.attempts);
        for h in &i.headers {
            r.headers.push(&h.name, &h.value);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::ABSENT;

    fn span(bytes: &[u8], part: &[u8]) -> u64 {
        let start = bytes
            .windows(part.len())
            .position(|w| w == part)
            .expect("part in bytes");
        (start as u64) << 32 | part.len() as u64
    }

    /// The bytes a host sends for a request, and their spans.
    fn packed_request() -> (Vec<u8>, RequestSpans) {
        let bytes =
            b"apiA127.0.0.1:9GET/v1/items?limit=3svc.localbackendx-team\0payments\0accept\0a\0Accept\0b\0"
                .to_vec();
        let headers_at = bytes.windows(6).position(|w| w == b"x-team").expect("headers");
        let spans = RequestSpans {
            listener: span(&bytes, b"apiA"),
            client_addr: span(&bytes, b"127.0.0.1:9"),
            method: span(&bytes, b"GET"),
            path: span(&bytes, b"/v1/items?limit=3"),
            authority: ABSENT,
            headers: (headers_at as u64) << 32 | (bytes.len() - headers_at) as u64,
            upstream: span(&bytes, b"backend"),
        };
        (bytes, spans)
    }

    #[test]
    fn a_packed_request_reads_every_field_and_header_in_place() {
        let (bytes, spans) = packed_request();
        let r = unpack_request(bytes, &spans);
        assert_eq!(r.listener(), "apiA");
        assert_eq!(r.client_addr(), "127.0.0.1:9");
        assert_eq!(
            (r.method(), r.path_only(), r.query()),
            ("GET", "/v1/items", Some("limit=3"))
        );
        assert_eq!(r.authority(), None);
        assert_eq!(r.upstream(), "backend");
        assert_eq!(r.header_value("X-TEAM"), Some("payments"));
        assert_eq!(
            r.headers().get_all("accept").collect::<Vec<_>>(),
            [&b"a"[..], &b"b"[..]]
        );
        assert_eq!(r.headers().len(), 3);
        // A field added by hand (a unit test's) joins the host's.
        let r = r.header("X-Extra", "1");
        assert_eq!(r.headers().len(), 4);
        assert_eq!(r.header_value("x-extra"), Some("1"));
        assert_eq!(r.upstream(), "backend");
    }

    #[test]
    fn spans_outside_the_bytes_read_as_empty_fields_not_a_panic() {
        let (bytes, mut spans) = packed_request();
        spans.method = 1_000 << 32 | 3;
        spans.path = u64::from(u32::MAX);
        spans.headers = 0xffff_fff0_0000_0100;
        spans.authority = 0;
        let r = unpack_request(bytes, &spans);
        assert_eq!((r.method(), r.path()), ("", ""));
        assert!(r.headers().is_empty());
        assert_eq!(r.authority(), Some(""));
        assert_eq!(r.listener(), "apiA");
    }

    #[test]
    fn a_packed_response_and_a_plain_one_read_the_same() {
        let bytes = b"apiGET/xbackend10.0.0.1:443server\0nginx\0".to_vec();
        let spans = ResponseSpans {
            listener: span(&bytes, b"api"),
            method: span(&bytes, b"GET"),
            path: span(&bytes, b"/x"),
            upstream: span(&bytes, b"backend"),
            endpoint: span(&bytes, b"10.0.0.1:443"),
            status: 503,
            headers: span(&bytes, b"server\0nginx\0"),
            source: wit::ResponseSource::Upstream,
            duration_ns: 1_500_000,
            attempts: 2,
        };
        let packed = unpack_response(bytes, &spans);
        let plain = Response::from(wit::ResponseInfo {
            listener: "api".into(),
            method: "GET".into(),
            path: "/x".into(),
            upstream: "backend".into(),
            endpoint: Some("10.0.0.1:443".into()),
            status: 503,
            headers: vec![wit::Header {
                name: "server".into(),
                value: b"nginx".to_vec(),
            }],
            source: wit::ResponseSource::Upstream,
            duration_ns: 1_500_000,
            attempts: 2,
        });
        for r in [&packed, &plain] {
            assert_eq!((r.listener(), r.method(), r.path()), ("api", "GET", "/x"));
            assert_eq!((r.upstream(), r.endpoint()), ("backend", Some("10.0.0.1:443")));
            assert_eq!((r.status(), r.status_class(), r.attempts()), (503, "5xx", 2));
            assert_eq!(r.duration(), Duration::from_micros(1500));
            assert_eq!(r.headers().get("Server"), Some("nginx"));
            assert_eq!(r.source(), Source::Upstream);
        }
    }
}
