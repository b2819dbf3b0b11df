//! The HTTP/1.1 fast path: the common exchange of an `http` listener, relayed by this
//! module's own small codec instead of hyper's, with or without plugins.
//!
//! # Why a codec of our own
//! Through hyper, a request is parsed into a `HeaderMap`, handed from the server's
//! state machine to the service, re-encoded by the client's state machine, and the
//! response takes the same road back: profiles show that spread flat over a dozen
//! layers, none above 2%, and about 40% more CPU per request than HAProxy for the same
//! socket calls. Here a request head is parsed once with `httparse` (hyper's own
//! parser) and the head that goes upstream is written straight from it into a reused
//! buffer; the response head likewise; bodies are copied as bytes, their framing
//! (`Content-Length`, chunked, or until close) only followed, never re-encoded. It is
//! the approach Pingora took, and it is written by hand because no crate offers a
//! relaying HTTP/1.1 codec that keeps hyper's behaviour for everything else.
//!
//! # What it takes, and what it leaves to hyper
//! Only plain HTTP/1.1 requests in origin form whose body, if any, has a
//! `Content-Length`; without `Upgrade`, `Expect`, `TE` or `Transfer-Encoding`, and at
//! most 100 fields; to an upstream that speaks HTTP/1.1. Anything else (HTTP/2's
//! preface, HTTP/1.0, a chunked upload, a WebSocket handshake, a malformed or
//! oversized head) hands the connection, with every byte already read from it, to
//! hyper, which then serves it to its end exactly as before: the same answers,
//! 400 and 431 included. Responses of any framing are taken.
//!
//! The rules are those of the hyper path: hop-by-hop fields dropped (with those
//! `Connection` names), `Host` set to the upstream's, `Via` added both ways, the same
//! pool, retries, budget, timeouts and metrics, and the same local answers.
//!
//! Beside this file: [`body`] (the request body on its way up while the upstream is
//! heard, and the rest of a body that is not sent) and [`plugins`] (the hooks' part).
//!
//! # Plugins
//! On a listener with plugins the head is taken apart into a `HeaderMap` (the form
//! the hooks take on hyper's path too), `on-request` runs over it, and the head for
//! the upstream is written from the edited map to the upstream the plugins chose;
//! `on-response` edits the upstream's response head (or a local answer) before it
//! goes to the app. A request the plugins send to an upstream that speaks HTTP/2
//! goes to hyper with their decision ([`super::hooks::Prepared`]) rather than
//! meeting the hooks again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::hooks::{Answered, Decision, Early, Prepared};
use super::pool::{Conn, Pool, SendError};
use super::{AppConn, Ctx, HEAD_TIMEOUT, MAX_HEAD, Signals, budget_spent, retry, retry_pause};
use crate::connect::UpstreamIo;
use crate::plugin::ResponseSource;
use crate::upstream::Upstream;

mod body;
mod plugins;
use body::{SKIP_LIMIT, Upload, fill, linger, skip};
use plugins::{HookHead, Hooks, Routed};

/// Most fields a head may have here (hyper's limit as well); more go to hyper.
const MAX_HEADERS: usize = 100;
/// How much is read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How the fast path left a connection.
pub(super) enum End {
    /// Finished: closed by either side, timed out, or the listener stopped.
    Closed,
    /// A request it does not take: hyper serves the connection from here on, starting
    /// with these bytes, already read from it.
    Hyper(BytesMut),
}

/// A request head as the fast path needs it, after the head for upstream was written.
struct Request {
    /// Length of the head in the app's buffer.
    head_len: usize,
    /// `Content-Length`, or 0.
    body_len: u64,
    /// `HEAD`: the response has no body whatever its fields say.
    head_method: bool,
    /// May be sent again (GET, HEAD, OPTIONS without a body).
    retryable: bool,
    /// The app asked for `Connection: close`.
    close: bool,
}

enum Parsed {
    Partial,
    Ready(Request),
    /// Not for the fast path (or malformed): hyper decides.
    Unusual,
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A response head, after the head for the app was written.
struct Response {
    head_len: usize,
    status: u16,
    framing: Framing,
    /// The upstream will close this connection after the response.
    upstream_close: bool,
    /// It came before the request body was all sent: the rest of that body is still
    /// on the app connection, and the upstream connection cannot be reused.
    cut: bool,
}

/// Fields that belong to one connection (RFC 9110 §7.6.1), `Proxy-*` too, and `Host`
/// (the upstream's is written instead).
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "host",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
        || name.len() >= 6 && name.as_bytes()[..6].eq_ignore_ascii_case(b"proxy-")
}

/// The comma-separated tokens of a field value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The fields a `Connection` field names (other than `close` and `keep-alive`),
/// at most eight; `None` when there are more.
fn named_fields<'h>(headers: &[httparse::Header<'h>]) -> Option<Vec<&'h str>> {
    let mut named = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        for t in tokens(h.value) {
            // `Content-Length` frames the message on both hops: a `Connection` that
            // names it does not remove it (else the body would run into the next
            // request on the upstream connection).
            let kept = ["close", "keep-alive", "content-length"]
                .iter()
                .any(|k| t.eq_ignore_ascii_case(k));
            if !kept {
                if named.len() == 8 {
                    return None;
                }
                named.push(t);
            }
        }
    }
    Some(named)
}

fn connection_has(headers: &[httparse::Header<'_>], token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| tokens(h.value).any(|t| t.eq_ignore_ascii_case(token)))
}

/// A `Content-Length` value: digits only, as RFC 9110 §8.6 allows.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The request line and `Host`.
fn start_request_head(out: &mut Vec<u8>, method: &str, path: &str, host: &[u8]) {
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_field(out, "host", host);
}

/// A field of a head parsed from `parsed` as `http`'s types hold it, its value a
/// slice of `shared` (a copy of the head that every value shares, rather than an
/// allocation for each); `None` when those types refuse it.
fn typed_field(h: &httparse::Header<'_>, parsed: &[u8], shared: &Bytes) -> Option<(HeaderName, HeaderValue)> {
    let at = h.value.as_ptr() as usize - parsed.as_ptr() as usize;
    let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
    let value = HeaderValue::from_maybe_shared(shared.slice(at..at + h.value.len())).ok()?;
    Some((name, value))
}

fn write_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where a parsed request head goes.
enum Sink<'a> {
    /// Written for the upstream at once, with this `Host` (a listener without plugins).
    Wire { host: &'a [u8], out: &'a mut Vec<u8> },
    /// Taken apart for the plugins, and written by [`write_request_head`] after them.
    Hooks(&'a mut HookHead),
}

/// Parses the request head at the start of `buf`; when the fast path takes it, the
/// head goes into `sink`.
fn parse_request(buf: &[u8], sink: Sink<'_>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        // A head over the limit is hyper's to refuse (431), however it arrived: one
        // read can bring more than the limit at once.
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Unusual,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Unusual;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Unusual;
    }
    let headers = req.headers;
    let mut body_len: Option<u64> = None;
    for h in headers.iter() {
        let n = h.name;
        if ["transfer-encoding", "upgrade", "expect", "te"]
            .iter()
            .any(|u| n.eq_ignore_ascii_case(u))
        {
            return Parsed::Unusual;
        }
        if n.eq_ignore_ascii_case("content-length") {
            match (content_length(h.value), body_len) {
                (Some(l), None) => body_len = Some(l),
                (Some(l), Some(b)) if l == b => {}
                _ => return Parsed::Unusual,
            }
        }
    }
    if connection_has(headers, "upgrade") {
        return Parsed::Unusual;
    }
    let Some(named) = named_fields(headers) else {
        return Parsed::Unusual;
    };
    let passed = headers
        .iter()
        .filter(|h| !hop_by_hop(h.name) && !named.iter().any(|n| n.eq_ignore_ascii_case(h.name)));
    match sink {
        Sink::Wire { host, out } => {
            start_request_head(out, method, path, host);
            for h in passed {
                write_field(out, h.name, h.value);
            }
            out.extend_from_slice(b"via: 1.1 wasmbassador\r\n\r\n");
        }
        Sink::Hooks(hh) => {
            // A target `http::Uri` refuses (httparse lets `<`, `>` and a backtick
            // through) is hyper's to answer, before any plugin sees it.
            if http::uri::PathAndQuery::try_from(path).is_err() {
                return Parsed::Unusual;
            }
            hh.method.clear();
            hh.method.push_str(method);
            hh.path.clear();
            hh.path.push_str(path);
            hh.authority = headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_string);
            hh.headers.clear();
            let shared = Bytes::copy_from_slice(&buf[..head_len]);
            for h in passed {
                // What `HeaderValue` refuses (control bytes) hyper answers with a 400.
                let Some((name, value)) = typed_field(h, buf, &shared) else {
                    return Parsed::Unusual;
                };
                hh.headers.append(name, value);
            }
        }
    }
    let body_len = body_len.unwrap_or(0);
    Parsed::Ready(Request {
        head_len,
        body_len,
        head_method: method == "HEAD",
        retryable: retry::retryable_name(method) && body_len == 0,
        close: connection_has(headers, "close"),
    })
}

/// Parses the response head at the start of `buf`; the head for the app goes into
/// `out`. `Ok(None)`: not complete yet.
fn parse_response(buf: &[u8], req: &Request, out: &mut Vec<u8>) -> Result<Option<Response>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Complete(_) | httparse::Status::Partial) => {
            return Err("response head too large");
        }
        Err(httparse::Error::TooManyHeaders) => return Err("too many response header fields"),
        Err(_) => return Err("malformed response head"),
    };
    let status = resp.code.filter(|c| *c >= 100).ok_or("malformed response head")?;
    if status == 101 {
        return Err("unexpected 101 Switching Protocols");
    }
    let headers = resp.headers;
    if (100..200).contains(&status) {
        // Interim answers are not passed on (as with hyper's client): the final one
        // follows on the same connection.
        return Ok(Some(Response {
            head_len,
            status,
            framing: Framing::Empty,
            upstream_close: false,
            cut: false,
        }));
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    for h in headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match (content_length(h.value), length) {
                (Some(l), None) => length = Some(l),
                (Some(l), Some(b)) if l == b => {}
                _ => return Err("invalid Content-Length in the response"),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        }
    }
    let framing = if req.head_method || status == 204 || status == 304 {
        Framing::Empty
    } else if encoded && chunked {
        Framing::Chunked
    } else if encoded {
        Framing::UntilClose
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        Framing::UntilClose
    };
    let named = named_fields(headers).ok_or("too many fields named by Connection")?;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers.iter() {
        // A message with both is framed by its coding (RFC 9112 §6.3): its
        // `Content-Length` goes.
        let drop = hop_by_hop(h.name)
            || named.iter().any(|n| n.eq_ignore_ascii_case(h.name))
            || (encoded && h.name.eq_ignore_ascii_case("content-length"));
        if !drop {
            write_field(out, h.name, h.value);
        }
    }
    // The chunks are relayed as they come, so the app gets the same coding.
    if chunked && encoded {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if req.close || framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"via: 1.1 wasmbassador\r\n\r\n");
    Ok(Some(Response {
        head_len,
        status,
        framing,
        // An HTTP/1.0 server closes after each response unless it says otherwise.
        upstream_close: connection_has(headers, "close")
            || (resp.version == Some(0) && !connection_has(headers, "keep-alive")),
        cut: false,
    }))
}

/// Follows a chunked body (RFC 9112 §7.1) through the bytes relayed, to find its end;
/// nothing is decoded or changed.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// Bytes of the current size line or trailer section, to bound them.
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    /// In a size line, before any extension.
    #[default]
    Size,
    /// The size so far.
    SizeDigits(u64),
    /// In an extension, after the size.
    Extension(u64),
    /// Expecting the `\n` that ends a size line.
    SizeLf(u64),
    /// Inside chunk data, this much left.
    Data(u64),
    /// Expecting the `\r\n` after chunk data.
    DataCr,
    DataLf,
    /// In the trailer section: at the start of a line.
    TrailerStart,
    /// Within a trailer line.
    Trailer,
    /// Expecting the `\n` of a trailer line.
    TrailerLf,
    /// Expecting the `\n` of the empty line that ends the message.
    EndLf,
    Done,
}

impl Chunks {
    /// Scans `data`: `Ok(Some(n))` when the body ends after its first `n` bytes.
    fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                Data(left) => {
                    let take = left.min((data.len() - i) as u64) as usize;
                    i += take;
                    if left == take as u64 {
                        self.state = DataCr;
                    } else {
                        self.state = Data(left - take as u64);
                    }
                    continue;
                }
                Size | SizeDigits(_) if b.is_ascii_hexdigit() => {
                    let v = match self.state {
                        SizeDigits(v) => v,
                        _ => 0,
                    };
                    if v >> 56 != 0 {
                        return Err("chunk size too large");
                    }
                    SizeDigits(v << 4 | u64::from((b as char).to_digit(16).unwrap_or(0)))
                }
                SizeDigits(v) | Extension(v) if b == b'\r' => SizeLf(v),
                SizeDigits(v) if b == b';' || b == b' ' || b == b'\t' => Extension(v),
                Extension(v) if b == b'\t' || !b.is_ascii_control() => Extension(v),
                SizeLf(0) if b == b'\n' => TrailerStart,
                SizeLf(v) if b == b'\n' => Data(v),
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size,
                TrailerStart if b == b'\r' => EndLf,
                TrailerStart | Trailer if b == b'\t' || !b.is_ascii_control() => Trailer,
                Trailer if b == b'\r' => TrailerLf,
                TrailerLf if b == b'\n' => TrailerStart,
                EndLf if b == b'\n' => Done,
                _ => return Err("malformed chunked body"),
            };
            i += 1;
            if matches!(self.state, Size | SizeDigits(_) | Extension(_) | SizeLf(_)) {
                self.line += 1;
                if self.line > 4096 {
                    return Err("chunk size line too long");
                }
            } else if matches!(self.state, TrailerStart | Trailer | TrailerLf | EndLf) {
                self.line += 1;
                if self.line > MAX_HEAD {
                    return Err("trailer section too large");
                }
            } else if self.state != DataCr && self.state != DataLf {
                self.line = 0;
            }
            if self.state == Done {
                return Ok(Some(i));
            }
            if self.state == Size {
                self.line = 0;
            }
        }
        Ok(None)
    }
}

/// The buffers of one app connection, reused by each of its requests.
struct Bufs {
    /// What the app sent that was not relayed yet: the request head first.
    app: BytesMut,
    /// What the upstream sent that was not relayed yet.
    up: BytesMut,
    /// The head (and the first body bytes) going upstream, kept for another try.
    out: Vec<u8>,
    /// The response head (and the first body bytes) going to the app.
    head: Vec<u8>,
}

/// How a wait on the app connection between requests ended.
enum Wait {
    Data,
    Eof,
    /// The listener is stopping, a read failed, or no head came in time.
    Close,
}

/// What one exchange left behind.
enum Exchange {
    /// The app connection can take another request (unless it asked to close).
    Kept,
    /// The app connection must close (its response was delimited by closing, or the
    /// exchange broke off after the head went out).
    Close,
    /// The upstream turned out to speak HTTP/2; nothing was consumed or sent.
    Hyper,
}

/// Why a try failed, before any of its response reached the app.
enum TryError {
    /// No connection; the pool's connector already retried and failed over.
    Connect(SendError),
    /// The connection failed or closed before a whole response head.
    Reset(io::Error),
    /// The app's request body broke off: nothing can be answered.
    AppGone,
}

impl Ctx {
    /// Serves the connection's requests for as long as they suit the fast path.
    pub(super) async fn serve_fast(
        &self,
        app: &mut AppConn,
        stop: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> End {
        let head_timeout = self.st.config.idle_timeout.unwrap_or(HEAD_TIMEOUT);
        let mut bufs = Bufs {
            app: BytesMut::with_capacity(READ_CHUNK),
            up: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            head: Vec::with_capacity(1024),
        };
        let stopped = stop.cancelled();
        let hard = hard_stop.cancelled();
        tokio::pin!(stopped, hard);
        let signals = Signals::new();
        // One timer for the connection's life, moved for each head (a new one per
        // request would be an allocation and a timer-wheel entry each time).
        let head_wait = tokio::time::sleep(head_timeout);
        tokio::pin!(head_wait);
        // Set by a stop during an exchange: that response is the connection's last.
        let closing = AtomicBool::new(false);
        let plugins = !self.st.config.plugins.is_empty();
        let mut hh = HookHead::default();
        loop {
            // A whole request head, and where it goes.
            let mut armed = false;
            let (req, up, pool) = loop {
                let Some(up) = self.shared.upstream(&self.st.config.upstream) else {
                    return End::Hyper(bufs.app);
                };
                let pool = up.http_pool(None);
                let Some(host) = pool.host().filter(|_| !pool.is_h2()) else {
                    return End::Hyper(bufs.app);
                };
                if closing.load(Ordering::Relaxed) {
                    return End::Closed;
                }
                if !bufs.app.is_empty() {
                    let sink = if plugins {
                        Sink::Hooks(&mut hh)
                    } else {
                        Sink::Wire {
                            host: host.as_bytes(),
                            out: &mut bufs.out,
                        }
                    };
                    match parse_request(&bufs.app, sink) {
                        Parsed::Ready(r) => break (r, up, pool),
                        Parsed::Partial => {}
                        Parsed::Unusual => return End::Hyper(bufs.app),
                    }
                }
                if !armed {
                    head_wait.as_mut().reset((Instant::now() + head_timeout).into());
                    armed = true;
                }
                let buf = &mut bufs.app;
                let w = std::future::poll_fn(|cx| {
                    if let Some(mut scx) = signals.due(cx)
                        && (hard.as_mut().poll(&mut scx).is_ready()
                            || stopped.as_mut().poll(&mut scx).is_ready())
                    {
                        return Poll::Ready(Wait::Close);
                    }
                    buf.reserve(READ_CHUNK);
                    match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *app), cx, buf) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Wait::Eof),
                        Poll::Ready(Ok(_)) => return Poll::Ready(Wait::Data),
                        Poll::Ready(Err(_)) => return Poll::Ready(Wait::Close),
                        Poll::Pending => {}
                    }
                    if head_wait.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Wait::Close);
                    }
                    Poll::Pending
                })
                .await;
                match w {
                    Wait::Data => {}
                    Wait::Eof | Wait::Close => return End::Closed,
                }
            };
            // The plugins' say, and where they send the request.
            let mut decision = None;
            let (up, pool) = if plugins {
                let route = self.route(&req, &mut hh, app, &mut bufs);
                let Some(routed) = watched(route, &signals, hard.as_mut(), stopped.as_mut(), &closing).await
                else {
                    return End::Closed;
                };
                match routed {
                    Routed::Go(d, up, pool) => {
                        decision = Some(d);
                        (up, pool)
                    }
                    Routed::Answered(Exchange::Kept) if !req.close => continue,
                    Routed::Answered(_) => return End::Closed,
                    Routed::Hyper(d) => {
                        self.hand_over(d, &mut hh);
                        return End::Hyper(bufs.app);
                    }
                }
            } else {
                (up, pool)
            };
            let hooks = decision.as_ref().map(|d| Hooks { d, head: &hh });
            // The exchange, which a hard stop ends at once and a stop lets finish.
            let exchange = self.exchange((&up, &pool), app, &req, &mut bufs, &closing, hooks);
            let done = watched(exchange, &signals, hard.as_mut(), stopped.as_mut(), &closing).await;
            match done {
                None | Some(Exchange::Close) => return End::Closed,
                Some(Exchange::Hyper) => {
                    if let Some(d) = decision {
                        self.hand_over(d, &mut hh);
                    }
                    return End::Hyper(bufs.app);
                }
                Some(Exchange::Kept) if req.close => return End::Closed,
                Some(Exchange::Kept) => {}
            }
        }
    }

    /// Sends one request upstream (with the tries the rules allow) and relays the
    /// response; `bufs.app` starts with the request and loses it once it is sent.
    async fn exchange(
        &self,
        (up, pool): (&Arc<Upstream>, &Arc<Pool>),
        app: &mut AppConn,
        req: &Request,
        bufs: &mut Bufs,
        closing: &AtomicBool,
        hooks: Option<Hooks<'_>>,
    ) -> Exchange {
        let name = up.config.name.as_str();
        let timeout = self.st.config.request_timeout();
        let deadline = Instant::now() + timeout;
        pool.budget.deposit();
        let local = |try_no: u32| hooks.map(|h| (h, name, try_no));
        // A body a plugin marked retryable is read whole first when it is within
        // `buffer_body`, as on hyper's path: whether the request can be sent again
        // must not depend on how its bytes happened to arrive.
        let marked = hooks.is_some_and(|h| h.d.retryable);
        if marked && req.body_len > 0 && req.body_len <= pool.retry.buffer_body {
            let whole = fill(app, &mut bufs.app, req.head_len + req.body_len as usize);
            match tokio::time::timeout_at(deadline.into(), whole).await {
                Ok(true) => {}
                Ok(false) => return Exchange::Close,
                Err(_) => {
                    let text = "wasmbassador: the request body did not arrive within request_timeout\n";
                    let early = Early::text(StatusCode::REQUEST_TIMEOUT, text.to_string());
                    return self.answer(app, req, &mut bufs.app, early, local(0)).await;
                }
            }
        }
        // The body's bytes already read with the head go up with the head.
        let in_buf = in_buf(req, &bufs.app);
        bufs.out
            .extend_from_slice(&bufs.app[req.head_len..req.head_len + in_buf]);
        let marked = marked && in_buf as u64 == req.body_len && req.body_len <= pool.retry.buffer_body;
        let attempts = if req.retryable || marked {
            pool.retry.attempts.max(1)
        } else {
            1
        };
        let mut try_no: u32 = 0;
        let (mut conn, resp, sent) = loop {
            try_no += 1;
            let last_try = try_no >= attempts;
            let left = deadline.saturating_duration_since(Instant::now());
            let this_try = pool.retry.per_try_timeout.map_or(left, |p| p.min(left));
            let sent = Instant::now();
            let attempt = tokio::time::timeout(this_try, self.try_once(pool, app, req, in_buf, bufs)).await;
            let reason = match attempt {
                Err(_) if last_try || Instant::now() >= deadline => {
                    tracing::warn!(listener = %self.st.config.name, upstream = %name, ?timeout, "no response head in time");
                    let text =
                        format!("wasmbassador: upstream {name:?} did not answer within {this_try:?}\n");
                    return self
                        .answer(
                            app,
                            req,
                            &mut bufs.app,
                            Early::text(StatusCode::GATEWAY_TIMEOUT, text),
                            local(try_no),
                        )
                        .await;
                }
                Err(_) => "timeout",
                Ok(Err(TryError::AppGone)) => return Exchange::Close,
                Ok(Err(TryError::Connect(e))) => {
                    let (status, text) = self.failure(up, &e);
                    let early = Early::text(status, text);
                    return self.answer(app, req, &mut bufs.app, early, local(try_no)).await;
                }
                Ok(Err(TryError::Reset(e))) if last_try => {
                    let (status, text) = self.failure(up, &SendError::Io(e));
                    let early = Early::text(status, text);
                    return self.answer(app, req, &mut bufs.app, early, local(try_no)).await;
                }
                Ok(Err(TryError::Reset(e))) => {
                    tracing::debug!(listener = %self.st.config.name, upstream = %name, error = %e, "request reset upstream");
                    "reset"
                }
                Ok(Ok(None)) => return Exchange::Hyper,
                Ok(Ok(Some((conn, resp)))) => {
                    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
                    if last_try || !retry::retry_status(status) {
                        break (conn, resp, sent);
                    }
                    tracing::debug!(listener = %self.st.config.name, upstream = %name, %status, "upstream answered with a retryable status");
                    if !self.may_retry(pool, "status") {
                        break (conn, resp, sent);
                    }
                    // Its body is not read: that connection is given up.
                    drop(conn);
                    retry_pause(up, deadline).await;
                    continue;
                }
            };
            if !self.may_retry(pool, reason) {
                let (status, text) = budget_spent(name, reason);
                let early = Early::text(status, text);
                return self.answer(app, req, &mut bufs.app, early, local(try_no)).await;
            }
        };
        bufs.app.advance(req.head_len + in_buf);
        let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let endpoint = &conn.info().endpoint;
        endpoint
            .http_duration(&self.shared.metrics)
            .observe(sent.elapsed());
        if let Some(h) = hooks
            && h.d.wants_responses()
        {
            let answered = Answered {
                method: &h.head.method,
                path: &h.head.path,
                upstream: name,
                endpoint: Some(&endpoint.config.address),
                status: resp.status,
                source: ResponseSource::Upstream,
                attempts: try_no,
            };
            self.edit_response_head(&mut bufs.head, h.d, &answered);
        }
        self.st.http_requests(&self.shared.metrics, status).inc();
        if (closing.load(Ordering::Relaxed) || resp.cut) && !req.close && resp.framing != Framing::UntilClose
        {
            // The listener is stopping, or the app's body was cut short: the app
            // learns that this connection ends.
            bufs.head.truncate(bufs.head.len() - 2);
            bufs.head.extend_from_slice(b"connection: close\r\n\r\n");
        }
        let relayed = self.relay_body(&mut conn, app, &resp, bufs).await;
        if resp.cut {
            if let Ok(true) = relayed {
                let _ = within(self.st.config.idle_timeout, app.write_all(&bufs.head)).await;
            }
            linger(app).await;
            return Exchange::Close;
        }
        match relayed {
            Ok(true) => {
                // Back in the pool before the app sees the end of the response: an
                // app that sends its next request on a new connection at once finds
                // this one there.
                if !resp.upstream_close && bufs.up.is_empty() {
                    pool.raw_release(conn);
                } else {
                    drop(conn);
                }
                if within(self.st.config.idle_timeout, app.write_all(&bufs.head))
                    .await
                    .is_err()
                {
                    return Exchange::Close;
                }
                if resp.framing == Framing::UntilClose {
                    Exchange::Close
                } else {
                    Exchange::Kept
                }
            }
            Ok(false) | Err(_) => Exchange::Close,
        }
    }

    /// One try: a connection, the request written, a final response head read
    /// (interim ones skipped) and written for the app into `bufs.head`.
    /// `Ok(None)`: the upstream chose HTTP/2 on a new connection.
    async fn try_once(
        &self,
        pool: &Arc<Pool>,
        app: &mut AppConn,
        req: &Request,
        in_buf: usize,
        bufs: &mut Bufs,
    ) -> Result<Option<(Conn, Response)>, TryError> {
        let mut conn = match pool.raw_checkout() {
            Some(c) => c,
            None => match pool.raw_open().await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(None),
                Err(e) => return Err(TryError::Connect(e)),
            },
        };
        let io = conn.io();
        io.write_all(&bufs.out).await.map_err(TryError::Reset)?;
        // TLS keeps written records until flushed; plain TCP has nothing to flush.
        io.flush().await.map_err(TryError::Reset)?;
        bufs.up.clear();
        // The rest of the body streams from the app; a request with a body has one
        // try, so it is never needed twice. The upstream is heard meanwhile: a final
        // answer before the body's end (a 413 or 401 mid-upload) ends the upload and
        // goes to the app, as hyper's client would have it.
        let left = req.body_len - in_buf as u64;
        if left > 0 {
            let mut upload = Upload::new(left);
            // A success heard during the upload: it is relayed once the body is all
            // sent (a full-duplex server may answer 200 and go on reading).
            let mut early = None;
            while !upload.run(app, io, &mut bufs.up).await? {
                loop {
                    match parse_response(&bufs.up, req, &mut bufs.head) {
                        Ok(Some(mut resp)) => {
                            bufs.up.advance(resp.head_len);
                            if resp.status < 200 {
                                // Interim: what follows it may be the final answer.
                                continue;
                            }
                            if resp.status >= 400 {
                                // A refusal: the rest of the body is not wanted.
                                resp.cut = true;
                                return Ok(Some((conn, resp)));
                            }
                            upload.deaf = true;
                            early = Some(resp);
                        }
                        Ok(None) => {}
                        Err(e) => return Err(TryError::Reset(io::Error::other(e))),
                    }
                    break;
                }
            }
            if let Some(resp) = early {
                return Ok(Some((conn, resp)));
            }
        }
        loop {
            if !bufs.up.is_empty() {
                match parse_response(&bufs.up, req, &mut bufs.head) {
                    Ok(Some(resp)) => {
                        bufs.up.advance(resp.head_len);
                        if resp.status >= 200 {
                            return Ok(Some((conn, resp)));
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Err(TryError::Reset(io::Error::other(e))),
                }
            }
            bufs.up.reserve(READ_CHUNK);
            match tokio::io::AsyncReadExt::read_buf(io, &mut bufs.up).await {
                Ok(0) => {
                    return Err(TryError::Reset(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before a response",
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(TryError::Reset(e)),
            }
        }
    }

    /// Writes the response head (in `bufs.head`) and relays the body; `Ok(true)`
    /// when the body came to its end on a connection that can carry another request,
    /// with its last bytes (or the whole response) left in `bufs.head` to write.
    async fn relay_body(
        &self,
        conn: &mut Conn,
        app: &mut AppConn,
        resp: &Response,
        bufs: &mut Bufs,
    ) -> io::Result<bool> {
        let idle = self.st.config.idle_timeout;
        let io = conn.io();
        let mut chunks = Chunks::default();
        let mut left = match resp.framing {
            Framing::Length(l) => l,
            _ => u64::MAX,
        };
        let mut first = true;
        loop {
            // What of `bufs.up` belongs to this body, and whether the body ends there.
            let up = &mut bufs.up;
            let (take, end) = match resp.framing {
                Framing::Empty => (0, true),
                Framing::Length(_) => {
                    let t = left.min(up.len() as u64) as usize;
                    left -= t as u64;
                    (t, left == 0)
                }
                Framing::Chunked => match chunks.scan(up).map_err(io::Error::other)? {
                    Some(n) => (n, true),
                    None => (up.len(), false),
                },
                Framing::UntilClose => (up.len(), false),
            };
            if end {
                // The last bytes wait in `bufs.head` for the caller, who first gives
                // the upstream connection back (see `exchange`).
                if !first {
                    bufs.head.clear();
                }
                bufs.head.extend_from_slice(&up[..take]);
                up.advance(take);
                return Ok(true);
            }
            if first {
                // The head and the body's first bytes in one write.
                bufs.head.extend_from_slice(&up[..take]);
                within(idle, app.write_all(&bufs.head)).await?;
                first = false;
            } else if take > 0 {
                within(idle, app.write_all(&up[..take])).await?;
            }
            up.advance(take);
            up.reserve(READ_CHUNK);
            match within(idle, tokio::io::AsyncReadExt::read_buf(io, up)).await {
                Ok(0) if resp.framing == Framing::UntilClose => {
                    within(idle, app.flush()).await?;
                    return Ok(false);
                }
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A local answer on the fast path (what [`super::local`] makes on hyper's, or a
    /// plugin's), after the `on-response` hooks when plugins saw the request (`hooks`:
    /// theirs, the upstream's name and the tries sent); the request (its head and the
    /// body bytes read with it) leaves `read`.
    async fn answer(
        &self,
        app: &mut AppConn,
        req: &Request,
        read: &mut BytesMut,
        mut early: Early,
        hooks: Option<(Hooks<'_>, &str, u32)>,
    ) -> Exchange {
        let read_before = in_buf(req, read) as u64;
        read.advance(req.head_len + read_before as usize);
        if let Some((h, upstream, attempts)) = hooks
            && h.d.wants_responses()
        {
            let answered = Answered {
                method: &h.head.method,
                path: &h.head.path,
                upstream,
                endpoint: None,
                status: early.status.as_u16(),
                source: early.source,
                attempts,
            };
            self.response_hooks(h.d, &answered, &mut early.headers);
        }
        let status = early.status;
        self.st.http_requests(&self.shared.metrics, status).inc();
        let mut head = Vec::with_capacity(160 + early.body.len());
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in &early.headers {
            write_field(&mut head, name.as_str(), value.as_bytes());
        }
        // 204 and 304 have no body (RFC 9110 §6.4.1), whatever a plugin gave them.
        let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        if !bodiless {
            write_field(
                &mut head,
                "content-length",
                itoa::Buffer::new().format(early.body.len()).as_bytes(),
            );
        }
        // A body that was not read is still on the connection, which can go on only
        // if the rest, when small, is read and dropped first (as hyper does).
        let left = req.body_len - read_before;
        let unread = left > 0 && !(left <= SKIP_LIMIT && skip(app, read, left).await);
        if req.close || unread {
            head.extend_from_slice(b"connection: close\r\n");
        }
        head.extend_from_slice(b"\r\n");
        // The answer to HEAD has the length of the text but not the text.
        if !req.head_method && !bodiless {
            head.extend_from_slice(&early.body);
        }
        let idle = self.st.config.idle_timeout;
        if within(idle, app.write_all(&head)).await.is_err() {
            return Exchange::Close;
        }
        if unread {
            linger(app).await;
            return Exchange::Close;
        }
        Exchange::Kept
    }
}

/// `fut`, which a hard stop ends at once (`None`) and a stop lets finish, noting it
/// in `closing` so that its response is the connection's last.
async fn watched<F: Future>(
    fut: F,
    signals: &Signals,
    mut hard: Pin<&mut WaitForCancellationFuture<'_>>,
    mut stopped: Pin<&mut WaitForCancellationFuture<'_>>,
    closing: &AtomicBool,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Some(mut scx) = signals.due(cx) {
            if hard.as_mut().poll(&mut scx).is_ready() {
                return Poll::Ready(None);
            }
            if !closing.load(Ordering::Relaxed) && stopped.as_mut().poll(&mut scx).is_ready() {
                closing.store(true, Ordering::Relaxed);
            }
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

/// The body bytes of `req` already in `read` behind its head.
fn in_buf(req: &Request, read: &[u8]) -> usize {
    ((read.len() - req.head_len) as u64).min(req.body_len) as usize
}

/// `fut`, given `idle` (the listener's `idle_timeout`) at most when there is one.
async fn within<T>(idle: Option<Duration>, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    match idle {
        Some(d) => tokio::time::timeout(d, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle_timeout passed"))?,
        None => fut.await,
    }
}

#[cfg(test)]
mod tests {
    use super::plugins::write_request_head;
    use super::*;

    fn req(text: &str) -> (Parsed, String) {
        let mut out = Vec::new();
        let sink = Sink::Wire {
            host: b"up.example:8443",
            out: &mut out,
        };
        let p = parse_request(text.as_bytes(), sink);
        (p, String::from_utf8(out).unwrap_or_default())
    }

    #[test]
    fn plugins_see_the_head_as_hypers_path_gives_it_and_their_edits_go_upstream() {
        let mut hh = HookHead::default();
        let text = "POST /a?b=1 HTTP/1.1\r\nHost: localhost:8080\r\nConnection: X-Secret\r\nX-Secret: 1\r\nX-App: one\r\nx-app: two\r\nContent-Length: 2\r\n\r\nhi";
        let Parsed::Ready(r) = parse_request(text.as_bytes(), Sink::Hooks(&mut hh)) else {
            panic!("not taken")
        };
        assert_eq!((r.body_len, r.retryable), (2, false));
        assert_eq!((hh.method.as_str(), hh.path.as_str()), ("POST", "/a?b=1"));
        assert_eq!(hh.authority.as_deref(), Some("localhost:8080"));
        let seen: Vec<String> = hh
            .headers
            .iter()
            .map(|(n, v)| format!("{n}={}", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        assert_eq!(seen, ["x-app=one", "x-app=two", "content-length=2"]);
        hh.headers.insert("x-added", HeaderValue::from_static("yes"));
        let mut out = Vec::new();
        write_request_head(&mut out, &hh, b"up.example:8443");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /a?b=1 HTTP/1.1\r\nhost: up.example:8443\r\nx-app: one\r\nx-app: two\r\ncontent-length: 2\r\nx-added: yes\r\nvia: 1.1 wasmbassador\r\n\r\n"
        );
        // So is a target `http::Uri` refuses.
        let odd = "GET /a<b> HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(
            parse_request(odd.as_bytes(), Sink::Hooks(&mut hh)),
            Parsed::Unusual
        ));
        // A control byte in a value is hyper's to answer (with a 400).
        let bad = "GET / HTTP/1.1\r\nX-Bad: a\x01b\r\n\r\n";
        assert!(matches!(
            parse_request(bad.as_bytes(), Sink::Hooks(&mut hh)),
            Parsed::Unusual
        ));
    }

    #[test]
    fn request_head_is_rewritten_for_the_upstream() {
        let (p, out) = req(
            "GET /a?b=1 HTTP/1.1\r\nHost: localhost:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nProxy-Authorization: x\r\nAccept: */*\r\nVia: 1.1 other\r\n\r\n",
        );
        let Parsed::Ready(r) = p else { panic!("not taken") };
        assert!(r.retryable && !r.close && r.body_len == 0);
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nhost: up.example:8443\r\nAccept: */*\r\nVia: 1.1 other\r\nvia: 1.1 wasmbassador\r\n\r\n"
        );
    }

    #[test]
    fn unusual_requests_go_to_hyper() {
        for text in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(matches!(req(text).0, Parsed::Unusual), "{text:?} was taken");
        }
        assert!(matches!(req("GET / HTTP/1.1\r\nHost: x\r\n").0, Parsed::Partial));
        // A whole head over the limit, come in one read, is refused by hyper (431).
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(req(&big).0, Parsed::Unusual));
        // `Connection` cannot take away the field that frames the body.
        let (p, out) = req("POST / HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nhi");
        assert!(matches!(p, Parsed::Ready(Request { body_len: 2, .. })));
        assert!(out.contains("Content-Length: 2\r\n"), "{out}");
    }

    fn scan_all(body: &[u8], step: usize) -> Result<Option<usize>, &'static str> {
        let mut c = Chunks::default();
        let mut at = 0;
        for piece in body.chunks(step) {
            if let Some(n) = c.scan(piece)? {
                return Ok(Some(at + n));
            }
            at += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 9\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(scan_all(body, step), Ok(Some(body.len() - 4)), "step {step}");
        }
        assert_eq!(scan_all(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(scan_all(b"5\r\nhel", 2), Ok(None));
        assert!(scan_all(b"5\r\nhelloXX", 1).is_err());
        assert!(scan_all(b"zz\r\n", 1).is_err());
        assert!(
            scan_all(b"5;a\nb\r\nhello\r\n0\r\n\r\n", 1).is_err(),
            "bare LF in an extension"
        );
        assert!(scan_all(b"0\r\nx: a\n\r\n", 1).is_err(), "bare LF in a trailer");
    }

    #[test]
    fn response_framing() {
        let get = Request {
            head_len: 0,
            body_len: 0,
            head_method: false,
            retryable: true,
            close: false,
        };
        let mut out = Vec::new();
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\nKeep-Alive: x\r\n\r\nhello";
        let r = parse_response(text, &get, &mut out)
            .ok()
            .flatten()
            .expect("complete");
        assert_eq!(
            (r.framing, r.upstream_close, r.head_len),
            (Framing::Length(5), true, text.len() - 5)
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nvia: 1.1 wasmbassador\r\n\r\n"
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            &get,
            &mut out,
        );
        assert_eq!(r.ok().flatten().map(|r| r.framing), Some(Framing::Chunked));
        assert!(!String::from_utf8_lossy(&out).contains("Content-Length"));
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", &get, &mut out);
        assert_eq!(r.ok().flatten().map(|r| r.framing), Some(Framing::UntilClose));
        assert!(String::from_utf8_lossy(&out).contains("connection: close"));
        let r = parse_response(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            &get,
            &mut out,
        );
        assert_eq!(r.ok().flatten().map(|r| r.framing), Some(Framing::Empty));
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &get,
                &mut out
            )
            .is_err()
        );
        assert!(parse_response(b"HTTP/1.1 099 Odd\r\n\r\n", &get, &mut out).is_err());
        // `Connection` cannot take away the field that frames the body.
        let text = b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n";
        let r = parse_response(text, &get, &mut out);
        assert_eq!(r.ok().flatten().map(|r| r.framing), Some(Framing::Length(3)));
        assert!(String::from_utf8_lossy(&out).contains("Content-Length: 3\r\n"));
    }
}
