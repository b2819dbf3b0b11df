//! What the hooks see: [`Connection`] in `on_connect`, [`Closed`] in `on_close`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::__private::bindings::exports::wasmbassador::plugin::packed_hooks::{CloseSpans, ConnectSpans};
use crate::__private::bindings::wasmbassador::plugin::types as wit;

/// How the listener that accepted a connection reads its start (`listener.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// Raw TCP: nothing is known beyond the addresses.
    Tcp,
    /// PostgreSQL: the startup parameters (user, database, ...) are known.
    Postgres,
    /// HTTP: the connection of an HTTP listener.
    Http,
}

impl Protocol {
    /// `"tcp"`, `"postgres"` or `"http"`, as written in the host config.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
            Protocol::Http => "http",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A new client connection, as [`Plugin::on_connect`](crate::Plugin::on_connect) sees it.
/// A byte range of a value's `text`: one field. Ranges are checked against the text
/// (in bounds, on character boundaries) when a value is built.
type Field = std::ops::Range<usize>;

/// A value's text, built field by field. Appending never moves an earlier field.
struct Text(String);

impl Text {
    fn with_capacity(n: usize) -> Text {
        Text(String::with_capacity(n))
    }

    fn push(&mut self, field: &str) -> Field {
        let start = self.0.len();
        self.0.push_str(field);
        start..self.0.len()
    }

    fn push_opt(&mut self, field: Option<&str>) -> Option<Field> {
        field.map(|f| self.push(f))
    }
}

/// A field of `text` (empty if it does not lie in it, which a value's constructors
/// rule out).
fn read<'a>(text: &'a str, field: &Field) -> &'a str {
    text.get(field.clone()).unwrap_or("")
}

fn read_opt<'a>(text: &'a str, field: &Option<Field>) -> Option<&'a str> {
    field.as_ref().map(|f| read(text, f))
}

/// The startup parameters of a PostgreSQL connection, as fields of its text.
#[derive(Clone)]
struct Startup {
    user: Option<Field>,
    database: Option<Field>,
    application_name: Option<Field>,
    /// The other parameters, as `name NUL value NUL` pairs in the order sent.
    others: Field,
}

/// A new client connection, as [`Plugin::on_connect`](crate::Plugin::on_connect) sees it.
///
/// All its text is one string, as the host sends it (`packed-hooks`), and the
/// accessors lend slices of it: reading a field copies nothing.
#[derive(Clone)]
pub struct Connection {
    text: String,
    protocol: wit::Protocol,
    listener: Field,
    client_addr: Field,
    upstream: Field,
    /// Present exactly on `postgres` connections.
    startup: Option<Startup>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("listener", &self.listener())
            .field("protocol", &self.protocol())
            .field("client_addr", &self.client_addr())
            .field("upstream", &self.upstream())
            .field("startup", &self.startup_parameters().collect::<Vec<_>>())
            .finish()
    }
}

/// Building values by hand, for a plugin's unit tests (the host builds the real ones):
///
/// ```
/// use wasmbassador_sdk::{Connection, Protocol};
/// let c = Connection::new("orders-db", "10.1.2.3:50000", "orders")
///     .with_startup(&[("user", "app"), ("database", "orders")]);
/// assert_eq!(c.protocol(), Protocol::Postgres);
/// assert_eq!(c.db_user(), Some("app"));
/// ```
impl Connection {
    /// A `tcp` connection from `client_addr` (`ip:port`) to `listener`, whose default
    /// upstream is `upstream`.
    pub fn new(listener: &str, client_addr: &str, upstream: &str) -> Connection {
        let mut text = Text::with_capacity(listener.len() + client_addr.len() + upstream.len());
        let listener = text.push(listener);
        let client_addr = text.push(client_addr);
        let upstream = text.push(upstream);
        Connection {
            text: text.0,
            protocol: wit::Protocol::Tcp,
            listener,
            client_addr,
            upstream,
            startup: None,
        }
    }

    /// Makes it a `postgres` connection with these startup parameters (`user`,
    /// `database`, `application_name` and any others; none may contain NUL, which a
    /// PostgreSQL client cannot send).
    pub fn with_startup(self, parameters: &[(&str, &str)]) -> Connection {
        let get = |name: &str| parameters.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let mut text = Text(self.text);
        let user = text.push_opt(get("user"));
        let database = text.push_opt(get("database"));
        let application_name = text.push_opt(get("application_name"));
        let start = text.0.len();
        for (name, value) in parameters {
            if !matches!(*name, "user" | "database" | "application_name") {
                for part in [*name, "\0", *value, "\0"] {
                    text.0.push_str(part);
                }
            }
        }
        let others = start..text.0.len();
        Connection {
            text: text.0,
            protocol: wit::Protocol::Postgres,
            startup: Some(Startup {
                user,
                database,
                application_name,
                others,
            }),
            ..self
        }
    }

    /// Makes it a connection of an `http` listener.
    pub fn with_http(mut self) -> Connection {
        self.protocol = wit::Protocol::Http;
        self.startup = None;
        self
    }
}

impl Connection {
    /// The name of the listener that accepted the connection (`listener.name`).
    pub fn listener(&self) -> &str {
        read(&self.text, &self.listener)
    }

    /// The listener's protocol.
    pub fn protocol(&self) -> Protocol {
        match self.protocol {
            wit::Protocol::Tcp => Protocol::Tcp,
            wit::Protocol::Postgres => Protocol::Postgres,
            wit::Protocol::Http => Protocol::Http,
        }
    }

    /// The client's address as the listener saw it, `ip:port` (`[ip]:port` for IPv6).
    pub fn client_addr(&self) -> &str {
        read(&self.text, &self.client_addr)
    }

    /// The client's IP address. An IPv4 client of a listener bound to `[::]` arrives as
    /// an IPv4-mapped IPv6 address (`::ffff:10.1.2.3`); it is returned as plain IPv4
    /// (`10.1.2.3`) so that IPv4 rules match it. `None` only if the host sent an address
    /// that does not parse.
    pub fn client_ip(&self) -> Option<IpAddr> {
        parse_ip(self.client_addr())
    }

    /// The listener's default upstream (`listener.upstream`): where the connection goes
    /// unless a plugin routes it elsewhere.
    pub fn upstream(&self) -> &str {
        read(&self.text, &self.upstream)
    }

    /// The PostgreSQL `user` startup parameter; `None` on other protocols.
    pub fn db_user(&self) -> Option<&str> {
        read_opt(&self.text, &self.startup.as_ref()?.user)
    }

    /// The PostgreSQL database the client asked for: the `database` startup parameter,
    /// or, when the client sent none, the user name — the database PostgreSQL itself
    /// will use. `None` on other protocols. The raw parameter is
    /// `startup_parameter("database")`.
    pub fn database(&self) -> Option<&str> {
        let startup = self.startup.as_ref()?;
        read_opt(&self.text, &startup.database).or(read_opt(&self.text, &startup.user))
    }

    /// The PostgreSQL `application_name` startup parameter, if the client sent one.
    pub fn application_name(&self) -> Option<&str> {
        read_opt(&self.text, &self.startup.as_ref()?.application_name)
    }

    /// A PostgreSQL startup parameter by name (`"options"`, `"replication"`, `"user"`,
    /// ...), as the client sent it; `None` if absent or on other protocols.
    pub fn startup_parameter(&self, name: &str) -> Option<&str> {
        let startup = self.startup.as_ref()?;
        match name {
            "user" => read_opt(&self.text, &startup.user),
            "database" => read_opt(&self.text, &startup.database),
            "application_name" => read_opt(&self.text, &startup.application_name),
            _ => self
                .others()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value),
        }
    }

    /// Every PostgreSQL startup parameter the client sent: `user`, `database` and
    /// `application_name` first (those present), then the others in the order sent.
    /// Empty on other protocols.
    pub fn startup_parameters(&self) -> impl Iterator<Item = (&str, &str)> {
        let named = self.startup.as_ref().map(|s| {
            [
                ("user", &s.user),
                ("database", &s.database),
                ("application_name", &s.application_name),
            ]
        });
        named
            .into_iter()
            .flatten()
            .filter_map(|(key, field)| Some((key, read_opt(&self.text, field)?)))
            .chain(self.others())
    }

    /// The parameters other than the named three, in the order sent.
    fn others(&self) -> impl Iterator<Item = (&str, &str)> {
        let region = self.startup.as_ref().map_or("", |s| read(&self.text, &s.others));
        let mut parts = region.split('\0');
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
            // The named three have fields of their own, should a host repeat them here.
            .filter(|(k, _)| !matches!(*k, "user" | "database" | "application_name"))
    }
}

impl From<wit::ConnectInfo> for Connection {
    fn from(info: wit::ConnectInfo) -> Self {
        let c = Connection::new(&info.listener, &info.client_addr, &info.upstream);
        let c = match &info.postgres {
            None => c,
            Some(startup) => {
                let named = [
                    ("user", &startup.user),
                    ("database", &startup.database),
                    ("application_name", &startup.application_name),
                ];
                let mut parameters: Vec<(&str, &str)> = named
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_deref()?)))
                    .collect();
                parameters.extend(
                    startup
                        .parameters
                        .iter()
                        .filter(|(k, v)| !k.contains('\0') && !v.contains('\0'))
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                );
                c.with_startup(&parameters)
            }
        };
        match info.protocol {
            wit::Protocol::Http => c.with_http(),
            _ => c,
        }
    }
}

/// How a connection ended, as [`Closed::outcome`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The bytes flowed until one side closed.
    Completed,
    /// A plugin, or the `on_error` policy of a failed plugin, refused it.
    Denied,
    /// No endpoint of the chosen upstream could be reached within the retry budget.
    UpstreamUnreachable,
    /// Closed after the listener's `idle_timeout` without traffic.
    IdleTimeout,
    /// Any other failure (bad preamble, TLS error, reset, drain timeout).
    Error,
}

impl Outcome {
    /// `"completed"`, `"denied"`, `"upstream_unreachable"`, `"idle_timeout"` or
    /// `"error"`: a stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Denied => "denied",
            Outcome::UpstreamUnreachable => "upstream_unreachable",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::Error => "error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A finished connection, as [`Plugin::on_close`](crate::Plugin::on_close) sees it.
///
/// Like [`Connection`], all its text is one string and the accessors lend slices of it.
#[derive(Clone)]
pub struct Closed {
    text: String,
    listener: Field,
    client_addr: Field,
    upstream: Option<Field>,
    endpoint: Option<Field>,
    bytes_to_upstream: u64,
    bytes_to_client: u64,
    duration_ns: u64,
    outcome: wit::Outcome,
    user: Option<Field>,
    database: Option<Field>,
}

impl fmt::Debug for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Closed")
            .field("listener", &self.listener())
            .field("client_addr", &self.client_addr())
            .field("upstream", &self.upstream())
            .field("endpoint", &self.endpoint())
            .field("bytes_to_upstream", &self.bytes_to_upstream)
            .field("bytes_to_client", &self.bytes_to_client)
            .field("duration", &self.duration())
            .field("outcome", &self.outcome())
            .field("user", &self.db_user())
            .field("database", &self.database())
            .finish()
    }
}

/// Building values by hand, for a plugin's unit tests (the host builds the real ones):
///
/// ```
/// use std::time::Duration;
/// use wasmbassador_sdk::{Closed, Outcome};
/// let closed = Closed::new("orders-db", "10.1.2.3:50000", Outcome::Completed)
///     .with_upstream("orders", Some("10.9.0.1:5432"))
///     .with_bytes(120, 4096)
///     .with_duration(Duration::from_millis(15))
///     .with_postgres(Some("app"), Some("orders"));
/// assert_eq!(closed.bytes_to_client(), 4096);
/// ```
impl Closed {
    /// A connection to `listener` from `client_addr` that ended with `outcome`, with no
    /// upstream, no bytes, no duration and no PostgreSQL user or database.
    pub fn new(listener: &str, client_addr: &str, outcome: Outcome) -> Closed {
        let outcome = match outcome {
            Outcome::Completed => wit::Outcome::Completed,
            Outcome::Denied => wit::Outcome::Denied,
            Outcome::UpstreamUnreachable => wit::Outcome::UpstreamUnreachable,
            Outcome::IdleTimeout => wit::Outcome::IdleTimeout,
            Outcome::Error => wit::Outcome::Error,
        };
        let mut text = Text::with_capacity(listener.len() + client_addr.len());
        let listener = text.push(listener);
        let client_addr = text.push(client_addr);
        Closed {
            text: text.0,
            listener,
            client_addr,
            upstream: None,
            endpoint: None,
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            duration_ns: 0,
            outcome,
            user: None,
            database: None,
        }
    }

    /// Sets the upstream and the endpoint that served the connection.
    pub fn with_upstream(self, upstream: &str, endpoint: Option<&str>) -> Closed {
        let mut text = Text(self.text);
        Closed {
            upstream: Some(text.push(upstream)),
            endpoint: text.push_opt(endpoint),
            text: text.0,
            ..self
        }
    }

    /// Sets the byte counts.
    pub fn with_bytes(mut self, to_upstream: u64, to_client: u64) -> Closed {
        self.bytes_to_upstream = to_upstream;
        self.bytes_to_client = to_client;
        self
    }

    /// Sets the duration (saturating at about 584 years).
    pub fn with_duration(mut self, duration: Duration) -> Closed {
        self.duration_ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the PostgreSQL user and database.
    pub fn with_postgres(self, user: Option<&str>, database: Option<&str>) -> Closed {
        let mut text = Text(self.text);
        Closed {
            user: text.push_opt(user),
            database: text.push_opt(database),
            text: text.0,
            ..self
        }
    }
}

impl Closed {
    /// The name of the listener that accepted the connection.
    pub fn listener(&self) -> &str {
        read(&self.text, &self.listener)
    }

    /// The client's address, `ip:port` (`[ip]:port` for IPv6).
    pub fn client_addr(&self) -> &str {
        read(&self.text, &self.client_addr)
    }

    /// The client's IP address, IPv4-mapped addresses as IPv4 (see
    /// [`Connection::client_ip`]).
    pub fn client_ip(&self) -> Option<IpAddr> {
        parse_ip(self.client_addr())
    }

    /// The upstream the connection was sent to; `None` if it was refused before one was
    /// chosen.
    pub fn upstream(&self) -> Option<&str> {
        read_opt(&self.text, &self.upstream)
    }

    /// The address of the endpoint that served it (`endpoint.address`); `None` if no
    /// endpoint was connected.
    pub fn endpoint(&self) -> Option<&str> {
        read_opt(&self.text, &self.endpoint)
    }

    /// Bytes forwarded from the client to the upstream.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.bytes_to_upstream
    }

    /// Bytes forwarded from the upstream to the client.
    pub fn bytes_to_client(&self) -> u64 {
        self.bytes_to_client
    }

    /// Time from accept to close.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.duration_ns)
    }

    /// How the connection ended.
    pub fn outcome(&self) -> Outcome {
        match self.outcome {
            wit::Outcome::Completed => Outcome::Completed,
            wit::Outcome::Denied => Outcome::Denied,
            wit::Outcome::UpstreamUnreachable => Outcome::UpstreamUnreachable,
            wit::Outcome::IdleTimeout => Outcome::IdleTimeout,
            wit::Outcome::Error => Outcome::Error,
        }
    }

    /// The PostgreSQL `user` startup parameter, if any.
    pub fn db_user(&self) -> Option<&str> {
        read_opt(&self.text, &self.user)
    }

    /// The PostgreSQL `database` startup parameter as sent (unlike
    /// [`Connection::database`], not defaulted to the user name).
    pub fn database(&self) -> Option<&str> {
        read_opt(&self.text, &self.database)
    }
}

impl From<wit::CloseInfo> for Closed {
    fn from(info: wit::CloseInfo) -> Self {
        let mut closed = Closed::new(&info.listener, &info.client_addr, Outcome::Completed)
            .with_postgres(info.user.as_deref(), info.database.as_deref());
        if let Some(upstream) = &info.upstream {
            closed = closed.with_upstream(upstream, info.endpoint.as_deref());
        }
        Closed {
            bytes_to_upstream: info.bytes_to_upstream,
            bytes_to_client: info.bytes_to_client,
            duration_ns: info.duration_ns,
            outcome: info.outcome,
            ..closed
        }
    }
}

/// A span of the packed hooks (`packed-hooks`, `packed-http-hooks`) that holds no
/// value.
pub(crate) const ABSENT: u64 = u64::MAX;

/// The range a span of the packed hooks names in an argument of `len` bytes: `None`
/// for `ABSENT`, and also for a span that does not lie within them (a host bug,
/// answered like a missing value rather than with a trap).
pub(crate) fn span_range(span: u64, len: usize) -> Option<Field> {
    if span == ABSENT {
        return None;
    }
    let start = usize::try_from(span >> 32).ok()?;
    let end = start.checked_add(usize::try_from(span & 0xffff_ffff).ok()?)?;
    (end <= len).then_some(start..end)
}

/// The field at `span` of a packed hook argument's `text`: as [`span_range`], and
/// `None` too for a range that does not fall on character boundaries.
fn field(text: &str, span: u64) -> Option<Field> {
    span_range(span, text.len()).filter(|r| text.is_char_boundary(r.start) && text.is_char_boundary(r.end))
}

/// `packed-hooks.on-connect`'s argument, kept as it came: the text is not copied.
pub(crate) fn unpack_connect(text: String, s: &ConnectSpans) -> Connection {
    let startup = (s.protocol == wit::Protocol::Postgres).then(|| Startup {
        user: field(&text, s.user),
        database: field(&text, s.database),
        application_name: field(&text, s.application_name),
        others: field(&text, s.parameters).unwrap_or(0..0),
    });
    Connection {
        protocol: s.protocol,
        listener: field(&text, s.listener).unwrap_or(0..0),
        client_addr: field(&text, s.client_addr).unwrap_or(0..0),
        upstream: field(&text, s.upstream).unwrap_or(0..0),
        startup,
        text,
    }
}

/// `packed-hooks.on-close`'s argument, kept as it came.
pub(crate) fn unpack_close(text: String, s: &CloseSpans) -> Closed {
    Closed {
        listener: field(&text, s.listener).unwrap_or(0..0),
        client_addr: field(&text, s.client_addr).unwrap_or(0..0),
        upstream: field(&text, s.upstream),
        endpoint: field(&text, s.endpoint),
        bytes_to_upstream: s.bytes_to_upstream,
        bytes_to_client: s.bytes_to_client,
        duration_ns: s.duration_ns,
        outcome: s.outcome,
        user: field(&text, s.user),
        database: field(&text, s.database),
        text,
    }
}

fn parse_ip(addr: &str) -> Option<IpAddr> {
    let ip = match addr.parse::<SocketAddr>() {
        Ok(socket) => socket.ip(),
        // Tolerate a bare address, in case a host ever sends one.
        Err(_) => addr.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_is_canonical() {
        let ip = |a: &str| Connection::new("l", a, "u").client_ip();
        assert_eq!(ip("10.1.2.3:5555"), Some("10.1.2.3".parse().expect("ip")));
        assert_eq!(
            ip("[::ffff:10.1.2.3]:5555"),
            Some("10.1.2.3".parse().expect("ip"))
        );
        assert_eq!(ip("[2001:db8::1]:5555"), Some("2001:db8::1".parse().expect("ip")));
        assert_eq!(ip("garbage"), None);
    }

    #[test]
    fn database_defaults_to_the_user_like_postgres() {
        let c = Connection::new("l", "10.1.2.3:5555", "u").with_startup(&[("user", "app")]);
        assert_eq!(c.db_user(), Some("app"));
        assert_eq!(c.database(), Some("app"));
        assert_eq!(c.startup_parameter("database"), None);

        let c = Connection::new("l", "10.1.2.3:5555", "u").with_startup(&[
            ("user", "app"),
            ("database", "orders"),
            ("options", "-c x=1"),
        ]);
        assert_eq!(c.database(), Some("orders"));
        assert_eq!(c.startup_parameter("options"), Some("-c x=1"));
        assert_eq!(
            c.startup_parameters().collect::<Vec<_>>(),
            [("user", "app"), ("database", "orders"), ("options", "-c x=1")]
        );

        let c = Connection::new("l", "10.1.2.3:5555", "u");
        assert_eq!(
            (c.db_user(), c.database(), c.protocol()),
            (None, None, Protocol::Tcp)
        );
        assert_eq!(c.startup_parameters().count(), 0);
    }

    /// `start << 32 | len` of `field` in `text`.
    fn at(text: &str, field: &str) -> u64 {
        let start = text.find(field).expect("field in text") as u64;
        start << 32 | field.len() as u64
    }

    #[test]
    fn packed_connect_info_unpacks_to_the_same_connection() {
        let text = "pg[::1]:9mainappordersψ-appoptions\0-c x=1\0replication\0on\0";
        let c = unpack_connect(
            text.to_owned(),
            &ConnectSpans {
                listener: at(text, "pg"),
                protocol: wit::Protocol::Postgres,
                client_addr: at(text, "[::1]:9"),
                upstream: at(text, "main"),
                user: at(text, "app"),
                database: at(text, "orders"),
                application_name: at(text, "ψ-app"),
                parameters: at(text, "options\0-c x=1\0replication\0on\0"),
            },
        );
        assert_eq!(
            (c.listener(), c.client_addr(), c.upstream(), c.protocol()),
            ("pg", "[::1]:9", "main", Protocol::Postgres)
        );
        assert_eq!(
            c.startup_parameters().collect::<Vec<_>>(),
            [
                ("user", "app"),
                ("database", "orders"),
                ("application_name", "ψ-app"),
                ("options", "-c x=1"),
                ("replication", "on"),
            ]
        );

        // A tcp connection: no startup fields. A span outside the text (a host bug)
        // reads as a missing value, never a trap.
        let c = unpack_connect(
            "raw10.0.0.1:1u".to_owned(),
            &ConnectSpans {
                listener: at("raw10.0.0.1:1u", "raw"),
                protocol: wit::Protocol::Tcp,
                client_addr: at("raw10.0.0.1:1u", "10.0.0.1:1"),
                upstream: 999 << 32 | 4,
                user: ABSENT,
                database: ABSENT,
                application_name: ABSENT,
                parameters: ABSENT,
            },
        );
        assert_eq!((c.listener(), c.upstream(), c.db_user()), ("raw", "", None));
        assert_eq!(c.client_ip(), Some("10.0.0.1".parse().expect("ip")));
        assert_eq!(c.startup_parameters().count(), 0);
    }

    #[test]
    fn packed_close_info_unpacks_to_the_same_closed() {
        let text = "pg127.0.0.1:9orders10.0.0.5:5432";
        let c = unpack_close(
            text.to_owned(),
            &CloseSpans {
                listener: at(text, "pg"),
                client_addr: at(text, "127.0.0.1:9"),
                upstream: at(text, "orders"),
                endpoint: at(text, "10.0.0.5:5432"),
                bytes_to_upstream: 7,
                bytes_to_client: 8,
                duration_ns: 9,
                outcome: wit::Outcome::Denied,
                user: ABSENT,
                database: at(text, "orders"),
            },
        );
        assert_eq!(
            (c.listener(), c.client_addr(), c.upstream(), c.endpoint()),
            ("pg", "127.0.0.1:9", Some("orders"), Some("10.0.0.5:5432"))
        );
        assert_eq!((c.db_user(), c.database()), (None, Some("orders")));
        assert_eq!((c.bytes_to_upstream(), c.bytes_to_client()), (7, 8));
        assert_eq!(c.outcome(), Outcome::Denied);
    }

    #[test]
    fn closed_round_trips() {
        let c = Closed::new("l", "[::1]:9", Outcome::IdleTimeout)
            .with_duration(Duration::from_millis(3))
            .with_postgres(Some("app"), None);
        assert_eq!(c.outcome(), Outcome::IdleTimeout);
        assert_eq!(c.duration(), Duration::from_millis(3));
        assert_eq!(c.client_ip(), Some("::1".parse().expect("ip")));
        assert_eq!(
            (c.db_user(), c.database(), c.upstream()),
            (Some("app"), None, None)
        );
    }
}
