//! [`read_granted_file`]: the one way a plugin reads a file.

use crate::__private::bindings::wasmbassador::plugin::host;

/// Reads a whole file that the operator granted to this plugin in the host config:
///
/// ```toml
/// [[plugin]]
/// name = "token-auth"
/// path = "/etc/wasmbassador/plugins/token_auth.wasm"
/// grants = { files = ["/var/run/secrets/token"] }
/// ```
///
/// The path must be written exactly as granted. The file is read at each call, so a
/// rotated token is seen at once (read it in [`init`](crate::Plugin::init) instead if
/// the plugin only needs it once). Any other path, a missing file or a read error gives
/// `Err` with a reason that names the path. `std::fs` does not work in a plugin: the host
/// grants no filesystem.
pub fn read_granted_file(path: &str) -> Result<Vec<u8>, String> {
    host::read_file(path)
}
