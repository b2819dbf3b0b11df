//! `http-metrics`: an observability plugin for `http` listeners. For every response on
//! its way to the application it counts the request, counts it again as an error when
//! it is one, and observes how long the response head took:
//!
//! - `http_requests_total{listener, route, method, status_class}`;
//! - `http_request_errors_total{listener, route, kind}`, `kind` being `upstream_5xx`,
//!   `host`, `local_4xx` or `local_5xx`;
//! - `http_request_duration_seconds{listener, route, status_class}`, a histogram.
//!
//! (The host exposes them with the `wasmbassador_plugin_` prefix and a leading `plugin`
//! label.) Every label comes from a small set: listener names and route names from the
//! config, methods folded to eight values, five status classes. Paths themselves never
//! become labels.
//!
//! Config (all optional):
//! - `routes`: a list of `{ name, prefix }`; a request's path (without the query) gets
//!   the name of the longest matching prefix, otherwise `other`;
//! - `buckets`: histogram bucket upper bounds in seconds, strictly increasing.
//!
//! Only `on_response` is implemented: `on_request` stays at its default, which the host
//! then stops calling.
#![forbid(unsafe_code)]

use serde::Deserialize;
use wasmbassador_sdk::http::Source;
use wasmbassador_sdk::prelude::*;

/// Bucket upper bounds (seconds) when `buckets` is left out: 1 ms to 10 s, which covers
/// a cached answer as well as a slow report.
const DEFAULT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The route of a path that no configured prefix matches.
const OTHER: &str = "other";

#[derive(Default)]
struct HttpMetrics {
    /// Sorted by prefix length, longest first, so the first match is the longest.
    routes: Vec<RouteRule>,
    buckets: Vec<f64>,
    /// `None` until `init` declared them (and in unit tests, which have no host).
    metrics: Option<Metrics>,
}

struct Metrics {
    requests: Counter,
    errors: Counter,
    duration: Histogram,
}

#[derive(Debug)]
struct RouteRule {
    name: String,
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    routes: Vec<RouteSettings>,
    buckets: Option<Vec<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSettings {
    name: String,
    prefix: String,
}

/// What one response adds to the metrics; computed without the host, so that unit
/// tests can check it.
#[derive(Debug, PartialEq)]
struct Observation<'a> {
    listener: &'a str,
    route: &'a str,
    method: &'static str,
    status_class: &'static str,
    error: Option<&'static str>,
    seconds: f64,
}

fn valid_route_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl HttpMetrics {
    fn from_settings(settings: Settings) -> Result<HttpMetrics, String> {
        let mut routes: Vec<RouteRule> = Vec::with_capacity(settings.routes.len());
        for (i, r) in settings.routes.into_iter().enumerate() {
            let key = format!("config.routes[{i}]");
            if !valid_route_name(&r.name) {
                return Err(format!(
                    "{key}.name: {:?} must match [a-zA-Z0-9_.-]+ (it becomes a metric label)",
                    r.name
                ));
            }
            if !r.prefix.starts_with('/') {
                return Err(format!(
                    "{key}.prefix: {:?} must start with \"/\" (it is matched against the request path)",
                    r.prefix
                ));
            }
            if let Some(j) = routes.iter().position(|other| other.prefix == r.prefix) {
                return Err(format!(
                    "{key}.prefix: {:?} is already the prefix of config.routes[{j}]",
                    r.prefix
                ));
            }
            routes.push(RouteRule {
                name: r.name,
                prefix: r.prefix,
            });
        }
        // Stable: equal lengths keep config order (they cannot both match anyway,
        // being different strings of the same length).
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        let buckets = match settings.buckets {
            None => DEFAULT_BUCKETS.to_vec(),
            Some(buckets) => {
                check_buckets(&buckets)?;
                buckets
            }
        };
        Ok(HttpMetrics {
            routes,
            buckets,
            metrics: None,
        })
    }

    /// The name of the longest configured prefix of `path`, or `other`.
    fn route(&self, path: &str) -> &str {
        self.routes
            .iter()
            .find(|r| path.starts_with(&r.prefix))
            .map_or(OTHER, |r| r.name.as_str())
    }

    fn observe<'a>(&'a self, r: &'a Response) -> Observation<'a> {
        Observation {
            listener: r.listener(),
            route: self.route(r.path_only()),
            method: fold_method(r.method()),
            status_class: r.status_class(),
            error: error_kind(r),
            seconds: r.duration().as_secs_f64(),
        }
    }
}

fn check_buckets(buckets: &[f64]) -> Result<(), String> {
    if buckets.is_empty() {
        return Err("config.buckets: is empty; leave it out for the defaults (1ms to 10s)".into());
    }
    for (i, b) in buckets.iter().enumerate() {
        if !b.is_finite() || *b <= 0.0 {
            return Err(format!(
                "config.buckets[{i}]: {b} is not a positive number of seconds"
            ));
        }
        if i > 0 && *b <= buckets[i - 1] {
            return Err(format!(
                "config.buckets[{i}]: {b} is not more than the bucket before it ({}); buckets must be strictly increasing",
                buckets[i - 1]
            ));
        }
    }
    Ok(())
}

/// The common methods as they are, everything else (WebDAV, typos, garbage) as `other`,
/// so that a client cannot create series at will. Methods are case-sensitive in HTTP:
/// `get` is not `GET`.
fn fold_method(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Which kind of error a response is, if any: an upstream's 5xx, any answer the host
/// made itself (it only does so when something failed: an unreachable upstream, a
/// timeout, a failed plugin), or a plugin's local 4xx/5xx (a refused token, say). An
/// upstream's 4xx is the application's business, not an error of the path.
fn error_kind(r: &Response) -> Option<&'static str> {
    match r.source() {
        Source::Upstream if r.status() >= 500 => Some("upstream_5xx"),
        Source::Upstream => None,
        Source::Host => Some("host"),
        Source::Plugin if r.status() >= 500 => Some("local_5xx"),
        Source::Plugin if r.status() >= 400 => Some("local_4xx"),
        Source::Plugin => None,
    }
}

impl Plugin for HttpMetrics {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        *self = HttpMetrics::from_settings(config.parse()?)?;
        self.metrics = Some(Metrics {
            requests: Counter::define(
                "http_requests_total",
                "HTTP requests answered, by listener, route, method and status class.",
                &["listener", "route", "method", "status_class"],
            )?,
            errors: Counter::define(
                "http_request_errors_total",
                "HTTP requests that failed, by listener, route and kind (upstream_5xx, host, local_4xx, local_5xx).",
                &["listener", "route", "kind"],
            )?,
            duration: Histogram::define(
                "http_request_duration_seconds",
                "Time from the request head's arrival to the response head, in seconds.",
                &["listener", "route", "status_class"],
                &self.buckets,
            )?,
        });
        Ok(())
    }

    fn on_response(&self, response: &Response) -> Vec<HeaderEdit> {
        let o = self.observe(response);
        if let Some(m) = &self.metrics {
            m.requests.inc(&[o.listener, o.route, o.method, o.status_class]);
            if let Some(kind) = o.error {
                m.errors.inc(&[o.listener, o.route, kind]);
            }
            m.duration
                .observe(&[o.listener, o.route, o.status_class], o.seconds);
        }
        Vec::new()
    }
}

export_plugin!(HttpMetrics::default());

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn plugin(json: &str) -> Result<HttpMetrics, String> {
        HttpMetrics::from_settings(Config::new(json).parse()?)
    }

    const ROUTES: &str = r#"{"routes":[
        {"name":"api","prefix":"/v1/"},
        {"name":"items","prefix":"/v1/items"},
        {"name":"item-detail.v2","prefix":"/v1/items/detail"}
    ]}"#;

    #[test]
    fn longest_prefix_wins_and_the_rest_is_other() {
        let p = plugin(ROUTES).expect("valid");
        assert_eq!(p.route("/v1/items"), "items");
        assert_eq!(p.route("/v1/items/42"), "items");
        assert_eq!(p.route("/v1/items/detail/42"), "item-detail.v2");
        assert_eq!(p.route("/v1/orders"), "api");
        assert_eq!(p.route("/v1"), "other");
        assert_eq!(p.route("/health"), "other");
        assert_eq!(p.route("*"), "other");
        // The query is not part of the match.
        let r = Response::new(200, Duration::from_millis(5)).for_request("GET", "/v1/items?x=/v1/");
        assert_eq!(p.observe(&r).route, "items");
        let r = Response::new(200, Duration::from_millis(5)).for_request("GET", "/x?/v1/items");
        assert_eq!(p.observe(&r).route, "other");
    }

    #[test]
    fn no_routes_is_all_other() {
        let p = plugin("{}").expect("valid");
        assert_eq!(p.route("/v1/items"), "other");
        assert_eq!(p.buckets, DEFAULT_BUCKETS);
    }

    #[test]
    fn observation_of_an_upstream_answer() {
        let p = plugin(ROUTES).expect("valid");
        let r = Response::new(201, Duration::from_micros(12_500)).for_request("POST", "/v1/items");
        assert_eq!(
            p.observe(&r),
            Observation {
                listener: "api",
                route: "items",
                method: "POST",
                status_class: "2xx",
                error: None,
                seconds: 0.0125,
            }
        );
        assert!(p.on_response(&r).is_empty(), "no header edits");
    }

    #[test]
    fn methods_are_folded() {
        for (sent, label) in [
            ("GET", "GET"),
            ("HEAD", "HEAD"),
            ("POST", "POST"),
            ("PUT", "PUT"),
            ("DELETE", "DELETE"),
            ("PATCH", "PATCH"),
            ("OPTIONS", "OPTIONS"),
            ("get", "other"),
            ("PROPFIND", "other"),
            ("CONNECT", "other"),
            ("TRACE", "other"),
            ("", "other"),
        ] {
            assert_eq!(fold_method(sent), label, "{sent:?}");
        }
    }

    #[test]
    fn errors_by_source_and_status() {
        let p = plugin("{}").expect("valid");
        let kind = |status: u16, source: Source| {
            let r = Response::new(status, Duration::ZERO).from_source(source);
            let o = p.observe(&r);
            assert_eq!(o.status_class, r.status_class());
            o.error
        };
        assert_eq!(kind(200, Source::Upstream), None);
        assert_eq!(
            kind(404, Source::Upstream),
            None,
            "the app's own 4xx is not an error here"
        );
        assert_eq!(kind(500, Source::Upstream), Some("upstream_5xx"));
        assert_eq!(kind(503, Source::Upstream), Some("upstream_5xx"));
        assert_eq!(kind(502, Source::Host), Some("host"));
        assert_eq!(kind(504, Source::Host), Some("host"));
        assert_eq!(kind(503, Source::Host), Some("host"));
        assert_eq!(kind(200, Source::Plugin), None);
        assert_eq!(kind(302, Source::Plugin), None);
        assert_eq!(kind(401, Source::Plugin), Some("local_4xx"));
        assert_eq!(kind(429, Source::Plugin), Some("local_4xx"));
        assert_eq!(kind(503, Source::Plugin), Some("local_5xx"));
    }

    #[test]
    fn buckets_are_checked() {
        let p = plugin(r#"{"buckets":[0.01, 0.1, 1]}"#).expect("integers are numbers too");
        assert_eq!(p.buckets, [0.01, 0.1, 1.0]);

        let err = |json: &str| plugin(json).err().expect("invalid");
        assert_eq!(
            err(r#"{"buckets":[]}"#),
            "config.buckets: is empty; leave it out for the defaults (1ms to 10s)"
        );
        assert_eq!(
            err(r#"{"buckets":[0.1, 0.1]}"#),
            "config.buckets[1]: 0.1 is not more than the bucket before it (0.1); buckets must be strictly increasing"
        );
        assert_eq!(
            err(r#"{"buckets":[0.5, 0.25]}"#),
            "config.buckets[1]: 0.25 is not more than the bucket before it (0.5); buckets must be strictly increasing"
        );
        assert_eq!(
            err(r#"{"buckets":[0, 1]}"#),
            "config.buckets[0]: 0 is not a positive number of seconds"
        );
        assert_eq!(
            err(r#"{"buckets":["1s"]}"#),
            r#"config.buckets[0]: invalid type: string "1s", expected f64"#
        );
    }

    #[test]
    fn bad_routes_name_the_entry() {
        let err = |json: &str| plugin(json).err().expect("invalid");
        assert_eq!(
            err(r#"{"routes":[{"name":"items list","prefix":"/v1/items"}]}"#),
            r#"config.routes[0].name: "items list" must match [a-zA-Z0-9_.-]+ (it becomes a metric label)"#
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"","prefix":"/"}]}"#),
            r#"config.routes[0].name: "" must match [a-zA-Z0-9_.-]+ (it becomes a metric label)"#
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"items","prefix":"v1/items"}]}"#),
            r#"config.routes[0].prefix: "v1/items" must start with "/" (it is matched against the request path)"#
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","prefix":"/a"},{"name":"b","prefix":"/a"}]}"#),
            r#"config.routes[1].prefix: "/a" is already the prefix of config.routes[0]"#
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a"}]}"#),
            "config.routes[0]: missing field `prefix`"
        );
        assert_eq!(
            err(r#"{"route":[]}"#),
            "config.route: unknown field `route`, expected `routes` or `buckets`"
        );
    }
}
