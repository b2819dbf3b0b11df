//! Header rules for a proxied request or response (RFC 9110 §7.6): hop-by-hop
//! fields stay on their own hop, `Via` names this hop, and the authority the upstream
//! sees is its own.

use http::header::{CONNECTION, HeaderMap, HeaderName, HeaderValue, TE, VIA};
use http::{Version, uri::Authority};

use crate::config::{UpstreamConfig, split_host_port};

/// Fields that describe one connection, not the message (RFC 9110 §7.6.1), besides
/// those a `Connection` field names and every `Proxy-*` field.
const HOP_BY_HOP: [&str; 5] = ["connection", "keep-alive", "te", "transfer-encoding", "upgrade"];

/// Removes hop-by-hop fields: `Connection` and every field it names, `Keep-Alive`,
/// `Proxy-*`, `TE`, `Transfer-Encoding` and `Upgrade` (an upgrade sets its own
/// `Upgrade` and `Connection` again, per hop). In a request, `TE: trailers` survives (`keep_te_trailers`): it says the
/// client takes trailers, which gRPC over HTTP/2 requires end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages carry none of them (and then no `Connection` naming others):
    // one pass over the names settles that, where the removals below hash each name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let te_trailers = keep_te_trailers
        && headers
            .get_all(TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|name| name.trim().eq_ignore_ascii_case("trailers"))
            });
    // The fields `Connection` names, other than those removed below anyway: nearly
    // always none (`keep-alive`, `close`), and then nothing is allocated.
    let named: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("close") && !HOP_BY_HOP.iter().any(|h| n.eq_ignore_ascii_case(h)))
        .map(str::to_string)
        .collect();
    for name in named {
        // A `&str` is matched against the map without making a `HeaderName`;
        // one that is not a valid name is in no map.
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether `name` is a hop-by-hop field by itself (not counting those a `Connection`
/// field names), `Proxy-*` included.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || name.as_str().starts_with("proxy-")
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade` and an
/// `Upgrade` field), as a WebSocket handshake does.
pub fn wants_upgrade<B>(req: &http::Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Appends this hop to `Via` (RFC 9110 §7.6.3: a proxy sends it), with the protocol
/// version the message arrived in. The pseudonym hides host names and versions.
pub fn add_via(headers: &mut HeaderMap, received: Version) {
    let value = match received {
        Version::HTTP_2 => "2 wasmbassador",
        Version::HTTP_10 => "1.0 wasmbassador",
        _ => "1.1 wasmbassador",
    };
    headers.append(VIA, HeaderValue::from_static(value));
}

/// The `Host` / `:authority` sent upstream: `http.host` when configured, else
/// `tls.server_name`, else the first endpoint's host; with the first endpoint's port
/// unless it is the scheme's default (443 with TLS, 80 without). The endpoint a
/// request reaches is chosen later, inside the pool, so the authority cannot depend
/// on it; endpoints of one upstream serve the same names.
pub fn upstream_authority(config: &UpstreamConfig) -> Result<Authority, String> {
    if let Some(host) = &config.http.host {
        return host
            .parse()
            .map_err(|e| format!("http.host {host:?} is not an authority: {e}"));
    }
    let first = config.endpoint.first().and_then(|e| split_host_port(&e.address));
    let (endpoint_host, port) = first.unwrap_or(("localhost", 0));
    let host = config
        .tls
        .as_ref()
        .and_then(|t| t.server_name.as_deref())
        .unwrap_or(endpoint_host);
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let default_port = if config.tls.is_some() { 443 } else { 80 };
    let text = if port == 0 || port == default_port {
        host
    } else {
        format!("{host}:{port}")
    };
    text.parse()
        .map_err(|e| format!("{text:?} is not a usable Host for the upstream: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_are_removed_and_te_trailers_kept() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret, TE"),
            ("connection", "X-Other ,close"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers, deflate;q=0.5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("trailer", "x-checksum"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, true);
        let mut left: Vec<_> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        left.sort();
        assert_eq!(left, vec!["accept: */*", "te: trailers", "trailer: x-checksum"]);
    }

    #[test]
    fn te_without_trailers_goes() {
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.is_empty());
    }
}
