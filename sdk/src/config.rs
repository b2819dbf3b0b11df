//! [`Config`]: the plugin's `config` table from the host config.

use serde::de::DeserializeOwned;

/// The plugin's `config` table from the host config, as the host hands it to
/// [`Plugin::init`](crate::Plugin::init): the TOML table re-encoded as JSON text.
///
/// ```toml
/// [[plugin]]
/// name = "allow-app"
/// path = "/etc/wasmbassador/plugins/allow_list.wasm"
/// config = { users = ["app"], clients = ["10.0.0.0/8"] }
/// ```
///
/// arrives as `{"users":["app"],"clients":["10.0.0.0/8"]}`. Most plugins read it into a
/// struct of their own with [`Config::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    json: String,
}

impl Config {
    /// Wraps the JSON text of a config; an empty text counts as `{}`.
    pub fn new(json: impl Into<String>) -> Self {
        let json = json.into();
        if json.trim().is_empty() {
            Config {
                json: "{}".to_owned(),
            }
        } else {
            Config { json }
        }
    }

    /// The config as JSON text.
    pub fn as_json(&self) -> &str {
        &self.json
    }

    /// Whether the table is empty (no `config` in the host config, or `config = {}`).
    pub fn is_empty(&self) -> bool {
        matches!(self.value(), Ok(serde_json::Value::Object(map)) if map.is_empty())
    }

    /// Reads the config into `T` with serde. Put `#[serde(deny_unknown_fields)]` on `T` so
    /// that a misspelt key is an error rather than silently ignored, and `#[serde(default)]`
    /// on optional fields.
    ///
    /// The error names the entry that failed and why, in terms of the TOML the operator
    /// wrote: `config.users[1]: invalid type: integer `3`, expected a string`, or
    /// `config.usrs: unknown field `usrs`, expected one of `users`, `databases``. Return it from
    /// `init` as it is (`config.parse()?`).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        let mut de = serde_json::Deserializer::from_str(&self.json);
        let value =
            serde_path_to_error::deserialize(&mut de).map_err(|e| describe(Some(e.path()), e.inner()))?;
        de.end().map_err(|e| describe(None, &e))?;
        Ok(value)
    }

    /// The config as a JSON value, for plugins that walk it by hand.
    pub fn value(&self) -> Result<serde_json::Value, String> {
        self.parse()
    }
}

/// `config.<path>: <message>`, without serde_json's position in the JSON text (the
/// operator never saw that text, only the TOML it came from).
fn describe(path: Option<&serde_path_to_error::Path>, error: &serde_json::Error) -> String {
    let message = error.to_string();
    let message = match message.rsplit_once(" at line ") {
        Some((head, _)) if error.line() > 0 => head.to_owned(),
        _ => message,
    };
    let path = path.map(ToString::to_string).unwrap_or_default();
    if path == "." || path.is_empty() {
        format!("config: {message}")
    } else {
        format!("config.{path}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Settings {
        users: Vec<String>,
        #[serde(default)]
        level: Option<String>,
    }

    #[test]
    fn parses_and_names_the_bad_entry() {
        let ok: Settings = Config::new(r#"{"users":["app"]}"#).parse().expect("valid");
        assert_eq!(ok.users, ["app"]);

        let err = Config::new(r#"{"users":["app", 3]}"#)
            .parse::<Settings>()
            .expect_err("invalid");
        assert_eq!(
            err,
            "config.users[1]: invalid type: integer `3`, expected a string"
        );

        let err = Config::new(r#"{"usrs":[]}"#)
            .parse::<Settings>()
            .expect_err("invalid");
        assert_eq!(
            err,
            "config.usrs: unknown field `usrs`, expected `users` or `level`"
        );

        let err = Config::new("{}").parse::<Settings>().expect_err("invalid");
        assert_eq!(err, "config: missing field `users`");
    }

    #[test]
    fn empty_text_is_an_empty_table() {
        assert!(Config::new("").is_empty());
        assert!(Config::new("{}").is_empty());
        assert!(!Config::new(r#"{"a":1}"#).is_empty());
    }
}
