//! The cross-node audit query: `GET /api/v1/audit`.
//!
//! The operator asks every running `cellgate-node` pod of the control namespace for the
//! matching records (`/audit` on its admin port 15021, through the API server's pod proxy,
//! with the node admin token from the Secret `cellgate-admin-token`), merges the answers by
//! time and writes them as NDJSON, oldest first.
//!
//! Paging: the answer's `X-Cellgate-Cursor` header names, per node, the `seq` of the last
//! record it holds from that node; passing it back as `cursor=` returns the records after
//! those, in time order. Without `since` and `cursor` the answer is the most recent `limit`
//! records (and its cursor follows on from them); with `since` (or a cursor) it pages forward.
//! The merge takes, from each node, records in that node's file order, so no record is skipped
//! or repeated between pages.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client};

/// The node's admin port, where `/audit` is served.
pub const NODE_ADMIN_PORT: u16 = 15021;
/// Labels of the node DaemonSet's pods.
pub const NODE_POD_SELECTOR: &str =
    "app.kubernetes.io/name=cellgate,app.kubernetes.io/component=node";
/// The Secret (control namespace) holding the node admin token, and its key.
pub const ADMIN_TOKEN_SECRET: &str = "cellgate-admin-token";
/// Key of [`ADMIN_TOKEN_SECRET`].
pub const ADMIN_TOKEN_KEY: &str = "token";
/// Records per page when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 100;
/// Most records per page (the node's own cap too).
pub const MAX_LIMIT: usize = 1000;
/// Longest cursor accepted, bytes (a few hundred nodes' worth).
pub const MAX_CURSOR_LEN: usize = 32 * 1024;
const DECISIONS: [&str; 6] = [
    "allow",
    "deny",
    "error",
    "shadow_deny",
    "approval",
    "control",
];

/// The query parameters as they arrive.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AuditParams {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this cell, `NAMESPACE/NAME`.
    pub cell: Option<String>,
    /// RFC 3339 time or a duration back from now (`1h`).
    pub since: Option<String>,
    /// RFC 3339 time or a duration back from now (exclusive).
    pub until: Option<String>,
    /// Comma-separated decisions.
    pub decision: Option<String>,
    /// The record's reason label.
    pub reason: Option<String>,
    /// The record's host.
    pub host: Option<String>,
    /// Records per page.
    pub limit: Option<String>,
    /// From a previous answer's `X-Cellgate-Cursor`.
    pub cursor: Option<String>,
}

/// A validated query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// The namespace it is about (for authorization), from `namespace` or `cell`.
    pub namespace: Option<String>,
    /// The node query's filter parameters (already validated), without `after` and `limit`.
    pub filters: Vec<(&'static str, String)>,
    /// Records per page.
    pub limit: usize,
    /// Per node: the last `seq` already read.
    pub cursor: BTreeMap<String, u64>,
    /// Page forward (a `since` or a cursor) rather than take the most recent.
    pub forward: bool,
}

/// Why a query was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

fn time_param(name: &str, value: &str, now: jiff::Timestamp) -> Result<String, QueryError> {
    let v = value.trim();
    if let Ok(t) = v.parse::<jiff::Timestamp>() {
        return Ok(t.to_string());
    }
    let d = humantime::parse_duration(v).map_err(|_| {
        QueryError(format!(
            "{name}={value:?}: expected an RFC 3339 time (2030-01-01T00:00:00Z) or a duration back from now (1h)"
        ))
    })?;
    let d = jiff::SignedDuration::try_from(d)
        .map_err(|_| QueryError(format!("{name}={value:?}: duration out of range")))?;
    now.checked_sub(d)
        .map(|t| t.to_string())
        .map_err(|_| QueryError(format!("{name}={value:?}: duration out of range")))
}

impl AuditQuery {
    /// Validates the parameters; `now` turns durations into times.
    ///
    /// # Errors
    /// [`QueryError`] naming the bad parameter.
    pub fn parse(p: &AuditParams, now: jiff::Timestamp) -> Result<Self, QueryError> {
        let mut filters = Vec::new();
        let nonempty = |name: &str, v: &Option<String>| -> Result<Option<String>, QueryError> {
            match v.as_deref().map(str::trim) {
                None => Ok(None),
                Some("") => Err(QueryError(format!(
                    "{name}= is empty: leave it out to match everything"
                ))),
                Some(s) => Ok(Some(s.to_string())),
            }
        };
        let mut namespace = nonempty("namespace", &p.namespace)?;
        if let Some(ns) = &namespace {
            filters.push(("namespace", ns.clone()));
        }
        if let Some(cell) = nonempty("cell", &p.cell)? {
            let Some((ns, name)) = cell
                .split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            else {
                return Err(QueryError(format!(
                    "cell={cell:?}: expected NAMESPACE/NAME"
                )));
            };
            if namespace.as_deref().is_some_and(|n| n != ns) {
                return Err(QueryError(format!(
                    "cell={cell:?} is not in namespace={}",
                    namespace.unwrap_or_default()
                )));
            }
            namespace = Some(ns.to_string());
            filters.push(("cell", format!("{ns}/{name}")));
        }
        let since = p
            .since
            .as_deref()
            .map(|v| time_param("since", v, now))
            .transpose()?;
        if let Some(s) = &since {
            filters.push(("since", s.clone()));
        }
        if let Some(u) = p.until.as_deref() {
            filters.push(("until", time_param("until", u, now)?));
        }
        if let Some(d) = nonempty("decision", &p.decision)? {
            let mut list: Vec<&str> = Vec::new();
            for x in d.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                if !DECISIONS.contains(&x) {
                    return Err(QueryError(format!(
                        "decision={d:?}: expected {} (comma-separated)",
                        DECISIONS.join(", ")
                    )));
                }
                if !list.contains(&x) {
                    list.push(x);
                }
            }
            filters.push(("decision", list.join(",")));
        }
        if let Some(r) = nonempty("reason", &p.reason)? {
            filters.push(("reason", r));
        }
        if let Some(h) = nonempty("host", &p.host)? {
            filters.push(("host", h));
        }
        let limit = match p.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(l) => match l.trim().parse::<usize>() {
                Ok(n) if n > 0 => n.min(MAX_LIMIT),
                _ => {
                    return Err(QueryError(format!(
                        "limit={l:?}: expected a number from 1 to {MAX_LIMIT}"
                    )))
                }
            },
        };
        let cursor = match p.cursor.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
            None => BTreeMap::new(),
            Some(c) => decode_cursor(c)?,
        };
        let forward = since.is_some() || p.cursor.as_deref().is_some_and(|c| !c.trim().is_empty());
        Ok(Self {
            namespace,
            filters,
            limit,
            cursor,
            forward,
        })
    }

    /// The node's `/audit` query string for node `node`.
    pub fn node_query(&self, node: &str) -> String {
        let mut parts: Vec<String> = self
            .filters
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        parts.push(format!("limit={}", self.limit));
        if self.forward {
            // A node new to the cursor is read from its start (within `since`).
            parts.push(format!(
                "after={}",
                self.cursor.get(node).copied().unwrap_or(0)
            ));
        }
        parts.join("&")
    }
}

/// Encodes a cursor: per node, the last `seq` read.
pub fn encode_cursor(cursor: &BTreeMap<String, u64>) -> String {
    let v = serde_json::json!({ "v": 1, "after": cursor });
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Decodes a cursor from [`encode_cursor`].
///
/// # Errors
/// [`QueryError`] when it is not one.
pub fn decode_cursor(text: &str) -> Result<BTreeMap<String, u64>, QueryError> {
    let bad = || QueryError("cursor: not a cursor from X-Cellgate-Cursor".into());
    if text.len() > MAX_CURSOR_LEN {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if v.get("v").and_then(|x| x.as_u64()) != Some(1) {
        return Err(bad());
    }
    serde_json::from_value(v.get("after").cloned().unwrap_or_default()).map_err(|_| bad())
}

/// Percent-encodes a query component (everything but unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One record as read from a node.
#[derive(Debug, Clone)]
struct Line {
    time: Option<jiff::Timestamp>,
    seq: u64,
    text: String,
}

fn parse_lines(body: &str) -> Vec<Line> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(Line {
                time: v
                    .get("time")
                    .and_then(|t| t.as_str())
                    .and_then(|t| t.parse().ok()),
                seq: v.get("seq").and_then(|s| s.as_u64()).unwrap_or(0),
                text: l.to_string(),
            })
        })
        .collect()
}

/// Merges the nodes' answers (each in its file order) by time. Forward: the first `limit`
/// records, taking from each node in order; otherwise the last `limit`. Returns the lines and
/// the cursor that follows on from them.
pub fn merge(
    answers: Vec<(String, String)>,
    query: &AuditQuery,
) -> (Vec<String>, BTreeMap<String, u64>) {
    let mut cursor = query.cursor.clone();
    let mut lists: Vec<(String, Vec<Line>)> = answers
        .into_iter()
        .map(|(node, body)| (node, parse_lines(&body)))
        .collect();
    // Ties by node name, then seq: the same answer for the same inputs.
    lists.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    if query.forward {
        let mut heads = vec![0usize; lists.len()];
        while out.len() < query.limit {
            let next = lists
                .iter()
                .enumerate()
                .filter_map(|(i, (_, l))| l.get(heads[i]).map(|line| (i, line.time)))
                .min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
            let Some((i, _)) = next else { break };
            let (node, list) = &lists[i];
            let line = &list[heads[i]];
            cursor.insert(node.clone(), line.seq);
            out.push(line.text.clone());
            heads[i] += 1;
        }
    } else {
        let mut tails: Vec<usize> = lists.iter().map(|(_, l)| l.len()).collect();
        for (node, list) in &lists {
            if let Some(last) = list.last() {
                cursor.insert(node.clone(), last.seq);
            }
        }
        while out.len() < query.limit {
            let next = lists
                .iter()
                .enumerate()
                .filter(|(i, _)| tails[*i] > 0)
                .map(|(i, (_, l))| (i, l[tails[i] - 1].time))
                .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
            let Some((i, _)) = next else { break };
            tails[i] -= 1;
            out.push(lists[i].1[tails[i]].text.clone());
        }
        out.reverse();
    }
    (out, cursor)
}

/// Why the fan-out failed (502 or 503).
#[derive(Debug, thiserror::Error)]
pub enum FanOutError {
    /// The node pods or the admin token could not be read.
    #[error("{what}: {source}")]
    Kube {
        /// What was being read.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The admin token Secret has no token.
    #[error("secret {0} has no key token: the nodes' /audit cannot be read")]
    NoToken(String),
    /// A node did not answer.
    #[error("node {node} (pod {pod}) did not answer /audit: {reason}")]
    Node {
        /// Node name.
        node: String,
        /// Pod name.
        pod: String,
        /// Why.
        reason: String,
    },
}

/// Asks every running node pod for `query`, concurrently. Returns `(node, body)` per node.
///
/// # Errors
/// [`FanOutError`] when the pods or token cannot be read or any node fails: an incomplete
/// answer is never given as if it were complete.
pub async fn fan_out(
    client: &Client,
    control_namespace: &str,
    query: &AuditQuery,
) -> Result<Vec<(String, String)>, FanOutError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), control_namespace);
    let list = pods
        .list(&ListParams::default().labels(NODE_POD_SELECTOR))
        .await
        .map_err(|source| FanOutError::Kube {
            what: format!("listing the cellgate-node pods in {control_namespace}"),
            source,
        })?;
    let targets: Vec<(String, String)> = list
        .items
        .iter()
        .filter(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|p| {
            let pod = p.metadata.name.clone()?;
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| pod.clone());
            Some((node, pod))
        })
        .collect();
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), control_namespace);
    let secret = secrets
        .get(ADMIN_TOKEN_SECRET)
        .await
        .map_err(|source| FanOutError::Kube {
            what: format!("reading the node admin token {control_namespace}/{ADMIN_TOKEN_SECRET}"),
            source,
        })?;
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(ADMIN_TOKEN_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| FanOutError::NoToken(format!("{control_namespace}/{ADMIN_TOKEN_SECRET}")))?;
    let calls = targets.into_iter().map(|(node, pod)| {
        let client = client.clone();
        let token = token.clone();
        let uri = format!(
            "/api/v1/namespaces/{control_namespace}/pods/{pod}:{NODE_ADMIN_PORT}/proxy/audit?{}",
            query.node_query(&node)
        );
        async move {
            let request = http::Request::get(uri)
                .header(cellgate_api::crd::ADMIN_TOKEN_HEADER, token)
                .body(Vec::new())
                .map_err(|e| FanOutError::Node {
                    node: node.clone(),
                    pod: pod.clone(),
                    reason: e.to_string(),
                })?;
            match client.request_text(request).await {
                Ok(body) => Ok((node, body)),
                Err(e) => Err(FanOutError::Node {
                    node,
                    pod,
                    reason: e.to_string(),
                }),
            }
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2030-01-01T12:00:00Z".parse().unwrap()
    }

    fn rec(node: &str, seq: u64, secs: u32) -> String {
        serde_json::json!({"node": node, "seq": seq, "time": format!("2030-01-01T00:00:{secs:02}Z")})
            .to_string()
    }

    fn seqs(lines: &[String]) -> Vec<(String, u64)> {
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["node"].as_str().unwrap().to_string(),
                    v["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn parses_filters_durations_and_cursors() {
        let p = AuditParams {
            cell: Some("agents/triage".into()),
            since: Some("1h".into()),
            decision: Some("deny, error,deny".into()),
            host: Some("api.example.com".into()),
            limit: Some("5000".into()),
            ..AuditParams::default()
        };
        let q = AuditQuery::parse(&p, now()).unwrap();
        assert_eq!(q.namespace.as_deref(), Some("agents"));
        assert_eq!(q.limit, MAX_LIMIT);
        assert!(q.forward);
        assert_eq!(
            q.node_query("n1"),
            "cell=agents%2Ftriage&since=2030-01-01T11%3A00%3A00Z&decision=deny%2Cerror&host=api.example.com&limit=1000&after=0"
        );
        let c = encode_cursor(&BTreeMap::from([("n1".to_string(), 7)]));
        let q = AuditQuery::parse(
            &AuditParams {
                cursor: Some(c),
                ..AuditParams::default()
            },
            now(),
        )
        .unwrap();
        assert!(q.forward);
        assert_eq!(q.node_query("n1"), "limit=100&after=7");
        assert_eq!(q.node_query("n2"), "limit=100&after=0");
        let tail = AuditQuery::parse(&AuditParams::default(), now()).unwrap();
        assert!(!tail.forward);
        assert_eq!(tail.node_query("n1"), "limit=100");
        for bad in [
            AuditParams {
                cell: Some("triage".into()),
                ..Default::default()
            },
            AuditParams {
                namespace: Some("a".into()),
                cell: Some("b/c".into()),
                ..Default::default()
            },
            AuditParams {
                since: Some("soon".into()),
                ..Default::default()
            },
            AuditParams {
                decision: Some("maybe".into()),
                ..Default::default()
            },
            AuditParams {
                limit: Some("0".into()),
                ..Default::default()
            },
            AuditParams {
                cursor: Some("!!".into()),
                ..Default::default()
            },
            AuditParams {
                host: Some(" ".into()),
                ..Default::default()
            },
        ] {
            assert!(AuditQuery::parse(&bad, now()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn merges_by_time_and_pages_without_gaps() {
        // Two nodes' records interleaved in time.
        let a = [rec("a", 1, 1), rec("a", 2, 4), rec("a", 3, 6)].join("\n");
        let b = [rec("b", 1, 2), rec("b", 2, 3), rec("b", 3, 5)].join("\n");
        let answers = vec![("b".to_string(), b.clone()), ("a".to_string(), a.clone())];
        let mut q = AuditQuery::parse(&AuditParams::default(), now()).unwrap();
        q.forward = true;
        q.limit = 4;
        let (lines, cursor) = merge(answers.clone(), &q);
        assert_eq!(
            seqs(&lines),
            [
                ("a".into(), 1),
                ("b".into(), 1),
                ("b".into(), 2),
                ("a".into(), 2)
            ]
        );
        assert_eq!(cursor, BTreeMap::from([("a".into(), 2), ("b".into(), 2)]));
        // Tail: the last 4 by time, oldest first; the cursor follows on from each node's last.
        q.forward = false;
        let (lines, cursor) = merge(answers, &q);
        assert_eq!(
            seqs(&lines),
            [
                ("b".into(), 2),
                ("a".into(), 2),
                ("b".into(), 3),
                ("a".into(), 3)
            ]
        );
        assert_eq!(cursor, BTreeMap::from([("a".into(), 3), ("b".into(), 3)]));
    }
}
