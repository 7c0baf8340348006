//! The injected secret never reaches the agent, even when an upstream sends it back (an echo
//! service, a debug endpoint, an error page quoting the request): every form of it
//! ([`crate::credentials::Injected::scrub`]) is masked in the response's headers and body, as
//! the body streams. A mask has the length of what it hides (`*` for every byte), so lengths,
//! framing and JSON or SSE structure stay intact; a secret split across chunks is still found.

use bytes::{Bytes, BytesMut};

/// Masks every occurrence of some patterns in a byte stream fed in chunks.
#[derive(Debug, Clone)]
pub struct Scrubber {
    patterns: Vec<Vec<u8>>,
    /// Bytes held back: the end of what came, which could be the start of a pattern.
    held: BytesMut,
    /// How many occurrences were masked.
    pub masked: usize,
}

impl Scrubber {
    /// A scrubber of `patterns` (empty ones are ignored).
    pub fn new(patterns: Vec<Vec<u8>>) -> Self {
        let mut patterns: Vec<Vec<u8>> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
        // Longest first: a pattern containing another is masked whole.
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        patterns.dedup();
        Self {
            patterns,
            held: BytesMut::new(),
            masked: 0,
        }
    }

    /// Masks the patterns in `chunk` (after what was held back) and returns what can be sent
    /// now; holds back the shortest end that could still grow into a pattern.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.held.extend_from_slice(chunk);
        self.mask();
        let keep = self.partial_suffix();
        let ready = self.held.len() - keep;
        self.held.split_to(ready).freeze()
    }

    /// What was held back, masked: the stream ended.
    pub fn finish(&mut self) -> Bytes {
        self.mask();
        self.held.split().freeze()
    }

    /// Masks `text` whole (a header value).
    pub fn mask_all(&mut self, text: &[u8]) -> Option<Vec<u8>> {
        let before = self.masked;
        let mut held = std::mem::take(&mut self.held);
        self.held = BytesMut::from(text);
        self.mask();
        let out = self.held.to_vec();
        std::mem::swap(&mut self.held, &mut held);
        (self.masked > before).then_some(out)
    }

    fn mask(&mut self) {
        for p in &self.patterns {
            let mut from = 0;
            while let Some(at) = find(&self.held[from..], p) {
                let start = from + at;
                self.held[start..start + p.len()].fill(b'*');
                self.masked += 1;
                from = start + p.len();
            }
        }
    }

    /// The length of the longest end of the held bytes that is a proper prefix of a pattern.
    fn partial_suffix(&self) -> usize {
        let h = &self.held[..];
        self.patterns
            .iter()
            .map(|p| {
                let max = (p.len() - 1).min(h.len());
                (1..=max)
                    .rev()
                    .find(|&n| h[h.len() - n..] == p[..n])
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"sk-live-0123456789";

    fn through(chunks: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut s = Scrubber::new(vec![SECRET.to_vec(), b"Bearer sk-live-0123456789".to_vec()]);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.feed(c));
        }
        out.extend_from_slice(&s.finish());
        (out, s.masked)
    }

    #[test]
    fn a_secret_is_masked_wherever_it_falls() {
        let whole = b"{\"auth\":\"Bearer sk-live-0123456789\",\"again\":\"sk-live-0123456789\"}";
        let (out, n) = through(&[whole]);
        assert_eq!(out.len(), whole.len(), "lengths are kept");
        assert!(!out.windows(SECRET.len()).any(|w| w == SECRET));
        assert_eq!(n, 2);
        // Split at every position, and byte by byte.
        for cut in 1..whole.len() {
            let (out, _) = through(&[&whole[..cut], &whole[cut..]]);
            assert!(
                !out.windows(SECRET.len()).any(|w| w == SECRET),
                "cut at {cut}"
            );
            assert_eq!(out.len(), whole.len());
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        let (out, _) = through(&bytes);
        assert!(!out.windows(SECRET.len()).any(|w| w == SECRET));
    }

    #[test]
    fn nothing_else_is_held_back_or_changed() {
        let mut s = Scrubber::new(vec![SECRET.to_vec()]);
        // An SSE event goes out at once: its end cannot start the secret.
        assert_eq!(&s.feed(b"data: hello\n\n")[..], b"data: hello\n\n");
        // A possible start is held until it is known not to be one.
        assert_eq!(&s.feed(b"data: sk-li")[..], b"data: ");
        assert_eq!(&s.feed(b"ve-x\n\n")[..], b"sk-live-x\n\n");
        assert!(s.finish().is_empty());
        assert_eq!(s.masked, 0);
        assert_eq!(
            s.mask_all(b"token=sk-live-0123456789;").as_deref(),
            Some(&b"token=******************;"[..])
        );
        assert_eq!(s.mask_all(b"nothing"), None);
    }
}
