//! Cellgate's bottom layer: types with no I/O.
//!
//! - [`manifest`]: the `AgentCell` YAML as users write it, parsed strictly with errors naming the
//!   field path, and normalized into [`model::Cell`], the one internal model every front end uses.
//! - [`crd`]: the Kubernetes custom resource, its status, and the names operator, nodes and kubectl
//!   plugin agree on.
//! - [`policy`]: the versioned policy input and decision documents exchanged with the Rego engine.
//! - [`policy_pack`]: the `CellgatePolicy` and `CellgateClusterPolicy` resources (policy packs in
//!   Kubernetes), their status and history, and the files a pack adds to a node's policy set.
//! - [`path`]: the canonical form of HTTP request paths, which the node decides on and forwards.
//! - [`ca_rotation`]: the interception CA's rotation: its state, the request that starts it, the
//!   nodes' reports, and the check of those reports.
//!
//! Start reading at [`manifest::parse_agent_cell`].

pub mod ca_rotation;
pub mod crd;
pub mod manifest;
pub mod model;
pub mod path;
pub mod policy;
pub mod policy_pack;
