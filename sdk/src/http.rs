//! The per-request hooks' types, on `http` listeners: [`Request`] and [`Action`] for
//! [`Plugin::on_request`](crate::Plugin::on_request), [`Response`] and [`HeaderEdit`]
//! for [`Plugin::on_response`](crate::Plugin::on_response).

use std::time::Duration;

use crate::__private::bindings::wasmbassador::plugin::http_types as wit;
use crate::__private::bindings::wasmbassador::plugin::types as wit_types;
use crate::Route;

/// Header fields in order, as the host passed them. Lookups ignore ASCII case.
///
/// ```
/// use wasmbassador_sdk::http::Headers;
/// let h = Headers::from_pairs(&[("x-team", "payments"), ("accept", "a"), ("Accept", "b")]);
/// assert_eq!(h.get("X-Team"), Some("payments"));
/// assert_eq!(h.get_all("accept").collect::<Vec<_>>(), [&b"a"[..], &b"b"[..]]);
/// assert!(!h.contains("authorization"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Headers(Vec<wit::Header>);

impl Headers {
    /// Headers from `(name, value)` text pairs, for unit tests.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Headers {
        Headers(
            pairs
                .iter()
                .map(|(n, v)| wit::Header {
                    name: (*n).to_owned(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
        )
    }

    /// The first value of `name` as text; `None` when there is none or it is not UTF-8
    /// (then [`get_bytes`](Headers::get_bytes) has it).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first value of `name`, as bytes.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// Whether a field `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get_bytes(name).is_some()
    }

    /// Every field as `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|h| (h.name.as_str(), h.value.as_slice()))
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A request from the application, as [`Plugin::on_request`](crate::Plugin::on_request)
/// sees it: hop-by-hop fields are already gone, and `host` is [`authority`](Request::authority).
#[derive(Debug, Clone)]
pub struct Request {
    listener: String,
    client_addr: String,
    method: String,
    path: String,
    authority: Option<String>,
    headers: Headers,
    upstream: String,
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
        Request {
            listener: "api".into(),
            client_addr: "127.0.0.1:40000".into(),
            method: method.into(),
            path: path.into(),
            authority: Some("localhost".into()),
            headers: Headers::default(),
            upstream: "backend".into(),
        }
    }

    /// Adds a header field (for unit tests).
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.0.push(wit::Header {
            name: name.to_ascii_lowercase(),
            value: value.as_bytes().to_vec(),
        });
        self
    }

    /// The listener that received it (`listener.name`).
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// The application's address, `ip:port`.
    pub fn client_addr(&self) -> &str {
        &self.client_addr
    }

    /// The method, as sent (`GET`, `POST`, ...).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path and query, as sent (`/v1/items?limit=10`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path without the query (`/v1/items`).
    pub fn path_only(&self) -> &str {
        path_only(&self.path)
    }

    /// The query, without the `?`, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// The authority the application named (`Host` / `:authority`), if any.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
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
        &self.upstream
    }
}

impl From<wit::RequestInfo> for Request {
    fn from(i: wit::RequestInfo) -> Self {
        Request {
            listener: i.listener,
            client_addr: i.client_addr,
            method: i.method,
            path: i.path,
            authority: i.authority,
            headers: Headers(i.headers),
            upstream: i.upstream,
        }
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
#[derive(Debug, Clone)]
pub struct Response {
    listener: String,
    method: String,
    path: String,
    upstream: String,
    endpoint: Option<String>,
    status: u16,
    headers: Headers,
    source: Source,
    duration_ns: u64,
    attempts: u32,
}

impl Response {
    /// A response for unit tests: `status` from upstream `backend` to `GET /` on
    /// listener `api`, after `duration`, one attempt.
    pub fn new(status: u16, duration: Duration) -> Response {
        Response {
            listener: "api".into(),
            method: "GET".into(),
            path: "/".into(),
            upstream: "backend".into(),
            endpoint: Some("127.0.0.1:8443".into()),
            status,
            headers: Headers::default(),
            source: Source::Upstream,
            duration_ns: duration.as_nanos() as u64,
            attempts: 1,
        }
    }

    /// Sets the request's method and path (for unit tests).
    pub fn for_request(mut self, method: &str, path: &str) -> Response {
        self.method = method.into();
        self.path = path.into();
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
        &self.listener
    }

    /// The request's method.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request's path and query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The request's path without the query.
    pub fn path_only(&self) -> &str {
        path_only(&self.path)
    }

    /// The upstream the request was sent to, after routing.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The endpoint that answered (`endpoint.address`), if an upstream did.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
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

impl From<wit::ResponseInfo> for Response {
    fn from(i: wit::ResponseInfo) -> Self {
        Response {
            listener: i.listener,
            method: i.method,
            path: i.path,
            upstream: i.upstream,
            endpoint: i.endpoint,
            status: i.status,
            headers: Headers(i.headers),
            source: match i.source {
                wit::ResponseSource::Upstream => Source::Upstream,
                wit::ResponseSource::Plugin => Source::Plugin,
                wit::ResponseSource::Host => Source::Host,
            },
            duration_ns: i.duration_ns,
            attempts: i.attempts,
        }
    }
}
