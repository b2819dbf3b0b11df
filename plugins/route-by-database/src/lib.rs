//! `route-by-database`: a routing plugin that sends a PostgreSQL connection to an upstream
//! or to an endpoint tag chosen by the database the client asked for.
//!
//! Config:
//! - `routes`: a table from database name to target. A target `"tag:NAME"` routes to the
//!   endpoints tagged `NAME` (in the listener's upstream); any other text is an upstream
//!   name.
//! - `default` (optional): the target for every other connection, including those of
//!   non-`postgres` listeners. Without it such connections get no objection and no route:
//!   they go to the listener's upstream (or wherever an earlier plugin routed them).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmbassador_sdk::prelude::*;

#[derive(Default)]
struct RouteByDatabase {
    routes: BTreeMap<String, Route>,
    default: Option<Route>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    routes: BTreeMap<String, String>,
    default: Option<String>,
}

/// `"tag:NAME"` is an endpoint tag, anything else an upstream name.
fn target(text: &str, key: &str) -> Result<Route, String> {
    let route = match text.strip_prefix("tag:") {
        Some(tag) => Route::Tag(tag.trim().to_owned()),
        None => Route::Upstream(text.trim().to_owned()),
    };
    match &route {
        Route::Tag(tag) if tag.is_empty() => Err(format!("{key}: {text:?} names no tag after \"tag:\"")),
        Route::Upstream(name) if name.is_empty() => Err(format!("{key}: the target is empty")),
        _ => Ok(route),
    }
}

impl RouteByDatabase {
    fn from_settings(settings: Settings) -> Result<RouteByDatabase, String> {
        let mut routes = BTreeMap::new();
        for (database, text) in &settings.routes {
            routes.insert(
                database.clone(),
                target(text, &format!("config.routes.{database}"))?,
            );
        }
        let default = settings
            .default
            .as_deref()
            .map(|text| target(text, "config.default"))
            .transpose()?;
        Ok(RouteByDatabase { routes, default })
    }

    fn route(&self, c: &Connection) -> Option<&Route> {
        c.database()
            .and_then(|database| self.routes.get(database))
            .or(self.default.as_ref())
    }
}

impl Plugin for RouteByDatabase {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        *self = RouteByDatabase::from_settings(config.parse()?)?;
        Ok(())
    }

    fn on_connect(&self, c: &Connection) -> Verdict {
        match self.route(c) {
            Some(route) => Verdict::Route(route.clone()),
            None => Verdict::Allow,
        }
    }
}

export_plugin!(RouteByDatabase::default());

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(json: &str) -> Result<RouteByDatabase, String> {
        RouteByDatabase::from_settings(Config::new(json).parse()?)
    }

    fn verdict(p: &RouteByDatabase, database: Option<&str>) -> Verdict {
        let c = Connection::new("pg", "127.0.0.1:5000", "orders");
        let c = match database {
            Some(db) => c.with_startup(&[("user", "app"), ("database", db)]),
            None => c,
        };
        p.on_connect(&c)
    }

    #[test]
    fn routes_by_database() {
        let p =
            plugin(r#"{"routes":{"orders":"orders-upstream","analytics":"tag:replica"}}"#).expect("valid");
        assert_eq!(
            verdict(&p, Some("orders")),
            Verdict::route_upstream("orders-upstream")
        );
        assert_eq!(verdict(&p, Some("analytics")), Verdict::route_tag("replica"));
        assert_eq!(
            verdict(&p, Some("other")),
            Verdict::Allow,
            "no match, no default: no objection"
        );
        assert_eq!(verdict(&p, None), Verdict::Allow, "tcp listener");
    }

    #[test]
    fn default_catches_the_rest() {
        let p = plugin(r#"{"routes":{"orders":"a"},"default":"tag:primary"}"#).expect("valid");
        assert_eq!(verdict(&p, Some("orders")), Verdict::route_upstream("a"));
        assert_eq!(verdict(&p, Some("other")), Verdict::route_tag("primary"));
        assert_eq!(verdict(&p, None), Verdict::route_tag("primary"));
    }

    #[test]
    fn bad_targets_are_refused() {
        let err = |json: &str| plugin(json).err().expect("invalid");
        assert_eq!(
            err(r#"{"routes":{"orders":"tag:"}}"#),
            r#"config.routes.orders: "tag:" names no tag after "tag:""#
        );
        assert_eq!(err(r#"{"default":""}"#), "config.default: the target is empty");
        assert_eq!(
            err(r#"{"route":{}}"#),
            "config.route: unknown field `route`, expected `routes` or `default`"
        );
    }
}
