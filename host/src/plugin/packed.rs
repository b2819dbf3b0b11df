//! The arguments of `packed-hooks` (WIT 0.1.3) and `packed-http-hooks` (0.1.4): the
//! text fields of a `connect-info`, `close-info`, `request-info` or `response-info`
//! laid end to end in one string or byte list, with a span (offset and length) per
//! field. The canonical ABI copies every string of an argument into the guest through
//! a call of the guest's allocator; one per call instead of up to ten (or, for a
//! request, two per header field) is most of what a hook costs to enter. Built once
//! and shared by every plugin of the chain that exports the packed hooks, until an
//! edit changes the request or response.

use http::HeaderMap;

use super::bindings::packed_hooks::{CloseSpans, ConnectSpans};
use super::bindings::packed_http_hooks::{RequestSpans, ResponseSpans};
use super::{CloseInfo, ConnectInfo, Header, RequestInfo, ResponseInfo, ResponseSource};

/// The span of a field with no value.
pub const ABSENT: u64 = u64::MAX;

/// A `connect-info`, packed.
#[derive(Debug)]
pub struct PackedConnect {
    /// Every text field.
    pub text: String,
    /// Where each one is.
    pub spans: ConnectSpans,
}

/// A `close-info`, packed.
#[derive(Debug)]
pub struct PackedClose {
    /// Every text field.
    pub text: String,
    /// Where each one is.
    pub spans: CloseSpans,
}

/// The span of `start..end`; `None` past 4 GiB.
fn span(start: usize, end: usize) -> Option<u64> {
    let start32 = u32::try_from(start).ok()?;
    let len = u32::try_from(end - start).ok()?;
    Some(u64::from(start32) << 32 | u64::from(len))
}

/// Appends fields to one string and answers their spans.
struct Packer {
    text: String,
}

impl Packer {
    fn with_capacity(n: usize) -> Self {
        Packer {
            text: String::with_capacity(n),
        }
    }

    fn span_from(&self, start: usize) -> Option<u64> {
        span(start, self.text.len())
    }

    fn push(&mut self, field: &str) -> Option<u64> {
        let start = self.text.len();
        self.text.push_str(field);
        self.span_from(start)
    }

    fn push_opt(&mut self, field: Option<&str>) -> Option<u64> {
        match field {
            Some(f) => self.push(f),
            None => Some(ABSENT),
        }
    }
}

/// `info` packed; `None` when it cannot be (a startup parameter holding a NUL, which a
/// PostgreSQL client cannot send, or more than 4 GiB of text): the caller then uses the
/// plain hook.
pub fn connect(info: &ConnectInfo) -> Option<PackedConnect> {
    let startup = info.postgres.as_ref();
    let mut size = info.listener.len() + info.client_addr.len() + info.upstream.len();
    if let Some(s) = startup {
        size += [&s.user, &s.database, &s.application_name]
            .iter()
            .map(|f| f.as_ref().map_or(0, String::len))
            .sum::<usize>();
        for (name, value) in &s.parameters {
            if name.contains('\0') || value.contains('\0') {
                return None;
            }
            size += name.len() + value.len() + 2;
        }
    }
    let mut p = Packer::with_capacity(size);
    let listener = p.push(&info.listener)?;
    let client_addr = p.push(&info.client_addr)?;
    let upstream = p.push(&info.upstream)?;
    let (user, database, application_name, parameters) = match startup {
        None => (ABSENT, ABSENT, ABSENT, ABSENT),
        Some(s) => {
            let user = p.push_opt(s.user.as_deref())?;
            let database = p.push_opt(s.database.as_deref())?;
            let application_name = p.push_opt(s.application_name.as_deref())?;
            let start = p.text.len();
            for (name, value) in &s.parameters {
                p.text.push_str(name);
                p.text.push('\0');
                p.text.push_str(value);
                p.text.push('\0');
            }
            (user, database, application_name, p.span_from(start)?)
        }
    };
    Some(PackedConnect {
        spans: ConnectSpans {
            listener,
            protocol: info.protocol,
            client_addr,
            upstream,
            user,
            database,
            application_name,
            parameters,
        },
        text: p.text,
    })
}

/// `info` packed; `None` only past 4 GiB of text.
pub fn close(info: &CloseInfo) -> Option<PackedClose> {
    let text_fields = [
        Some(&info.listener),
        Some(&info.client_addr),
        info.upstream.as_ref(),
        info.endpoint.as_ref(),
        info.user.as_ref(),
        info.database.as_ref(),
    ];
    let size = text_fields.iter().map(|f| f.map_or(0, |s| s.len())).sum();
    let mut p = Packer::with_capacity(size);
    Some(PackedClose {
        spans: CloseSpans {
            listener: p.push(&info.listener)?,
            client_addr: p.push(&info.client_addr)?,
            upstream: p.push_opt(info.upstream.as_deref())?,
            endpoint: p.push_opt(info.endpoint.as_deref())?,
            bytes_to_upstream: info.bytes_to_upstream,
            bytes_to_client: info.bytes_to_client,
            duration_ns: info.duration_ns,
            outcome: info.outcome,
            user: p.push_opt(info.user.as_deref())?,
            database: p.push_opt(info.database.as_deref())?,
        },
        text: p.text,
    })
}

/// A request head as the HTTP hooks see it, borrowed from the request in flight.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// `listener.name`.
    pub listener: &'a str,
    /// The application's address, `ip:port`.
    pub client_addr: &'a str,
    /// The method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `Host` / `:authority`, if the request named one.
    pub authority: Option<&'a str>,
    /// The header fields, earlier plugins' edits applied.
    pub headers: &'a HeaderMap,
    /// Where it goes unless routed elsewhere.
    pub upstream: &'a str,
}

/// A response head as `on-response` sees it.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'a> {
    /// `listener.name`.
    pub listener: &'a str,
    /// The request's method.
    pub method: &'a str,
    /// The request's path and query.
    pub path: &'a str,
    /// The upstream it went to, after routing.
    pub upstream: &'a str,
    /// The endpoint that answered, if one did.
    pub endpoint: Option<&'a str>,
    /// The status code.
    pub status: u16,
    /// The header fields, earlier plugins' edits applied.
    pub headers: &'a HeaderMap,
    /// Who made it.
    pub source: ResponseSource,
    /// Time from the request head to this response head.
    pub duration_ns: u64,
    /// Tries sent upstream.
    pub attempts: u32,
}

/// A `request-info`, packed.
#[derive(Debug)]
pub struct PackedRequest {
    /// Every field.
    pub bytes: Vec<u8>,
    /// Where each one is.
    pub spans: RequestSpans,
}

/// A `response-info`, packed.
#[derive(Debug)]
pub struct PackedResponse {
    /// Every field.
    pub bytes: Vec<u8>,
    /// Where each one is.
    pub spans: ResponseSpans,
}

/// Appends fields to one byte list and answers their spans.
struct BytePacker(Vec<u8>);

impl BytePacker {
    fn new(fields: &[Option<&str>], headers: &HeaderMap) -> Self {
        let text: usize = fields.iter().map(|f| f.map_or(0, str::len)).sum();
        let fields: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 2).sum();
        BytePacker(Vec::with_capacity(text + fields))
    }

    fn push(&mut self, field: &str) -> Option<u64> {
        let start = self.0.len();
        self.0.extend_from_slice(field.as_bytes());
        span(start, self.0.len())
    }

    fn push_opt(&mut self, field: Option<&str>) -> Option<u64> {
        field.map_or(Some(ABSENT), |f| self.push(f))
    }

    /// `name NUL value NUL` per field, in order (a field value cannot hold a NUL:
    /// `HeaderValue` refuses control bytes).
    fn headers(&mut self, headers: &HeaderMap) -> Option<u64> {
        let start = self.0.len();
        for (name, value) in headers {
            self.0.extend_from_slice(name.as_str().as_bytes());
            self.0.push(0);
            self.0.extend_from_slice(value.as_bytes());
            self.0.push(0);
        }
        span(start, self.0.len())
    }
}

/// `head` packed; `None` only past 4 GiB.
pub fn request(head: &RequestHead) -> Option<PackedRequest> {
    let h = head;
    let mut p = BytePacker::new(
        &[
            Some(h.listener),
            Some(h.client_addr),
            Some(h.method),
            Some(h.path),
            h.authority,
            Some(h.upstream),
        ],
        h.headers,
    );
    let spans = RequestSpans {
        listener: p.push(h.listener)?,
        client_addr: p.push(h.client_addr)?,
        method: p.push(h.method)?,
        path: p.push(h.path)?,
        authority: p.push_opt(h.authority)?,
        upstream: p.push(h.upstream)?,
        // Last, where the SDK's own builders keep them too.
        headers: p.headers(h.headers)?,
    };
    Some(PackedRequest { bytes: p.0, spans })
}

/// `head` packed; `None` only past 4 GiB.
pub fn response(head: &ResponseHead) -> Option<PackedResponse> {
    let h = head;
    let mut p = BytePacker::new(
        &[
            Some(h.listener),
            Some(h.method),
            Some(h.path),
            Some(h.upstream),
            h.endpoint,
        ],
        h.headers,
    );
    let spans = ResponseSpans {
        listener: p.push(h.listener)?,
        method: p.push(h.method)?,
        path: p.push(h.path)?,
        upstream: p.push(h.upstream)?,
        endpoint: p.push_opt(h.endpoint)?,
        status: h.status,
        headers: p.headers(h.headers)?,
        source: h.source,
        duration_ns: h.duration_ns,
        attempts: h.attempts,
    };
    Some(PackedResponse { bytes: p.0, spans })
}

fn to_wit(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_string(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

/// `head` as `http-hooks.on-request` takes it.
pub fn plain_request(head: &RequestHead) -> RequestInfo {
    RequestInfo {
        listener: head.listener.to_string(),
        client_addr: head.client_addr.to_string(),
        method: head.method.to_string(),
        path: head.path.to_string(),
        authority: head.authority.map(str::to_string),
        headers: to_wit(head.headers),
        upstream: head.upstream.to_string(),
    }
}

/// `head` as `http-hooks.on-response` takes it.
pub fn plain_response(head: &ResponseHead) -> ResponseInfo {
    ResponseInfo {
        listener: head.listener.to_string(),
        method: head.method.to_string(),
        path: head.path.to_string(),
        upstream: head.upstream.to_string(),
        endpoint: head.endpoint.map(str::to_string),
        status: head.status,
        headers: to_wit(head.headers),
        source: head.source,
        duration_ns: head.duration_ns,
        attempts: head.attempts,
    }
}

/// A hook argument in the two forms plugins take (plain and packed), each made on
/// first need: a chain whose plugins all take one form never makes the other. Kept
/// across the plugins of a chain until [`clear`](Args::clear), when an edit changed
/// what they were made from.
#[derive(Debug)]
pub struct Args<P, Q> {
    plain: Option<P>,
    packed: Option<Option<Q>>,
}

impl<P, Q> Default for Args<P, Q> {
    fn default() -> Self {
        Args {
            plain: None,
            packed: None,
        }
    }
}

impl<P, Q> Args<P, Q> {
    /// Forgets both forms.
    pub fn clear(&mut self) {
        self.plain = None;
        self.packed = None;
    }

    pub(super) fn plain(&mut self, make: impl FnOnce() -> P) -> &P {
        self.plain.get_or_insert_with(make)
    }

    pub(super) fn packed(&mut self, make: impl FnOnce() -> Option<Q>) -> Option<&Q> {
        self.packed.get_or_insert_with(make).as_ref()
    }
}

/// `on-request`'s argument.
pub type RequestArgs = Args<RequestInfo, PackedRequest>;
/// `on-response`'s argument.
pub type ResponseArgs = Args<ResponseInfo, PackedResponse>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{Outcome, PostgresStartup, Protocol};

    fn field(text: &str, span: u64) -> Option<&str> {
        (span != ABSENT).then(|| {
            let start = (span >> 32) as usize;
            &text[start..start + (span & 0xffff_ffff) as usize]
        })
    }

    #[test]
    fn connect_fields_come_back_from_their_spans() {
        let info = ConnectInfo {
            listener: "pg".into(),
            protocol: Protocol::Postgres,
            client_addr: "[::1]:5000".into(),
            upstream: "main".into(),
            postgres: Some(PostgresStartup {
                user: Some("app".into()),
                database: None,
                application_name: Some("psql – ünïcode".into()),
                parameters: vec![
                    ("client_encoding".into(), "UTF8".into()),
                    ("options".into(), "".into()),
                ],
            }),
        };
        let p = connect(&info).expect("packs");
        let t = &p.text;
        assert_eq!(field(t, p.spans.listener), Some("pg"));
        assert_eq!(field(t, p.spans.client_addr), Some("[::1]:5000"));
        assert_eq!(field(t, p.spans.upstream), Some("main"));
        assert_eq!(field(t, p.spans.user), Some("app"));
        assert_eq!(field(t, p.spans.database), None);
        assert_eq!(field(t, p.spans.application_name), Some("psql – ünïcode"));
        assert_eq!(
            field(t, p.spans.parameters),
            Some("client_encoding\0UTF8\0options\0\0")
        );
    }

    #[test]
    fn a_tcp_connection_has_no_startup_fields_and_a_nul_falls_back_to_the_plain_hook() {
        let mut info = ConnectInfo {
            listener: "raw".into(),
            protocol: Protocol::Tcp,
            client_addr: "10.0.0.1:1".into(),
            upstream: "u".into(),
            postgres: None,
        };
        let p = connect(&info).expect("packs");
        for s in [
            p.spans.user,
            p.spans.database,
            p.spans.application_name,
            p.spans.parameters,
        ] {
            assert_eq!(s, ABSENT);
        }
        info.protocol = Protocol::Postgres;
        info.postgres = Some(PostgresStartup {
            user: Some("app".into()),
            database: None,
            application_name: None,
            parameters: vec![("bad\0name".into(), "v".into())],
        });
        assert!(connect(&info).is_none());
    }

    #[test]
    fn close_fields_come_back_from_their_spans() {
        let info = CloseInfo {
            listener: "pg".into(),
            client_addr: "127.0.0.1:9".into(),
            upstream: Some("orders".into()),
            endpoint: None,
            bytes_to_upstream: 1,
            bytes_to_client: 2,
            duration_ns: 3,
            outcome: Outcome::Completed,
            user: None,
            database: Some("orders".into()),
        };
        let p = close(&info).expect("packs");
        let t = &p.text;
        assert_eq!(field(t, p.spans.listener), Some("pg"));
        assert_eq!(field(t, p.spans.client_addr), Some("127.0.0.1:9"));
        assert_eq!(field(t, p.spans.upstream), Some("orders"));
        assert_eq!(field(t, p.spans.endpoint), None);
        assert_eq!(field(t, p.spans.user), None);
        assert_eq!(field(t, p.spans.database), Some("orders"));
        assert_eq!((p.spans.bytes_to_upstream, p.spans.duration_ns), (1, 3));
    }

    fn bytes_field(bytes: &[u8], span: u64) -> Option<&[u8]> {
        (span != ABSENT).then(|| {
            let start = (span >> 32) as usize;
            &bytes[start..start + (span & 0xffff_ffff) as usize]
        })
    }

    #[test]
    fn request_fields_and_headers_come_back_from_their_spans() {
        let mut headers = HeaderMap::new();
        headers.append("accept", "a".parse().expect("value"));
        headers.append("accept", "b".parse().expect("value"));
        headers.insert("x-bin", http::HeaderValue::from_bytes(b"\xffok").expect("value"));
        let head = RequestHead {
            listener: "api",
            client_addr: "[::1]:5000",
            method: "POST",
            path: "/v1/ü?x=1",
            authority: None,
            headers: &headers,
            upstream: "backend",
        };
        let p = request(&head).expect("packs");
        let b = &p.bytes[..];
        assert_eq!(bytes_field(b, p.spans.listener), Some(&b"api"[..]));
        assert_eq!(bytes_field(b, p.spans.client_addr), Some(&b"[::1]:5000"[..]));
        assert_eq!(bytes_field(b, p.spans.method), Some(&b"POST"[..]));
        assert_eq!(bytes_field(b, p.spans.path), Some("/v1/ü?x=1".as_bytes()));
        assert_eq!(bytes_field(b, p.spans.authority), None);
        assert_eq!(bytes_field(b, p.spans.upstream), Some(&b"backend"[..]));
        assert_eq!(
            bytes_field(b, p.spans.headers),
            Some(&b"accept\0a\0accept\0b\0x-bin\0\xffok\0"[..])
        );
        // The plain form carries the same.
        let plain = plain_request(&head);
        assert_eq!(plain.headers.len(), 3);
        assert_eq!(plain.headers[2].value, b"\xffok");
    }

    #[test]
    fn response_fields_come_back_and_each_form_is_made_once_until_cleared() {
        let headers = HeaderMap::new();
        let head = ResponseHead {
            listener: "api",
            method: "GET",
            path: "/",
            upstream: "backend",
            endpoint: Some("127.0.0.1:1"),
            status: 204,
            headers: &headers,
            source: ResponseSource::Upstream,
            duration_ns: 7,
            attempts: 2,
        };
        let mut args = ResponseArgs::default();
        let mut made = 0;
        for _ in 0..3 {
            let p = args
                .packed(|| {
                    made += 1;
                    response(&head)
                })
                .expect("packs");
            assert_eq!(bytes_field(&p.bytes, p.spans.endpoint), Some(&b"127.0.0.1:1"[..]));
            assert_eq!(bytes_field(&p.bytes, p.spans.headers), Some(&b""[..]));
            assert_eq!(
                (p.spans.status, p.spans.attempts, p.spans.duration_ns),
                (204, 2, 7)
            );
        }
        assert_eq!(made, 1);
        args.clear();
        args.packed(|| {
            made += 1;
            response(&head)
        });
        assert_eq!(made, 2);
    }
}
