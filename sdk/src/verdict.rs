//! [`Verdict`]: what `on_connect` answers.

use crate::__private::bindings::wasmbassador::plugin::types as wit;

/// A plugin's answer to [`Plugin::on_connect`](crate::Plugin::on_connect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No objection: the chain goes on to the next plugin, and without any route the
    /// connection goes to the listener's upstream.
    Allow,
    /// Refuse the connection with this reason; the chain stops. Build it with
    /// [`Verdict::deny`].
    Deny(String),
    /// Send the connection to this target and go on with the chain (a later route
    /// replaces this one, a later deny still refuses). Build it with
    /// [`Verdict::route_upstream`] or [`Verdict::route_tag`].
    Route(Route),
}

/// Where a [`Verdict::Route`] sends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An upstream by its name in the host config (`[[upstream]] name = ...`).
    Upstream(String),
    /// Endpoints of the listener's upstream that carry this tag (`endpoint.tags`).
    Tag(String),
}

impl Verdict {
    /// Refuses the connection. The reason is logged by the host and, on a `postgres`
    /// listener, sent to the client (ErrorResponse, SQLSTATE 28000): say what failed
    /// (`user "bob" is not in the allow list`), never a secret.
    pub fn deny(reason: impl Into<String>) -> Self {
        Verdict::Deny(reason.into())
    }

    /// Routes the connection to the upstream with this name. If no upstream has that
    /// name when the chain ends, the host refuses the connection and logs why.
    pub fn route_upstream(name: impl Into<String>) -> Self {
        Verdict::Route(Route::Upstream(name.into()))
    }

    /// Routes the connection to the endpoints of the listener's upstream that carry this
    /// tag, still chosen by priority, weight and health. If no endpoint carries it, the
    /// host refuses the connection and logs why.
    pub fn route_tag(tag: impl Into<String>) -> Self {
        Verdict::Route(Route::Tag(tag.into()))
    }
}

impl From<Verdict> for wit::Verdict {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Allow => wit::Verdict::Allow,
            Verdict::Deny(reason) => wit::Verdict::Deny(reason),
            Verdict::Route(Route::Upstream(name)) => wit::Verdict::Route(wit::RouteTarget::Upstream(name)),
            Verdict::Route(Route::Tag(tag)) => wit::Verdict::Route(wit::RouteTarget::Tag(tag)),
        }
    }
}
