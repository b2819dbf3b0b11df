//! `allow-list`: an auth plugin that lets a connection in only if its PostgreSQL user,
//! its database and its client address are each in the configured lists.
//!
//! Config keys, each optional — an omitted key does not restrict:
//! - `users`: PostgreSQL user names, matched exactly (case-sensitive, as PostgreSQL does);
//! - `databases`: database names, matched exactly; a client that names no database gets
//!   its user name as the database, as PostgreSQL does;
//! - `clients`: CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
//!
//! A present key with an empty list allows nobody. On a listener that is not `postgres`
//! there is no user or database: if `users` or `databases` is set, such connections are
//! denied (the plugin cannot check what it does not see).
#![forbid(unsafe_code)]

mod cidr;

use serde::Deserialize;
use wasmbassador_sdk::prelude::*;

use crate::cidr::Cidr;

/// The checked config; `None` for a key that was left out.
#[derive(Default)]
struct AllowList {
    users: Option<Vec<String>>,
    databases: Option<Vec<String>>,
    clients: Option<Vec<Cidr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    users: Option<Vec<String>>,
    databases: Option<Vec<String>>,
    clients: Option<Vec<String>>,
}

impl AllowList {
    fn from_settings(settings: Settings) -> Result<AllowList, String> {
        let clients = match settings.clients {
            None => None,
            Some(entries) => Some(
                entries
                    .iter()
                    .enumerate()
                    .map(|(i, entry)| {
                        entry
                            .parse::<Cidr>()
                            .map_err(|e| format!("config.clients[{i}]: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(AllowList {
            users: settings.users,
            databases: settings.databases,
            clients,
        })
    }

    /// `None` to allow, or the reason to deny.
    fn check(&self, c: &Connection) -> Option<String> {
        if let Some(clients) = &self.clients {
            match c.client_ip() {
                Some(ip) if clients.iter().any(|cidr| cidr.contains(ip)) => {}
                Some(ip) => return Some(format!("client {ip} is not in the allow list")),
                None => return Some(format!("client address {:?} cannot be checked", c.client_addr())),
            }
        }
        if let Some(users) = &self.users {
            match c.db_user() {
                Some(user) if users.iter().any(|u| u == user) => {}
                Some(user) => return Some(format!("user {user:?} is not in the allow list")),
                None => return Some(no_startup("user", c)),
            }
        }
        if let Some(databases) = &self.databases {
            match c.database() {
                Some(database) if databases.iter().any(|d| d == database) => {}
                Some(database) => return Some(format!("database {database:?} is not in the allow list")),
                None => return Some(no_startup("database", c)),
            }
        }
        None
    }
}

fn no_startup(what: &str, c: &Connection) -> String {
    if c.protocol() == Protocol::Postgres {
        format!("no {what} given, and the allow list restricts {what}s")
    } else {
        format!(
            "listener {:?} is {}, so there is no {what} to check against the allow list",
            c.listener(),
            c.protocol()
        )
    }
}

impl Plugin for AllowList {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        *self = AllowList::from_settings(config.parse()?)?;
        for (key, empty) in [
            ("users", self.users.as_ref().is_some_and(Vec::is_empty)),
            ("databases", self.databases.as_ref().is_some_and(Vec::is_empty)),
            ("clients", self.clients.as_ref().is_some_and(Vec::is_empty)),
        ] {
            if empty {
                log::warn(format!(
                    "config.{key} is an empty list: every connection will be denied"
                ));
            }
        }
        Ok(())
    }

    fn on_connect(&self, c: &Connection) -> Verdict {
        match self.check(c) {
            None => Verdict::Allow,
            Some(reason) => Verdict::deny(reason),
        }
    }
}

export_plugin!(AllowList::default());

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_list(json: &str) -> Result<AllowList, String> {
        AllowList::from_settings(Config::new(json).parse()?)
    }

    fn pg(client: &str, params: &[(&str, &str)]) -> Connection {
        Connection::new("orders-db", client, "orders").with_startup(params)
    }

    #[test]
    fn omitted_keys_do_not_restrict() {
        let list = allow_list("{}").expect("valid");
        assert_eq!(list.check(&pg("10.0.0.1:5000", &[("user", "anyone")])), None);
        assert_eq!(list.check(&Connection::new("raw", "10.0.0.1:5000", "u")), None);
    }

    #[test]
    fn each_key_names_what_failed() {
        let list = allow_list(
            r#"{"users":["app"],"databases":["orders"],"clients":["10.0.0.0/8","2001:db8::/32"]}"#,
        )
        .expect("valid");
        let ok = [("user", "app"), ("database", "orders")];
        assert_eq!(list.check(&pg("10.1.2.3:5000", &ok)), None);
        assert_eq!(list.check(&pg("[2001:db8::7]:5000", &ok)), None);
        assert_eq!(
            list.check(&pg("[::ffff:10.1.2.3]:5000", &ok)),
            None,
            "IPv4-mapped matches IPv4"
        );
        assert_eq!(
            list.check(&pg("192.168.0.1:5000", &ok)).as_deref(),
            Some("client 192.168.0.1 is not in the allow list")
        );
        assert_eq!(
            list.check(&pg("10.1.2.3:5000", &[("user", "bob"), ("database", "orders")]))
                .as_deref(),
            Some(r#"user "bob" is not in the allow list"#)
        );
        assert_eq!(
            list.check(&pg("10.1.2.3:5000", &[("user", "app"), ("database", "billing")]))
                .as_deref(),
            Some(r#"database "billing" is not in the allow list"#)
        );
        // No database parameter: PostgreSQL uses the user name, and so does the check.
        assert_eq!(
            list.check(&pg("10.1.2.3:5000", &[("user", "app")])).as_deref(),
            Some(r#"database "app" is not in the allow list"#)
        );
        assert_eq!(
            list.check(&Connection::new("raw", "10.1.2.3:5000", "u"))
                .as_deref(),
            Some(r#"listener "raw" is tcp, so there is no user to check against the allow list"#)
        );
    }

    #[test]
    fn empty_list_allows_nobody() {
        let list = allow_list(r#"{"users":[]}"#).expect("valid");
        assert!(list.check(&pg("10.0.0.1:5000", &[("user", "app")])).is_some());
    }

    #[test]
    fn bad_config_names_the_entry() {
        let err = |json: &str| allow_list(json).err().expect("invalid");
        assert_eq!(
            err(r#"{"clients":["10.0.0.0/8","10.1.2.3/8"]}"#),
            r#"config.clients[1]: "10.1.2.3/8" has host bits set (did you mean "10.0.0.0/8"?)"#
        );
        assert_eq!(
            err(r#"{"users":"app"}"#),
            r#"config.users: invalid type: string "app", expected a sequence"#
        );
        assert_eq!(
            err(r#"{"user":["app"]}"#),
            "config.user: unknown field `user`, expected one of `users`, `databases`, `clients`"
        );
    }
}
