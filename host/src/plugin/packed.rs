//! The arguments of `packed-hooks` (WIT 0.1.3): the text fields of a `connect-info` or
//! `close-info` laid end to end in one string, with a span (offset and length) per
//! field. The canonical ABI copies every string of an argument into the guest through
//! a call of the guest's allocator; one string per call instead of up to ten is most of
//! what a hook costs to enter. Built once per connection and shared by every plugin of
//! the chain that exports `packed-hooks`.

use super::bindings::packed_hooks::{CloseSpans, ConnectSpans};
use super::{CloseInfo, ConnectInfo};

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
        let start = u32::try_from(start).ok()?;
        let len = u32::try_from(self.text.len() - start as usize).ok()?;
        Some(u64::from(start) << 32 | u64::from(len))
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
}
