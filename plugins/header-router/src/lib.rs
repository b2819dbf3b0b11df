//! `header-router`: a routing plugin for `http` listeners. It sends each request to an
//! upstream, or to the endpoints with a tag, chosen by a request header; requests that
//! no rule matches may be split between targets by weight (a canary, say).
//!
//! Config:
//! - `rules` (list, optional): tried in order, the first match wins. Each has `header`
//!   (a field name, matched ignoring case), exactly one matcher — `equals = "..."`,
//!   `prefix = "..."` or `present = true` — and `route = { upstream = "..." }` or
//!   `route = { tag = "..." }`.
//! - `split` (table, optional): for requests that no rule matched, `targets` (a list of
//!   `{ route, weight }`, weights 0 to 10000 adding up to more than 0) and an optional
//!   `sticky_header`: requests with the same value of that header go to the same target.
//!
//! At least one of the two must be given. Without a match and without a split the
//! request goes on unchanged (to the listener's upstream, or wherever an earlier plugin
//! routed it).
//!
//! Metric: `header_router_routed_total{target}`, `target` being `upstream:NAME`,
//! `tag:NAME` or `default` — values from the config only, so the set stays small.
#![forbid(unsafe_code)]

use std::cell::RefCell;

use serde::Deserialize;
use wasmbassador_sdk::prelude::*;

/// The largest weight of a split target: enough for 0.01% steps, small enough that the
/// sums never come near an overflow.
const MAX_WEIGHT: u32 = 10_000;

#[derive(Default)]
struct HeaderRouter {
    rules: Vec<Rule>,
    split: Option<Split>,
    /// `None` until `init` declared it (and in unit tests, which have no host).
    routed: Option<Counter>,
}

/// A route and its metric label, built once at `init` so that no request formats it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    route: Route,
    label: String,
}

struct Rule {
    /// Lowercase, as the host passes field names.
    header: String,
    matcher: Matcher,
    target: Target,
}

enum Matcher {
    Equals(Vec<u8>),
    Prefix(Vec<u8>),
    Present,
}

struct Split {
    sticky_header: Option<String>,
    /// Targets with their weights, in config order; zero weights included (they are
    /// never chosen, but keep their place so that a config edit is easy to read).
    targets: Vec<(Target, u32)>,
    total: u64,
    /// The running weights of smooth weighted round-robin, one per target. Per instance:
    /// the host keeps one instance per worker, each spreading its own share.
    current: RefCell<Vec<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    rules: Vec<RuleSettings>,
    split: Option<SplitSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSettings {
    header: String,
    equals: Option<String>,
    prefix: Option<String>,
    present: Option<bool>,
    route: RouteSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSettings {
    upstream: Option<String>,
    tag: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitSettings {
    sticky_header: Option<String>,
    targets: Vec<TargetSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSettings {
    route: RouteSettings,
    weight: u32,
}

/// Whether `name` is a valid HTTP field name (RFC 9110 `token`). Checked at `init` so a
/// typo is an error there rather than a rule that silently never matches.
fn valid_field_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn field_name(name: &str, key: &str) -> Result<String, String> {
    if valid_field_name(name) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!("{key}: {name:?} is not a valid HTTP header name"))
    }
}

fn target(settings: RouteSettings, key: &str) -> Result<Target, String> {
    let (route, label) = match (settings.upstream, settings.tag) {
        (Some(upstream), None) => {
            if upstream.trim().is_empty() {
                return Err(format!("{key}.upstream: is empty"));
            }
            let label = format!("upstream:{upstream}");
            (Route::Upstream(upstream), label)
        }
        (None, Some(tag)) => {
            if tag.trim().is_empty() {
                return Err(format!("{key}.tag: is empty"));
            }
            let label = format!("tag:{tag}");
            (Route::Tag(tag), label)
        }
        _ => {
            return Err(format!(
                "{key}: give exactly one of `upstream` or `tag` (route = {{ upstream = \"NAME\" }} or route = {{ tag = \"NAME\" }})"
            ));
        }
    };
    Ok(Target { route, label })
}

impl HeaderRouter {
    fn from_settings(settings: Settings) -> Result<HeaderRouter, String> {
        if settings.rules.is_empty() && settings.split.is_none() {
            return Err(
                "config: give `rules`, a `split`, or both; without either the plugin routes nothing".into(),
            );
        }
        let mut rules = Vec::with_capacity(settings.rules.len());
        for (i, rule) in settings.rules.into_iter().enumerate() {
            let key = format!("config.rules[{i}]");
            let header = field_name(&rule.header, &format!("{key}.header"))?;
            let matcher = match (rule.equals, rule.prefix, rule.present) {
                (Some(value), None, None) => Matcher::Equals(value.into_bytes()),
                (None, Some(value), None) => Matcher::Prefix(value.into_bytes()),
                (None, None, Some(true)) => Matcher::Present,
                (None, None, Some(false)) => {
                    return Err(format!(
                        "{key}.present: only `present = true` is a matcher (a rule for a missing header cannot route by it)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "{key}: give exactly one matcher: `equals = \"...\"`, `prefix = \"...\"` or `present = true`"
                    ));
                }
            };
            let target = target(rule.route, &format!("{key}.route"))?;
            rules.push(Rule {
                header,
                matcher,
                target,
            });
        }
        let split = settings.split.map(Split::from_settings).transpose()?;
        Ok(HeaderRouter {
            rules,
            split,
            routed: None,
        })
    }

    /// Where `request` goes: the first matching rule's target, else the split's choice,
    /// else `None` (unchanged).
    fn choose(&self, request: &Request) -> Option<&Target> {
        self.rules
            .iter()
            .find(|rule| rule.matches(request))
            .map(|rule| &rule.target)
            .or_else(|| self.split.as_ref().map(|split| split.choose(request)))
    }
}

impl Rule {
    /// Matches when any field of the rule's name matches (a header sent twice is seen
    /// twice).
    fn matches(&self, request: &Request) -> bool {
        let mut values = request.headers().get_all(&self.header);
        match &self.matcher {
            Matcher::Equals(want) => values.any(|v| v == want.as_slice()),
            Matcher::Prefix(want) => values.any(|v| v.starts_with(want)),
            Matcher::Present => values.next().is_some(),
        }
    }
}

impl Split {
    fn from_settings(settings: SplitSettings) -> Result<Split, String> {
        let sticky_header = settings
            .sticky_header
            .map(|name| field_name(&name, "config.split.sticky_header"))
            .transpose()?;
        let mut targets = Vec::with_capacity(settings.targets.len());
        let mut total = 0u64;
        for (i, t) in settings.targets.into_iter().enumerate() {
            let key = format!("config.split.targets[{i}]");
            if t.weight > MAX_WEIGHT {
                return Err(format!("{key}.weight: {} is more than {MAX_WEIGHT}", t.weight));
            }
            total += u64::from(t.weight);
            targets.push((target(t.route, &format!("{key}.route"))?, t.weight));
        }
        if total == 0 {
            return Err(
                "config.split.targets: the weights add up to 0; give at least one target a positive weight"
                    .into(),
            );
        }
        let current = RefCell::new(vec![0; targets.len()]);
        Ok(Split {
            sticky_header,
            targets,
            total,
            current,
        })
    }

    fn choose(&self, request: &Request) -> &Target {
        let sticky = self
            .sticky_header
            .as_deref()
            .and_then(|name| request.headers().get_bytes(name));
        let index = match sticky {
            Some(value) => self.by_hash(fnv1a_64(value)),
            None => self.next_round_robin(),
        };
        &self.targets[index].0
    }

    /// The target whose share of `0..total` holds `hash % total`: the same value always
    /// lands on the same target while the weights stay the same.
    fn by_hash(&self, hash: u64) -> usize {
        let mut point = hash % self.total;
        for (i, (_, weight)) in self.targets.iter().enumerate() {
            let weight = u64::from(*weight);
            if point < weight {
                return i;
            }
            point -= weight;
        }
        // Unreachable while `total` is the sum of the weights; the last positive target
        // is still a valid answer.
        self.last_positive()
    }

    /// Smooth weighted round-robin (as in nginx): every pick adds each weight to its
    /// running value, takes the largest (the first on a tie) and takes `total` off it.
    /// Over `total` picks each target is chosen exactly `weight` times, interleaved
    /// rather than in runs — deterministic, since a plugin has no randomness.
    fn next_round_robin(&self) -> usize {
        let mut current = self.current.borrow_mut();
        let mut best: Option<usize> = None;
        for (i, (_, weight)) in self.targets.iter().enumerate() {
            if *weight == 0 {
                continue;
            }
            current[i] += i64::from(*weight);
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best.unwrap_or_else(|| self.last_positive());
        current[best] -= self.total as i64;
        best
    }

    fn last_positive(&self) -> usize {
        self.targets
            .iter()
            .rposition(|(_, weight)| *weight > 0)
            .unwrap_or(0)
    }
}

/// FNV-1a, 64 bits: tiny, fixed (the same on every instance and host), and good enough
/// to spread header values such as user ids.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

impl Plugin for HeaderRouter {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        *self = HeaderRouter::from_settings(config.parse()?)?;
        self.routed = Some(Counter::define(
            "header_router_routed_total",
            "Requests routed, by target (upstream:NAME, tag:NAME, or default when unchanged).",
            &["target"],
        )?);
        Ok(())
    }

    fn on_request(&self, request: &Request) -> Action {
        let target = self.choose(request);
        if let Some(counter) = &self.routed {
            counter.inc(&[target.map_or("default", |t| t.label.as_str())]);
        }
        match target {
            Some(t) => Action::forward().route(t.route.clone()),
            None => Action::forward(),
        }
    }
}

export_plugin!(HeaderRouter::default());

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn router(json: &str) -> Result<HeaderRouter, String> {
        HeaderRouter::from_settings(Config::new(json).parse()?)
    }

    fn route_of(r: &HeaderRouter, request: &Request) -> Option<Route> {
        match r.on_request(request) {
            Action::Forward { route, headers, .. } => {
                assert!(headers.is_empty(), "a router edits no headers");
                route
            }
            other => panic!("a router never responds: {other:?}"),
        }
    }

    fn up(name: &str) -> Option<Route> {
        Some(Route::Upstream(name.into()))
    }

    fn tag(name: &str) -> Option<Route> {
        Some(Route::Tag(name.into()))
    }

    const RULES: &str = r#"{"rules":[
        {"header":"X-Tenant","equals":"beta","route":{"upstream":"beta-api"}},
        {"header":"x-version","prefix":"2.","route":{"tag":"v2"}},
        {"header":"x-debug","present":true,"route":{"tag":"debug"}}
    ]}"#;

    #[test]
    fn first_matching_rule_wins() {
        let r = router(RULES).expect("valid");
        let get = || Request::new("GET", "/v1/items");
        assert_eq!(route_of(&r, &get().header("x-tenant", "beta")), up("beta-api"));
        assert_eq!(
            route_of(&r, &get().header("X-TENANT", "beta")),
            up("beta-api"),
            "names ignore case"
        );
        assert_eq!(
            route_of(&r, &get().header("x-tenant", "Beta")),
            None,
            "values do not"
        );
        assert_eq!(
            route_of(&r, &get().header("x-tenant", "betamax")),
            None,
            "equals is exact"
        );
        assert_eq!(route_of(&r, &get().header("x-version", "2.4.1")), tag("v2"));
        assert_eq!(route_of(&r, &get().header("x-version", "12.0")), None);
        assert_eq!(route_of(&r, &get().header("x-debug", "")), tag("debug"));
        assert_eq!(
            route_of(&r, &get().header("x-debug", "1").header("x-tenant", "beta")),
            up("beta-api"),
            "rules are tried in config order, not header order"
        );
        assert_eq!(
            route_of(&r, &get().header("x-tenant", "alpha").header("x-tenant", "beta")),
            up("beta-api"),
            "any field of the name may match"
        );
        assert_eq!(route_of(&r, &get()), None, "no match, no split: unchanged");
    }

    #[test]
    fn labels_name_the_target() {
        let r = router(RULES).expect("valid");
        let labels: Vec<&str> = r.rules.iter().map(|rule| rule.target.label.as_str()).collect();
        assert_eq!(labels, ["upstream:beta-api", "tag:v2", "tag:debug"]);
    }

    #[test]
    fn split_round_robin_follows_the_weights_interleaved() {
        let r = router(
            r#"{"split":{"targets":[
                {"route":{"tag":"stable"},"weight":3},
                {"route":{"tag":"off"},"weight":0},
                {"route":{"upstream":"canary"},"weight":1}
            ]}}"#,
        )
        .expect("valid");
        let picks: Vec<Option<Route>> = (0..8).map(|_| route_of(&r, &Request::new("GET", "/"))).collect();
        let (s, c) = (tag("stable"), up("canary"));
        assert_eq!(
            picks,
            [
                s.clone(),
                s.clone(),
                c.clone(),
                s.clone(),
                s.clone(),
                s.clone(),
                c.clone(),
                s.clone()
            ],
            "3:1, the canary between stable picks, never the weight-0 target"
        );

        let r = router(
            r#"{"split":{"targets":[
                {"route":{"tag":"stable"},"weight":90},
                {"route":{"tag":"canary"},"weight":10}
            ]}}"#,
        )
        .expect("valid");
        let mut counts = BTreeMap::new();
        for _ in 0..1000 {
            let t = r.choose(&Request::new("GET", "/")).expect("split").label.clone();
            *counts.entry(t).or_insert(0) += 1;
        }
        assert_eq!(counts["tag:stable"], 900);
        assert_eq!(counts["tag:canary"], 100);
    }

    #[test]
    fn sticky_header_keeps_a_value_on_one_target() {
        let r = router(
            r#"{"rules":[{"header":"x-tenant","equals":"beta","route":{"upstream":"beta-api"}}],
                "split":{"sticky_header":"X-User-Id","targets":[
                {"route":{"tag":"stable"},"weight":50},
                {"route":{"tag":"canary"},"weight":50}
            ]}}"#,
        )
        .expect("valid");
        let mut seen = BTreeMap::new();
        for user in 0..200 {
            let id = format!("user-{user}");
            let first = route_of(&r, &Request::new("GET", "/").header("x-user-id", &id));
            for _ in 0..3 {
                assert_eq!(
                    route_of(&r, &Request::new("POST", "/x").header("x-user-id", &id)),
                    first,
                    "{id} moved"
                );
            }
            *seen.entry(format!("{first:?}")).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "both targets get users: {seen:?}");
        assert!(seen.values().all(|n| *n > 60), "a rough 50:50 spread: {seen:?}");
        // The hash is fixed: FNV-1a 64 of "user-1" mod 100 decides.
        let expected = if fnv1a_64(b"user-1") % 100 < 50 {
            tag("stable")
        } else {
            tag("canary")
        };
        assert_eq!(
            route_of(&r, &Request::new("GET", "/").header("x-user-id", "user-1")),
            expected
        );
        // Rules still come first; without the sticky header, round-robin.
        assert_eq!(
            route_of(
                &r,
                &Request::new("GET", "/")
                    .header("x-tenant", "beta")
                    .header("x-user-id", "u")
            ),
            up("beta-api")
        );
        assert_eq!(route_of(&r, &Request::new("GET", "/")), tag("stable"));
        assert_eq!(route_of(&r, &Request::new("GET", "/")), tag("canary"));
    }

    #[test]
    fn fnv1a_64_known_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn bad_config_names_the_entry() {
        let err = |json: &str| router(json).err().expect("invalid");
        assert_eq!(
            err("{}"),
            "config: give `rules`, a `split`, or both; without either the plugin routes nothing"
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x","equals":"a","prefix":"b","route":{"tag":"t"}}]}"#),
            "config.rules[0]: give exactly one matcher: `equals = \"...\"`, `prefix = \"...\"` or `present = true`"
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x","route":{"tag":"t"}}]}"#),
            "config.rules[0]: give exactly one matcher: `equals = \"...\"`, `prefix = \"...\"` or `present = true`"
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x","present":false,"route":{"tag":"t"}}]}"#),
            "config.rules[0].present: only `present = true` is a matcher (a rule for a missing header cannot route by it)"
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x tenant","present":true,"route":{"tag":"t"}}]}"#),
            r#"config.rules[0].header: "x tenant" is not a valid HTTP header name"#
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x","present":true,"route":{"tag":"t"}},
                {"header":"x","present":true,"route":{"tag":"t","upstream":"u"}}]}"#),
            "config.rules[1].route: give exactly one of `upstream` or `tag` (route = { upstream = \"NAME\" } or route = { tag = \"NAME\" })"
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x","present":true,"route":{}}]}"#),
            "config.rules[0].route: give exactly one of `upstream` or `tag` (route = { upstream = \"NAME\" } or route = { tag = \"NAME\" })"
        );
        assert_eq!(
            err(r#"{"rules":[{"header":"x","present":true,"route":{"upstream":" "}}]}"#),
            "config.rules[0].route.upstream: is empty"
        );
        assert_eq!(
            err(r#"{"split":{"targets":[{"route":{"tag":"a"},"weight":0}]}}"#),
            "config.split.targets: the weights add up to 0; give at least one target a positive weight"
        );
        assert_eq!(
            err(r#"{"split":{"targets":[]}}"#),
            "config.split.targets: the weights add up to 0; give at least one target a positive weight"
        );
        assert_eq!(
            err(
                r#"{"split":{"targets":[{"route":{"tag":"a"},"weight":1},{"route":{"tag":"b"},"weight":10001}]}}"#
            ),
            "config.split.targets[1].weight: 10001 is more than 10000"
        );
        assert_eq!(
            err(r#"{"split":{"targets":[{"route":{"tag":"a"},"weight":-1}]}}"#),
            "config.split.targets[0].weight: invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            err(r#"{"split":{"targets":[{"route":{"tag":"a"}}]}}"#),
            "config.split.targets[0]: missing field `weight`"
        );
        assert_eq!(
            err(r#"{"split":{"sticky_header":"","targets":[{"route":{"tag":"a"},"weight":1}]}}"#),
            r#"config.split.sticky_header: "" is not a valid HTTP header name"#
        );
        assert_eq!(
            err(r#"{"rule":[]}"#),
            "config.rule: unknown field `rule`, expected `rules` or `split`"
        );
    }
}
