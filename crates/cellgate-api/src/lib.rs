//! Cellgate's bottom layer: types with no I/O.
//!
//! - [`manifest`]: the `AgentCell` YAML as users write it, parsed strictly with errors naming the
//!   field path, and normalized into [`model::Cell`], the one internal model every front end uses.
//! - [`policy`]: the versioned policy input and decision documents exchanged with the Rego engine.
//!
//! Start reading at [`manifest::parse_agent_cell`].

pub mod manifest;
pub mod model;
pub mod policy;
