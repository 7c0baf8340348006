//! Per-task identity for Cellgate.
//!
//! A cell's token is an EdDSA (Ed25519) JWT issued by the control plane (or by `cellgate token
//! issue` in local mode), audience [`AUDIENCE`], carrying the cell's uid, namespace, name and
//! role, a unique id (`jti`), its validity window, and optionally the pod address it is bound to.
//! The tagger sidecar carries it to the node in a PPv2 TLV; the node checks it with a
//! [`Verifier`] built from the trusted public keys (`signing.pub` files), selected by key id.
//!
//! - [`keys`]: generating and reading signing keys and their public halves.
//! - [`token`]: claims, issuing, and verification with one [`TokenError`] variant per reason.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod keys;
pub mod token;

pub use keys::{PublicKey, SigningKey};
pub use token::{Claims, TokenError, Verifier, AUDIENCE, MAX_TOKEN_LEN};
