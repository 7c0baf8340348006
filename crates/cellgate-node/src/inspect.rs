//! Request bodies read before the decision, bounded, for the capabilities that ask for it
//! (`inspect`, `mcp`) and for approvals (whose digest binds the body); every other request's
//! body streams to the upstream unread.
//!
//! The body is read up to a bound; what was read is then sent on first, followed by the rest
//! of the agent's stream when the bound was passed ([`ReadBody`]), so nothing is held whole
//! beyond the bound and nothing is lost.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use cellgate_api::model::Cell;

/// What was read of a body.
#[derive(Debug)]
pub struct Read {
    /// The bytes read: the whole body, or its first bytes past the bound.
    pub head: Bytes,
    /// Whether the body is longer than the bound.
    pub oversize: bool,
    /// The body to send on: `head`, then whatever follows.
    pub body: ReadBody,
}

/// Reads `body` until its end or until more than `max` bytes came.
///
/// # Errors
/// When the agent's stream fails (it went away mid-body).
pub async fn read(mut body: Incoming, max: usize) -> Result<Read, hyper::Error> {
    let mut buf = BytesMut::new();
    let mut trailers = None;
    let oversize = loop {
        match body.frame().await {
            None => break false,
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    buf.extend_from_slice(&d);
                    if buf.len() > max {
                        break true;
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
        }
    };
    let head = buf.freeze();
    let rest = (oversize && !body.is_end_stream()).then_some(body);
    Ok(Read {
        head: head.clone(),
        oversize,
        body: ReadBody {
            head: (!head.is_empty()).then_some(head),
            trailers,
            rest,
        },
    })
}

/// A body whose first bytes were read before the decision: those, then the rest of the
/// agent's stream (if it was not read to its end), then its trailers.
#[derive(Debug, Default)]
pub struct ReadBody {
    head: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
}

impl ReadBody {
    /// Rewrites what was read with `f`; returns the lengths before and after when it changed.
    pub fn rewrite_head(
        &mut self,
        f: impl FnOnce(&[u8]) -> Option<Bytes>,
    ) -> Option<(usize, usize)> {
        let head = self.head.as_ref()?;
        let new = f(head)?;
        let lens = (head.len(), new.len());
        self.head = (!new.is_empty()).then_some(new);
        Some(lens)
    }

    /// A body of exactly `bytes`.
    pub fn whole(bytes: Bytes) -> Self {
        Self {
            head: (!bytes.is_empty()).then_some(bytes),
            trailers: None,
            rest: None,
        }
    }
}

impl Body for ReadBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(h) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        if let Some(rest) = self.rest.as_mut() {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => self.rest = None,
                other => return other,
            }
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(head),
            Some(r) => {
                let mut s = r.size_hint();
                s.set_lower(s.lower().saturating_add(head));
                if let Some(u) = s.upper() {
                    s.set_upper(u.saturating_add(head));
                }
                s
            }
        }
    }
}

/// The most bytes any capability of `cell` that could grant a request to `host`:`port` (or the
/// dialled address `dst`) reads of its body; `None` when none reads bodies, so the body streams
/// unread. The decision then says which capability granted, and that one's rules apply.
pub fn bound(cell: &Cell, host: Option<&str>, port: u16, dst: std::net::IpAddr) -> Option<usize> {
    use cellgate_api::model::DestinationTarget;
    cell.capabilities
        .iter()
        .filter_map(|c| Some((c, c.inspect?)))
        .filter(|(c, _)| {
            c.destinations.iter().any(|d| {
                d.ports.contains(&port)
                    && match &d.target {
                        DestinationTarget::Host(p) => host.is_some_and(|h| p.matches(h)),
                        DestinationTarget::Cidr(n) => n.contains(dst.to_canonical()),
                    }
            })
        })
        .map(|(_, i)| i.max_bytes as usize)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_body_is_sent_on_whole() {
        let mut b = ReadBody::whole(Bytes::from_static(b"hello"));
        assert_eq!(b.size_hint().exact(), Some(5));
        let got = (&mut b).collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert!(b.is_end_stream());
        let empty = ReadBody::whole(Bytes::new());
        assert!(empty.is_end_stream());
    }
}
