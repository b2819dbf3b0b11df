//! The fast path's part for listeners with plugins: the request head as the hooks see
//! it, where they send it, the response head they may edit, and the hand-over to
//! hyper of a request they routed to an HTTP/2 upstream.

use super::*;

/// A request head as the plugins see it: what hyper's path hands them too, hop-by-hop
/// fields and `Host` gone, field names in lower case. Reused by each request of a
/// connection.
#[derive(Default)]
pub(super) struct HookHead {
    pub(super) method: String,
    pub(super) path: String,
    /// The app's `Host`.
    pub(super) authority: Option<String>,
    pub(super) headers: HeaderMap,
}

/// The head for the upstream of a request the plugins saw (and may have edited).
pub(super) fn write_request_head(out: &mut Vec<u8>, h: &HookHead, host: &[u8]) {
    start_request_head(out, &h.method, &h.path, host);
    for (name, value) in &h.headers {
        write_field(out, name.as_str(), value.as_bytes());
    }
    out.extend_from_slice(b"via: 1.1 wasmbassador\r\n\r\n");
}

/// The plugins' part in one exchange.
#[derive(Clone, Copy)]
pub(super) struct Hooks<'a> {
    pub(super) d: &'a Decision,
    pub(super) head: &'a HookHead,
}

/// Where [`Ctx::route`] left a request.
pub(super) enum Routed {
    /// To this upstream, through this pool.
    Go(Decision, Arc<Upstream>, Arc<Pool>),
    /// Answered here (by a plugin, or with the host's 502 for a route to nowhere).
    Answered(Exchange),
    /// To hyper, with the plugins' decision.
    Hyper(Decision),
}

impl Ctx {
    /// After `on-request`: a plugin's answer, or the upstream and pool the request
    /// goes to, with its head for the upstream written into `bufs.out`.
    pub(super) async fn route(
        &self,
        req: &Request,
        hh: &mut HookHead,
        app: &mut AppConn,
        bufs: &mut Bufs,
    ) -> Routed {
        let mut d = self.request_hooks(&hh.method, &hh.path, hh.authority.as_deref(), &mut hh.headers);
        let early = d.early.take();
        let (name, tag, by) = d.target(self.st.config.upstream.as_str());
        let found = match early {
            Some(early) => Err(early),
            None => self
                .upstream_for(name, tag, by)
                .map_err(|(status, text)| Early::text(status, text))
                .map(|up| {
                    let pool = up.http_pool(tag);
                    (up, pool)
                }),
        };
        let (up, pool) = match found {
            Ok(found) => found,
            Err(early) => {
                let hooks = Hooks { d: &d, head: hh };
                let done = self
                    .answer(app, req, &mut bufs.app, early, Some((hooks, name, 0)))
                    .await;
                return Routed::Answered(done);
            }
        };
        // An HTTP/2 upstream, or one whose authority is unusable, is hyper's to
        // serve (and to answer for).
        let Some(host) = pool.host().filter(|_| !pool.is_h2()) else {
            return Routed::Hyper(d);
        };
        write_request_head(&mut bufs.out, hh, host.as_bytes());
        Routed::Go(d, up, pool)
    }

    /// Gives hyper the request whose hooks ran here, with the plugins' edits.
    pub(super) fn hand_over(&self, decision: Decision, hh: &mut HookHead) {
        let prepared = Prepared {
            decision,
            headers: std::mem::take(&mut hh.headers),
        };
        *self
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(prepared);
    }

    /// Runs `on-response` over a response head that [`parse_response`] wrote, and
    /// writes it again with the plugins' edits. The fields that frame or close the
    /// connection (`transfer-encoding`, `connection`) are the host's: the plugins do
    /// not see them, and they stay as they were.
    pub(super) fn edit_response_head(&self, head: &mut Vec<u8>, d: &Decision, answered: &Answered<'_>) {
        // `parse_response` writes at most three fields of its own.
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 3];
        let mut parsed = httparse::Response::new(&mut fields);
        let shared = Bytes::copy_from_slice(head);
        let Ok(httparse::Status::Complete(_)) = parsed.parse(&shared) else {
            return;
        };
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        let mut kept: Vec<&httparse::Header<'_>> = Vec::new();
        for f in parsed.headers.iter() {
            if hop_by_hop(f.name) {
                kept.push(f);
                continue;
            }
            match typed_field(f, &shared, &shared) {
                Some((name, value)) => {
                    headers.append(name, value);
                }
                // Not a field hyper's types can hold: it stays, unseen by the hooks.
                None => kept.push(f),
            }
        }
        if !self.response_hooks(d, answered, &mut headers) {
            // Seen, not edited: the head stays as it was written.
            return;
        }
        let line_end = shared.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
        let mut out = Vec::with_capacity(head.len() + 64);
        out.extend_from_slice(&shared[..line_end + 2]);
        for (name, value) in &headers {
            write_field(&mut out, name.as_str(), value.as_bytes());
        }
        for f in kept {
            write_field(&mut out, f.name, f.value);
        }
        out.extend_from_slice(b"\r\n");
        *head = out;
    }
}
