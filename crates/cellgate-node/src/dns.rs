//! The node's DNS listener for cells: `cellgate-dns` plugged into the node's cells, resolution
//! (`--resolve`, then the system resolver) and audit log.
//!
//! Cells are told apart by source address: the pod addresses come from `--pod ADDR=NS/NAME`
//! (local mode registers its cell this way), and from every intake connection whose verified token
//! is bound to its source address.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Weak};

use cellgate_api::model::Cell;
use cellgate_audit::{Decision, Record};

use crate::Shared;

struct NodeCells(Weak<Shared>);
struct NodeResolve(Weak<Shared>);
struct NodeAudit(Weak<Shared>);

impl cellgate_dns::Cells for NodeCells {
    fn cell_for(&self, source: IpAddr) -> Option<Arc<Cell>> {
        let shared = self.0.upgrade()?;
        let uid = shared
            .pods
            .read()
            .ok()?
            .get(&source.to_canonical())
            .cloned()?;
        shared.cells.get(&uid).map(|e| e.cell.clone())
    }

    /// The same engine as every request: the lockdown, then the policy's `dns` branch (with its
    /// layers), for the cell's identity as the node knows it (a DNS query carries no token).
    fn may_resolve(
        &self,
        cell: &Cell,
        source: IpAddr,
        host: &str,
        qtype: &str,
    ) -> Result<(), String> {
        use cellgate_api::policy::{AddrDoc, CellDoc, IdentityDoc, InputDoc, RequestDoc};
        let shared = self.0.upgrade().ok_or("the node is shutting down")?;
        let entry = shared
            .cells
            .get(&cell.uid)
            .ok_or_else(|| format!("cell {} is not known to this node", cell.key()))?;
        if let Some(lock) = shared.lockdown.applies(&cell.namespace) {
            return Err(format!("lockdown: {}", lock.reason));
        }
        let policy = shared
            .policy
            .current()
            .ok_or("this node has no valid policy and denies everything")?;
        let input = InputDoc {
            version: cellgate_api::policy::INPUT_VERSION.into(),
            time_ns: crate::decide::now_ms().saturating_mul(1_000_000),
            front_door: "dns".into(),
            source: AddrDoc {
                address: source.to_canonical().to_string(),
                port: 0,
            },
            identity: IdentityDoc {
                jti: String::new(),
                cell_uid: cell.uid.clone(),
                namespace: cell.namespace.clone(),
                name: cell.name.clone(),
                role: cell.role.clone(),
            },
            cell: CellDoc::default(),
            request: RequestDoc {
                protocol: "dns".into(),
                host: Some(host.to_string()),
                port: 53,
                sni: None,
                method: None,
                path: None,
                query: None,
                headers: Default::default(),
                destination: AddrDoc::default(),
                dns_type: Some(qtype.to_string()),
                json: None,
            },
        };
        match policy.evaluate_with_cell(&input, &entry.value) {
            Ok(d) if d.allow => Ok(()),
            Ok(d) => Err(d.reasons.first().cloned().unwrap_or(d.reason)),
            Err(e) => Err(format!("policy evaluation failed: {e}")),
        }
    }
}

impl cellgate_dns::Resolve for NodeResolve {
    fn lookup(
        &self,
        name: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + '_>> {
        let name = name.to_string();
        Box::pin(async move {
            let shared = self
                .0
                .upgrade()
                .ok_or_else(|| std::io::Error::other("node is shutting down"))?;
            let addrs: Vec<IpAddr> = match shared.config.resolve.iter().find(|e| e.host == name) {
                Some(e) => vec![e.addr],
                None => tokio::net::lookup_host((name.as_str(), 0))
                    .await?
                    .map(|a| a.ip())
                    .collect(),
            };
            Ok(match shared.config.dns_loopback_as {
                Some(sub) => addrs
                    .into_iter()
                    .map(|a| if a.is_loopback() { sub } else { a })
                    .collect(),
                None => addrs,
            })
        })
    }
}

impl cellgate_dns::Audit for NodeAudit {
    fn refused(&self, event: cellgate_dns::DnsEvent) -> cellgate_dns::AuditAck {
        let Some(shared) = self.0.upgrade() else {
            return Box::pin(async { Err("the node is shutting down".to_string()) });
        };
        let decision = if event.reason == "dns_allowed" {
            Decision::Allow
        } else {
            Decision::Deny
        };
        shared
            .metrics
            .decision(crate::decide::decision_label(decision), event.reason, "dns");
        let mut rec = Record::new(
            &shared.config.node_name,
            "dns",
            "dns",
            decision,
            event.reason,
        );
        rec.source = Some(event.source.to_string());
        if let Some((ns, name)) = event.cell {
            rec.namespace = Some(ns);
            rec.cell = Some(name);
        }
        rec.host = Some(event.name);
        rec.method = Some(event.qtype);
        rec.reasons = vec![event.detail];
        let log = shared.audit.clone();
        if decision == Decision::Allow
            && shared.config.audit_durability == crate::config::AuditDurability::Relaxed
        {
            // Allows are queued, as on the intake; a full queue still fails the answer closed.
            let queued = log.submit(rec).map_err(|e| e.to_string());
            return Box::pin(async move { queued });
        }
        // A refusal (and with --audit-durability strict, an answer too) is written and synced
        // before the resolver answers, as a 403 is. Queued now, so it is recorded even when no
        // answer follows (a closed connection).
        match log.submit_durable_now(rec) {
            Ok(synced) => Box::pin(async move { synced.await.map_err(|e| e.to_string()) }),
            Err(e) => Box::pin(async move { Err(e.to_string()) }),
        }
    }
}

/// Starts the DNS listener on `addr`.
///
/// # Errors
/// When it cannot bind.
pub async fn start(
    shared: &Arc<Shared>,
    addr: SocketAddr,
) -> std::io::Result<cellgate_dns::DnsServer> {
    let config = cellgate_dns::DnsConfig {
        listen: addr,
        ..Default::default()
    };
    let weak = Arc::downgrade(shared);
    cellgate_dns::serve(
        config,
        Arc::new(NodeCells(weak.clone())),
        Arc::new(NodeResolve(weak.clone())),
        Arc::new(NodeAudit(weak)),
    )
    .await
}
