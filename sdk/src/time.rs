//! [`now`]: the plugin's clock.

use std::time::Duration;

use crate::__private::bindings::wasmbassador::plugin::host;

/// Monotonic time since an arbitrary origin, fixed for the life of the host process: only
/// the difference between two readings means anything (`let took = now() - start;`).
///
/// This is the only clock a plugin has; `std::time::Instant` and `SystemTime` reach WASI
/// clocks that the host does not grant.
pub fn now() -> Duration {
    Duration::from_nanos(host::now_ns())
}
