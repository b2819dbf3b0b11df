//! `bearer-token`: an auth plugin for `http` listeners. It adds the upstream's
//! credential to every forwarded request, so that the application never holds it:
//! `authorization: Bearer <token>`, the token read from a file granted to the plugin
//! (a mounted Kubernetes Secret, say) and re-read as it rotates. Optionally it first
//! checks the application's own bearer token against a list of accepted ones, and
//! answers a local 401 to a request without one.
//!
//! Config:
//! - `token_file` (required): the granted file holding the upstream token; surrounding
//!   whitespace is trimmed.
//! - `client_tokens_file` (optional): a granted file with one accepted client token per
//!   line (blank lines and `#` comments ignored).
//! - `refresh_ms` (default 1000, at least 10): both files are read again once this long
//!   has passed since the last read, on the next request.
//! - `header` (default `authorization`) and `scheme` (default `Bearer`, `""` for the
//!   bare token): where the upstream token goes and in what form.
//!
//! Metrics: `bearer_token_requests_total{outcome}` (`injected`, `rejected_client`,
//! `no_token`) and `bearer_token_reloads_total{result}` (`changed`, `unchanged`,
//! `failed`). Token values never appear in logs, metrics or response bodies.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::time::Duration;

use serde::Deserialize;
use wasmbassador_sdk::log::Level;
use wasmbassador_sdk::prelude::*;

/// The shortest `refresh_ms`: each read is a host call on the request path, and a
/// rotated Secret takes Kubernetes far longer than this to appear anyway.
const MIN_REFRESH_MS: u64 = 10;

/// What a local 401 carries, so that clients know which scheme is expected.
const WWW_AUTHENTICATE: &str = "Bearer realm=\"wasmbassador\"";

/// Field names the host owns (framing, hop-by-hop): it skips a plugin's edits of them,
/// so a `header` among them could never carry the token.
const RESERVED_HEADERS: [&str; 7] = [
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

#[derive(Default)]
struct BearerToken {
    /// Everything but the host calls; `None` before `init`.
    core: Option<RefCell<Core>>,
    /// `None` until `init` declared them.
    metrics: Option<Metrics>,
}

struct Metrics {
    requests: Counter,
    reloads: Counter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    token_file: String,
    client_tokens_file: Option<String>,
    #[serde(default = "default_refresh_ms")]
    refresh_ms: u64,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default = "default_scheme")]
    scheme: String,
}

fn default_refresh_ms() -> u64 {
    1000
}

fn default_header() -> String {
    "authorization".into()
}

fn default_scheme() -> String {
    "Bearer".into()
}

/// The plugin's logic, kept apart from the host calls (clock, files, log, metrics) so
/// that it runs in native unit tests: the time and a file reader come in as arguments,
/// and what should be logged or counted goes out as [`Event`]s and an [`Outcome`].
struct Core {
    /// Lowercase.
    header: String,
    scheme: String,
    refresh: Duration,
    token: Watched<Vec<u8>>,
    clients: Option<Watched<Vec<Vec<u8>>>>,
}

/// A granted file that is read again every `refresh`, and the last good value read
/// from it.
struct Watched<T> {
    /// The config key that named it, for messages.
    key: &'static str,
    path: String,
    parse: fn(&[u8]) -> Result<T, String>,
    last_read: Option<Duration>,
    good: Option<T>,
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Injected,
    RejectedClient,
    NoToken,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::RejectedClient => "rejected_client",
            Outcome::NoToken => "no_token",
        }
    }
}

/// The result of reading one watched file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A value different from the last good one (or the first) is now in use. `tokens`
    /// is the number of client tokens, for the client file.
    Changed {
        key: &'static str,
        path: String,
        first: bool,
        tokens: Option<usize>,
    },
    /// The same value as before.
    Unchanged,
    /// The file could not be used; the last good value, if any, stays in use.
    Failed {
        key: &'static str,
        reason: String,
        have_last: bool,
    },
}

impl Event {
    /// The `result` label of `bearer_token_reloads_total`.
    fn result(&self) -> &'static str {
        match self {
            Event::Changed { .. } => "changed",
            Event::Unchanged => "unchanged",
            Event::Failed { .. } => "failed",
        }
    }

    /// The log line, if any. Never holds a token: only keys, paths, counts and the
    /// host's read errors (which name the path).
    fn message(&self) -> Option<(Level, String)> {
        match self {
            Event::Unchanged => None,
            Event::Changed {
                key,
                path,
                first,
                tokens,
            } => {
                let verb = if *first { "loaded" } else { "reloaded" };
                Some(match tokens {
                    Some(0) => (
                        Level::Warn,
                        format!(
                            "config.{key}: {verb} {path:?}: it holds no token, so every request is answered 401"
                        ),
                    ),
                    Some(1) => (Level::Info, format!("config.{key}: {verb} {path:?} (1 token)")),
                    Some(n) => (Level::Info, format!("config.{key}: {verb} {path:?} ({n} tokens)")),
                    None => (Level::Info, format!("config.{key}: {verb} {path:?}")),
                })
            }
            Event::Failed {
                key,
                reason,
                have_last,
            } => {
                let then = match (*key, *have_last) {
                    (_, true) => "keeping the last good value",
                    ("token_file", false) => "no upstream token yet: requests are answered 401",
                    (_, false) => "no client tokens yet: requests are answered 401",
                };
                Some((Level::Warn, format!("config.{key}: {reason}; {then}")))
            }
        }
    }
}

/// The upstream token: the file's text without surrounding whitespace. It must be
/// usable as a header value, so a control character inside (a second line, say) makes
/// the file unusable rather than the request.
fn parse_token(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err("the file is empty".into());
    }
    if token.iter().any(|b| b.is_ascii_control()) {
        return Err(
            "the token holds a line break or another control character, which a header value cannot".into(),
        );
    }
    Ok(token.to_vec())
}

/// Accepted client tokens: one per line, trimmed; blank lines and `#` comments skipped.
/// A file without any token is valid (it accepts nobody; the log says so).
fn parse_client_tokens(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    Ok(bytes
        .split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
        .map(<[u8]>::to_vec)
        .collect())
}

impl<T: PartialEq> Watched<T> {
    fn new(key: &'static str, path: String, parse: fn(&[u8]) -> Result<T, String>) -> Self {
        Watched {
            key,
            path,
            parse,
            last_read: None,
            good: None,
        }
    }

    fn due(&self, now: Duration, every: Duration) -> bool {
        self.last_read
            .is_none_or(|last| now.saturating_sub(last) >= every)
    }

    /// Reads the file, keeps its value if it is good, and says what happened. A failed
    /// read also counts as a read: the next try waits a full `refresh`, which also
    /// limits the warnings to one per `refresh`.
    fn reload(&mut self, now: Duration, read: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>) -> Event {
        self.last_read = Some(now);
        match read(&self.path).and_then(|bytes| (self.parse)(&bytes)) {
            Ok(value) if self.good.as_ref() == Some(&value) => Event::Unchanged,
            Ok(value) => {
                let first = self.good.is_none();
                self.good = Some(value);
                Event::Changed {
                    key: self.key,
                    path: self.path.clone(),
                    first,
                    tokens: None,
                }
            }
            Err(reason) => Event::Failed {
                key: self.key,
                // The host's read errors start with the path; a parse error does not.
                reason: if reason.contains(&self.path) {
                    reason
                } else {
                    format!("{:?}: {reason}", self.path)
                },
                have_last: self.good.is_some(),
            },
        }
    }
}

/// Whether `s` is an RFC 9110 `token`, as header names and auth schemes must be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Equal contents, compared without stopping at the first difference, so that the time
/// taken does not tell a client how much of a token it guessed right (only whether the
/// length matched).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The token of an `authorization: Bearer <token>` field: the scheme matched ignoring
/// case, as RFC 9110 says. `None` for no field, another scheme, an empty token, or more
/// than one `authorization` field (which is ambiguous, so refused).
fn presented_token(request: &Request) -> Option<&[u8]> {
    let mut fields = request.headers().get_all("authorization");
    let value = fields.next()?;
    if fields.next().is_some() {
        return None;
    }
    let value = value.trim_ascii();
    let split = value.iter().position(|b| *b == b' ' || *b == b'\t')?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn unauthorized(body: &str) -> Action {
    Action::respond(401)
        .set_header("www-authenticate", WWW_AUTHENTICATE)
        .set_header("content-type", "text/plain; charset=utf-8")
        .body(body)
}

impl Core {
    fn from_settings(settings: Settings) -> Result<Core, String> {
        if settings.token_file.trim().is_empty() {
            return Err("config.token_file: is empty; give the path of a file in grants.files".into());
        }
        if settings
            .client_tokens_file
            .as_deref()
            .is_some_and(|p| p.trim().is_empty())
        {
            return Err(
                "config.client_tokens_file: is empty; give the path of a file in grants.files, or leave the key out"
                    .into(),
            );
        }
        if settings.refresh_ms < MIN_REFRESH_MS {
            return Err(format!(
                "config.refresh_ms: {} is less than {MIN_REFRESH_MS} (milliseconds between reads of the token files)",
                settings.refresh_ms
            ));
        }
        let header = settings.header.to_ascii_lowercase();
        if !is_token(&header) {
            return Err(format!(
                "config.header: {:?} is not a valid HTTP header name",
                settings.header
            ));
        }
        if RESERVED_HEADERS.contains(&header.as_str()) || header.starts_with("proxy-") {
            return Err(format!(
                "config.header: {:?} is managed by wasmbassador (framing or hop-by-hop), so a plugin cannot set it",
                settings.header
            ));
        }
        if !settings.scheme.is_empty() && !is_token(&settings.scheme) {
            return Err(format!(
                "config.scheme: {:?} is not a valid auth scheme (one word such as \"Bearer\"; \"\" for the bare token)",
                settings.scheme
            ));
        }
        Ok(Core {
            header,
            scheme: settings.scheme,
            refresh: Duration::from_millis(settings.refresh_ms),
            token: Watched::new("token_file", settings.token_file, parse_token),
            clients: settings
                .client_tokens_file
                .map(|path| Watched::new("client_tokens_file", path, parse_client_tokens)),
        })
    }

    /// Reads the files that are due. At `init` both are.
    fn refresh(
        &mut self,
        now: Duration,
        read: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        if self.token.due(now, self.refresh) {
            events.push(self.token.reload(now, read));
        }
        if let Some(clients) = &mut self.clients
            && clients.due(now, self.refresh)
        {
            let mut event = clients.reload(now, read);
            if let Event::Changed { tokens, .. } = &mut event {
                *tokens = clients.good.as_ref().map(Vec::len);
            }
            events.push(event);
        }
        events
    }

    /// The answer to `request` with the values in hand.
    fn decide(&self, request: &Request) -> (Action, Outcome) {
        if let Some(clients) = &self.clients {
            let accepted = clients.good.as_deref().unwrap_or_default();
            let known = presented_token(request).is_some_and(|presented| {
                // Every accepted token is compared, so the time does not tell which
                // one came close.
                accepted
                    .iter()
                    .fold(false, |found, t| found | same_token(t, presented))
            });
            if !known {
                return (
                    unauthorized("missing or unknown bearer token\n"),
                    Outcome::RejectedClient,
                );
            }
        }
        let Some(token) = &self.token.good else {
            return (
                unauthorized("no upstream token available: the token file is missing, empty or unreadable\n"),
                Outcome::NoToken,
            );
        };
        let mut value = Vec::with_capacity(self.scheme.len() + 1 + token.len());
        if !self.scheme.is_empty() {
            value.extend_from_slice(self.scheme.as_bytes());
            value.push(b' ');
        }
        value.extend_from_slice(token);
        let mut action = Action::forward();
        if self.clients.is_some() && self.header != "authorization" {
            // The client's own token was for this proxy; it does not go upstream.
            action = action.remove_header("authorization");
        }
        (action.set_header(self.header.clone(), value), Outcome::Injected)
    }

    /// One request: re-read what is due, then decide.
    fn handle(
        &mut self,
        request: &Request,
        now: Duration,
        read: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
    ) -> (Action, Outcome, Vec<Event>) {
        let events = self.refresh(now, read);
        let (action, outcome) = self.decide(request);
        (action, outcome, events)
    }
}

impl BearerToken {
    fn report(&self, events: &[Event]) {
        for event in events {
            if let Some(m) = &self.metrics {
                m.reloads.inc(&[event.result()]);
            }
            if let Some((level, message)) = event.message() {
                log::log(level, message);
            }
        }
    }
}

impl Plugin for BearerToken {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let mut core = Core::from_settings(config.parse()?)?;
        self.metrics = Some(Metrics {
            requests: Counter::define(
                "bearer_token_requests_total",
                "Requests seen, by outcome (injected, rejected_client, no_token).",
                &["outcome"],
            )?,
            reloads: Counter::define(
                "bearer_token_reloads_total",
                "Reads of the token files, by result (changed, unchanged, failed).",
                &["result"],
            )?,
        });
        // A missing file is fine here (a Secret may be mounted after the pod starts):
        // it is logged, and read again on the next request once `refresh_ms` passed. A
        // path outside grants.files can never be read, though: that is a config error.
        let events = core.refresh(now(), &mut |path| read_granted_file(path));
        for event in &events {
            if let Event::Failed { key, reason, .. } = event
                && reason.contains("not granted")
            {
                return Err(format!("config.{key}: {reason}"));
            }
        }
        self.report(&events);
        self.core = Some(RefCell::new(core));
        Ok(())
    }

    fn on_request(&self, request: &Request) -> Action {
        let Some(core) = &self.core else {
            // Unreachable: the SDK calls hooks only after a successful `init`. Refusing
            // is the safe answer all the same.
            return unauthorized("wasmbassador: bearer-token is not configured\n");
        };
        let (action, outcome, events) = core
            .borrow_mut()
            .handle(request, now(), &mut |path| read_granted_file(path));
        self.report(&events);
        if let Some(m) = &self.metrics {
            m.requests.inc(&[outcome.as_str()]);
        }
        action
    }
}

export_plugin!(BearerToken::default());

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use wasmbassador_sdk::http::HeaderEdit;

    use super::*;

    /// Granted files for tests: path to content, or to a read error.
    #[derive(Default)]
    struct Files(BTreeMap<String, Result<Vec<u8>, String>>);

    impl Files {
        fn put(&mut self, path: &str, content: &str) {
            self.0.insert(path.into(), Ok(content.as_bytes().to_vec()));
        }

        fn remove(&mut self, path: &str) {
            self.0.remove(path);
        }

        fn reader(&self) -> impl FnMut(&str) -> Result<Vec<u8>, String> + '_ {
            |path| {
                self.0
                    .get(path)
                    .cloned()
                    .unwrap_or_else(|| Err(format!("{path}: No such file or directory (os error 2)")))
            }
        }
    }

    fn core(json: &str) -> Result<Core, String> {
        Core::from_settings(Config::new(json).parse()?)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn run(c: &mut Core, files: &Files, at: Duration, request: &Request) -> (Action, Outcome, Vec<Event>) {
        c.handle(request, at, &mut files.reader())
    }

    fn get() -> Request {
        Request::new("GET", "/v1/items")
    }

    fn set(name: &str, value: &str) -> HeaderEdit {
        HeaderEdit::set(name, value)
    }

    fn forwarded(action: &Action) -> &[HeaderEdit] {
        match action {
            Action::Forward {
                headers,
                route,
                retryable,
            } => {
                assert_eq!(route, &None);
                assert!(!retryable);
                headers
            }
            other => panic!("expected forward, got {other:?}"),
        }
    }

    fn refused(action: &Action) -> (u16, String) {
        match action {
            Action::Respond {
                status,
                headers,
                body,
            } => {
                assert_eq!(
                    headers
                        .iter()
                        .find(|(n, _)| n == "www-authenticate")
                        .map(|(_, v)| v.as_slice()),
                    Some(&b"Bearer realm=\"wasmbassador\""[..])
                );
                (*status, String::from_utf8_lossy(body).into_owned())
            }
            other => panic!("expected a local answer, got {other:?}"),
        }
    }

    #[test]
    fn injects_the_token_and_replaces_the_apps() {
        let mut files = Files::default();
        files.put("/run/secrets/token", "  s3cr3t-upstream\n");
        let mut c = core(r#"{"token_file":"/run/secrets/token"}"#).expect("valid");
        let (action, outcome, events) = run(
            &mut c,
            &files,
            ms(0),
            &get().header("authorization", "Bearer app-own"),
        );
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(
            forwarded(&action),
            [set("authorization", "Bearer s3cr3t-upstream")]
        );
        assert_eq!(
            events,
            [Event::Changed {
                key: "token_file",
                path: "/run/secrets/token".into(),
                first: true,
                tokens: None
            }]
        );
        assert_eq!(events[0].result(), "changed");
    }

    #[test]
    fn rereads_after_refresh_and_keeps_the_last_good_token() {
        let mut files = Files::default();
        files.put("/t", "one");
        let mut c = core(r#"{"token_file":"/t","refresh_ms":100}"#).expect("valid");
        let injected = |c: &mut Core, files: &Files, at| {
            let (action, outcome, events) = run(c, files, at, &get());
            assert_eq!(outcome, Outcome::Injected);
            let value = match forwarded(&action) {
                [HeaderEdit::Set(_, v)] => String::from_utf8_lossy(v).into_owned(),
                other => panic!("{other:?}"),
            };
            (value, events.iter().map(Event::result).collect::<Vec<_>>())
        };
        assert_eq!(
            injected(&mut c, &files, ms(1000)),
            ("Bearer one".into(), vec!["changed"])
        );

        files.put("/t", "two\n");
        assert_eq!(
            injected(&mut c, &files, ms(1099)),
            ("Bearer one".into(), vec![]),
            "not due yet"
        );
        assert_eq!(
            injected(&mut c, &files, ms(1100)),
            ("Bearer two".into(), vec!["changed"])
        );
        assert_eq!(
            injected(&mut c, &files, ms(1250)),
            ("Bearer two".into(), vec!["unchanged"])
        );

        // Rotation gone wrong: missing, then empty. The last good token stays, and there
        // is one failed read (and one warning) per refresh, not one per request.
        files.remove("/t");
        assert_eq!(
            injected(&mut c, &files, ms(1400)),
            ("Bearer two".into(), vec!["failed"])
        );
        assert_eq!(injected(&mut c, &files, ms(1401)), ("Bearer two".into(), vec![]));
        assert_eq!(injected(&mut c, &files, ms(1499)), ("Bearer two".into(), vec![]));
        files.put("/t", " \n");
        let (_, _, events) = run(&mut c, &files, ms(1500), &get());
        assert_eq!(
            events,
            [Event::Failed {
                key: "token_file",
                reason: "\"/t\": the file is empty".into(),
                have_last: true
            }]
        );
        assert_eq!(
            events[0].message(),
            Some((
                Level::Warn,
                "config.token_file: \"/t\": the file is empty; keeping the last good value".into()
            ))
        );
        files.put("/t", "three");
        assert_eq!(
            injected(&mut c, &files, ms(1600)),
            ("Bearer three".into(), vec!["changed"])
        );
    }

    #[test]
    fn without_any_good_token_answers_401() {
        let mut files = Files::default();
        let mut c = core(r#"{"token_file":"/t","refresh_ms":10}"#).expect("valid");
        let (action, outcome, events) = run(&mut c, &files, ms(0), &get());
        assert_eq!(outcome, Outcome::NoToken);
        assert_eq!(
            refused(&action),
            (
                401,
                "no upstream token available: the token file is missing, empty or unreadable\n".into()
            )
        );
        assert_eq!(
            events[0].message(),
            Some((
                Level::Warn,
                "config.token_file: /t: No such file or directory (os error 2); no upstream token yet: requests are answered 401"
                    .into()
            ))
        );
        // The Secret is mounted late: picked up on the next read.
        files.put("/t", "late");
        let (_, outcome, _) = run(&mut c, &files, ms(5), &get());
        assert_eq!(outcome, Outcome::NoToken, "not due before refresh_ms");
        let (action, outcome, _) = run(&mut c, &files, ms(10), &get());
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(forwarded(&action), [set("authorization", "Bearer late")]);
    }

    #[test]
    fn a_multi_line_token_file_is_refused() {
        let mut files = Files::default();
        files.put("/t", "abc\ndef\n");
        let mut c = core(r#"{"token_file":"/t"}"#).expect("valid");
        let (_, outcome, events) = run(&mut c, &files, ms(0), &get());
        assert_eq!(outcome, Outcome::NoToken);
        assert_eq!(
            events,
            [Event::Failed {
                key: "token_file",
                reason: "\"/t\": the token holds a line break or another control character, which a header value cannot"
                    .into(),
                have_last: false
            }]
        );
    }

    #[test]
    fn other_header_and_bare_token() {
        let mut files = Files::default();
        files.put("/k", "key-123");
        let mut c = core(r#"{"token_file":"/k","header":"X-API-Key","scheme":""}"#).expect("valid");
        let (action, _, _) = run(&mut c, &files, ms(0), &get().header("authorization", "Basic abc"));
        assert_eq!(
            forwarded(&action),
            [set("x-api-key", "key-123")],
            "without client tokens the app's authorization is not ours to touch"
        );

        let mut c = core(r#"{"token_file":"/k","scheme":"Token"}"#).expect("valid");
        let (action, _, _) = run(&mut c, &files, ms(0), &get());
        assert_eq!(forwarded(&action), [set("authorization", "Token key-123")]);
    }

    #[test]
    fn client_tokens_are_checked_before_injecting() {
        let mut files = Files::default();
        files.put("/t", "upstream");
        files.put("/clients", "# team a\nclient-a\n\n  client-b  \r\n#client-c\n");
        let mut c = core(r#"{"token_file":"/t","client_tokens_file":"/clients"}"#).expect("valid");
        let (_, _, events) = run(&mut c, &files, ms(0), &get());
        assert_eq!(
            events[1].message(),
            Some((
                Level::Info,
                "config.client_tokens_file: loaded \"/clients\" (2 tokens)".into()
            ))
        );
        let with = |c: &mut Core, value: &str| {
            let (action, outcome, _) = run(c, &files, ms(1), &get().header("Authorization", value));
            (action, outcome)
        };

        for ok in ["Bearer client-a", "bearer client-b", "BEARER   client-a "] {
            let (action, outcome) = with(&mut c, ok);
            assert_eq!(outcome, Outcome::Injected, "{ok}");
            assert_eq!(forwarded(&action), [set("authorization", "Bearer upstream")]);
        }
        for bad in [
            "Bearer client-c",
            "Bearer client-",
            "Bearer client-aa",
            "Bearer # team a",
            "Bearer",
            "Bearer ",
            "Basic client-a",
            "client-a",
            "Bearer upstream",
        ] {
            let (action, outcome) = with(&mut c, bad);
            assert_eq!(outcome, Outcome::RejectedClient, "{bad}");
            assert_eq!(
                refused(&action),
                (401, "missing or unknown bearer token\n".into())
            );
        }
        let (action, outcome, _) = run(&mut c, &files, ms(1), &get());
        assert_eq!(outcome, Outcome::RejectedClient, "no authorization at all");
        assert_eq!(refused(&action).0, 401);
        let (_, outcome, _) = run(
            &mut c,
            &files,
            ms(1),
            &get()
                .header("authorization", "Bearer client-a")
                .header("authorization", "Bearer client-b"),
        );
        assert_eq!(
            outcome,
            Outcome::RejectedClient,
            "two authorization fields are ambiguous"
        );

        // A revoked client is refused once the file has been read again.
        files.put("/clients", "client-b\n");
        let (_, outcome, events) = run(
            &mut c,
            &files,
            ms(1000),
            &get().header("authorization", "Bearer client-a"),
        );
        assert_eq!(outcome, Outcome::RejectedClient);
        assert_eq!(
            events.iter().map(Event::result).collect::<Vec<_>>(),
            ["unchanged", "changed"]
        );
    }

    #[test]
    fn client_token_goes_away_when_injecting_elsewhere() {
        let mut files = Files::default();
        files.put("/t", "upstream");
        files.put("/c", "client-a");
        let mut c = core(r#"{"token_file":"/t","client_tokens_file":"/c","header":"x-api-key","scheme":""}"#)
            .expect("valid");
        let (action, _, _) = run(
            &mut c,
            &files,
            ms(0),
            &get().header("authorization", "Bearer client-a"),
        );
        assert_eq!(
            forwarded(&action),
            [HeaderEdit::remove("authorization"), set("x-api-key", "upstream")]
        );
    }

    #[test]
    fn client_check_comes_before_the_upstream_token() {
        let mut files = Files::default();
        files.put("/c", "client-a");
        let mut c = core(r#"{"token_file":"/t","client_tokens_file":"/c"}"#).expect("valid");
        let (_, outcome, _) = run(&mut c, &files, ms(0), &get());
        assert_eq!(outcome, Outcome::RejectedClient);
        let (action, outcome, _) = run(
            &mut c,
            &files,
            ms(0),
            &get().header("authorization", "Bearer client-a"),
        );
        assert_eq!(outcome, Outcome::NoToken);
        assert_eq!(refused(&action).0, 401);
    }

    #[test]
    fn client_file_problems() {
        let mut files = Files::default();
        files.put("/t", "upstream");
        files.put("/c", "# nobody yet\n");
        let mut c = core(r#"{"token_file":"/t","client_tokens_file":"/c"}"#).expect("valid");
        let (_, outcome, events) = run(&mut c, &files, ms(0), &get().header("authorization", "Bearer x"));
        assert_eq!(outcome, Outcome::RejectedClient);
        assert_eq!(
            events[1].message(),
            Some((
                Level::Warn,
                "config.client_tokens_file: loaded \"/c\": it holds no token, so every request is answered 401".into()
            ))
        );

        files.remove("/c");
        let mut c = core(r#"{"token_file":"/t","client_tokens_file":"/c"}"#).expect("valid");
        let (_, outcome, events) = run(&mut c, &files, ms(0), &get().header("authorization", "Bearer x"));
        assert_eq!(outcome, Outcome::RejectedClient);
        assert_eq!(
            events[1].message(),
            Some((
                Level::Warn,
                "config.client_tokens_file: /c: No such file or directory (os error 2); no client tokens yet: requests are answered 401"
                    .into()
            ))
        );
    }

    #[test]
    fn no_message_holds_a_token() {
        let mut files = Files::default();
        files.put("/t", "TOPSECRET");
        files.put("/c", "CLIENTSECRET");
        let mut c = core(r#"{"token_file":"/t","client_tokens_file":"/c","refresh_ms":10}"#).expect("valid");
        let mut texts = Vec::new();
        for (i, content) in ["TOPSECRET", "TOPSECRET2", "TOP SECRET\nX", ""]
            .iter()
            .enumerate()
        {
            files.put("/t", content);
            files.put("/c", &format!("CLIENTSECRET{i}"));
            for request in [get(), get().header("authorization", "Bearer CLIENTSECRET")] {
                let (action, _, events) = run(&mut c, &files, ms(10 * i as u64), &request);
                texts.extend(events.iter().filter_map(Event::message).map(|(_, m)| m));
                if let Action::Respond { body, .. } = action {
                    texts.push(String::from_utf8_lossy(&body).into_owned());
                }
            }
        }
        assert!(texts.len() >= 8, "{texts:?}");
        for text in &texts {
            assert!(!text.contains("SECRET"), "{text}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
        assert!(same_token(b"", b""));
    }

    #[test]
    fn bad_config_names_the_key() {
        let err = |json: &str| core(json).err().expect("invalid");
        assert_eq!(err("{}"), "config: missing field `token_file`");
        assert_eq!(
            err(r#"{"token_file":""}"#),
            "config.token_file: is empty; give the path of a file in grants.files"
        );
        assert_eq!(
            err(r#"{"token_file":"/t","client_tokens_file":" "}"#),
            "config.client_tokens_file: is empty; give the path of a file in grants.files, or leave the key out"
        );
        assert_eq!(
            err(r#"{"token_file":"/t","refresh_ms":9}"#),
            "config.refresh_ms: 9 is less than 10 (milliseconds between reads of the token files)"
        );
        assert_eq!(
            err(r#"{"token_file":"/t","refresh_ms":-1}"#),
            "config.refresh_ms: invalid value: integer `-1`, expected u64"
        );
        assert_eq!(
            err(r#"{"token_file":"/t","header":"x api key"}"#),
            r#"config.header: "x api key" is not a valid HTTP header name"#
        );
        assert_eq!(
            err(r#"{"token_file":"/t","header":"Proxy-Authorization"}"#),
            r#"config.header: "Proxy-Authorization" is managed by wasmbassador (framing or hop-by-hop), so a plugin cannot set it"#
        );
        assert_eq!(
            err(r#"{"token_file":"/t","header":"host"}"#),
            r#"config.header: "host" is managed by wasmbassador (framing or hop-by-hop), so a plugin cannot set it"#
        );
        assert_eq!(
            err(r#"{"token_file":"/t","scheme":"Bearer realm"}"#),
            r#"config.scheme: "Bearer realm" is not a valid auth scheme (one word such as "Bearer"; "" for the bare token)"#
        );
        assert_eq!(
            err(r#"{"token_file":"/t","token":"x"}"#),
            "config.token: unknown field `token`, expected one of `token_file`, `client_tokens_file`, `refresh_ms`, `header`, `scheme`"
        );
        let c = core(r#"{"token_file":"/t"}"#).expect("valid");
        assert_eq!(
            (c.header.as_str(), c.scheme.as_str(), c.refresh),
            ("authorization", "Bearer", ms(1000))
        );
    }
}
