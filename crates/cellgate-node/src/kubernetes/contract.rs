//! A scripted Kubernetes API server for tests and examples: kube-rs's mocked service
//! (`tower_test::mock::pair`) answering the calls the node's watches make, with the API server's
//! own shapes, and recording every call (method, URI, body) for assertions.
//!
//! | call | answer |
//! |---|---|
//! | `GET /apis/cellgate.dev/v1alpha1/agentcells?…` (list) | `AgentCellList` with the items of [`ApiServer::set_list`] |
//! | `GET /api/v1/pods?labelSelector=…&fieldSelector=…` (list) | `PodList` |
//! | `GET /api/v1/namespaces/NS/configmaps?fieldSelector=metadata.name%3D…` (list) | `ConfigMapList` |
//! | the same with `watch=true` | 200 and a body kept open: one JSON line per [`ApiServer::send`] (`{"type":"ADDED","object":…}`) |
//! | `GET /apis/cellgate.dev/v1alpha1/cellgateclusterpolicies?…`, `…/cellgatepolicies?…` (list, watch) | as above |
//! | `GET /api/v1/namespaces/NS/configmaps/NAME` | the ConfigMap of [`ApiServer::put_configmap`] (e.g. a policy snapshot) |
//! | `PATCH /apis/cellgate.dev/v1alpha1/namespaces/NS/agentcells/NAME/status` | the last object sent with that name, with the patch's status |
//! | `PATCH /apis/coordination.k8s.io/v1/namespaces/NS/leases/NAME` (the node's CA report) | the patch, as the object |
//! | anything else | 404 `Status` |
//!
//! Objects sent get an increasing `metadata.resourceVersion`, as the watcher needs one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};

use crate::admin::percent_decode;

/// The response body of the scripted server: whole, or streamed from a channel.
pub type MockBody = UnsyncBoxBody<Bytes, Infallible>;

/// One watched collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Watched {
    /// AgentCells, all namespaces.
    AgentCells,
    /// Pods, all namespaces.
    Pods,
    /// ConfigMaps of one namespace.
    ConfigMaps,
    /// AgentApprovals, all namespaces.
    AgentApprovals,
    /// CellgateClusterPolicies.
    ClusterPolicies,
    /// CellgatePolicies, all namespaces.
    Policies,
}

impl Watched {
    fn of(path: &str) -> Option<Self> {
        if path == "/apis/cellgate.dev/v1alpha1/agentcells" {
            return Some(Self::AgentCells);
        }
        if path == "/api/v1/pods" {
            return Some(Self::Pods);
        }
        if path == "/apis/cellgate.dev/v1alpha1/agentapprovals" {
            return Some(Self::AgentApprovals);
        }
        if path == "/apis/cellgate.dev/v1alpha1/cellgateclusterpolicies" {
            return Some(Self::ClusterPolicies);
        }
        if path == "/apis/cellgate.dev/v1alpha1/cellgatepolicies" {
            return Some(Self::Policies);
        }
        let rest = path.strip_prefix("/api/v1/namespaces/")?;
        let (_, tail) = rest.split_once('/')?;
        (tail == "configmaps").then_some(Self::ConfigMaps)
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::AgentCells => ("cellgate.dev/v1alpha1", "AgentCellList"),
            Self::Pods => ("v1", "PodList"),
            Self::ConfigMaps => ("v1", "ConfigMapList"),
            Self::AgentApprovals => ("cellgate.dev/v1alpha1", "AgentApprovalList"),
            Self::ClusterPolicies => ("cellgate.dev/v1alpha1", "CellgateClusterPolicyList"),
            Self::Policies => ("cellgate.dev/v1alpha1", "CellgatePolicyList"),
        }
    }
}

/// A call the server received.
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method.
    pub method: http::Method,
    /// Path and query, as sent.
    pub uri: String,
    /// Request body (JSON for patches).
    pub body: Vec<u8>,
    /// `content-type` header.
    pub content_type: Option<String>,
}

impl Call {
    /// The query parameters, percent-decoded.
    pub fn query(&self) -> HashMap<String, String> {
        let q = self.uri.split_once('?').map(|(_, q)| q).unwrap_or_default();
        q.split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.uri
            .split_once('?')
            .map(|(p, _)| p)
            .unwrap_or(&self.uri)
    }
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    lists: HashMap<Watched, Vec<serde_json::Value>>,
    /// Open watches: the collection, the `fieldSelector` (only `metadata.name=NAME`), the stream.
    watches: Vec<(
        Watched,
        Option<String>,
        tokio::sync::mpsc::UnboundedSender<Bytes>,
    )>,
    objects: HashMap<(String, String), serde_json::Value>,
    /// ConfigMaps answered to a GET by name: (namespace, name) → object.
    configmaps: HashMap<(String, String), serde_json::Value>,
    resource_version: u64,
    /// Refuse every create of an AgentApproval (403), as an API server without the CRD or the
    /// grant would.
    refuse_approvals: bool,
}

/// The scripted API server; dropping it stops answering.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiServer")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(status: u16, v: &serde_json::Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .unwrap_or_default()
}

fn not_found(uri: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource ({uri})"),
        "reason": "NotFound", "code": 404,
    })
}

impl ApiServer {
    /// A client whose every call this server answers.
    pub fn start() -> (kube::Client, Self) {
        let (svc, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        let client = kube::Client::new(svc, "default");
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (st, ch) = (state.clone(), changed.clone());
        let task = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .unwrap_or_default();
                let call = Call {
                    method: parts.method.clone(),
                    uri: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    body,
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                };
                let resp = answer(&st, &call);
                if let Ok(mut s) = st.lock() {
                    s.calls.push(call);
                }
                ch.notify_waiters();
                send.send_response(resp);
            }
        });
        (
            client,
            Self {
                state,
                changed,
                task,
            },
        )
    }

    /// The items the first (and every later) list of `what` returns.
    pub fn set_list(&self, what: Watched, items: Vec<serde_json::Value>) {
        if let Ok(mut s) = self.state.lock() {
            let items = items
                .into_iter()
                .map(|mut o| {
                    s.resource_version += 1;
                    o["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
                    remember(&mut s, what, &o);
                    o
                })
                .collect();
            s.lists.insert(what, items);
        }
    }

    /// Waits (bounded, 10 s) until the node's watch of `what` is open.
    ///
    /// # Panics
    /// When it does not open in time.
    pub async fn watch_opened(&self, what: Watched) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.changed.notified();
            if self
                .state
                .lock()
                .map(|s| s.watches.iter().any(|(w, _, _)| *w == what))
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the {what:?} watch did not open; calls: {:#?}",
                self.calls()
            );
        }
    }

    /// Sends one watch event (`ADDED`, `MODIFIED`, `DELETED`) of `object` on the open watch of
    /// `what`; returns whether a watch was open to take it.
    pub fn send(&self, what: Watched, type_: &str, mut object: serde_json::Value) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        s.resource_version += 1;
        object["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
        remember(&mut s, what, &object);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut line = serde_json::json!({"type": type_, "object": object}).to_string();
        line.push('\n');
        let line = Bytes::from(line);
        let mut taken = false;
        for (w, selector, tx) in &s.watches {
            if *w == what && selects(selector.as_deref(), &name) && tx.send(line.clone()).is_ok() {
                taken = true;
            }
        }
        taken
    }

    /// A ConfigMap a GET by name answers (snapshots are read this way, not watched).
    pub fn put_configmap(&self, object: serde_json::Value) {
        if let Ok(mut s) = self.state.lock() {
            s.resource_version += 1;
            let mut object = object;
            object["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
            let key = (
                object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            s.configmaps.insert(key, object);
        }
    }

    /// From now on, refuses (`true`) or takes every create of an AgentApproval.
    pub fn refuse_approvals(&self, refuse: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.refuse_approvals = refuse;
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state
            .lock()
            .map(|s| s.calls.clone())
            .unwrap_or_default()
    }

    /// Waits (bounded) for a call matching `pred` and returns it.
    ///
    /// # Panics
    /// When none comes within `within`.
    pub async fn wait_call(&self, within: Duration, pred: impl Fn(&Call) -> bool) -> Call {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            if let Some(c) = self.calls().into_iter().find(|c| pred(c)) {
                return c;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "no matching call within {within:?}; calls: {:#?}",
                self.calls()
            );
        }
    }
}

/// An AgentCell as the API server returns it.
pub fn agent_cell(
    namespace: &str,
    name: &str,
    uid: &str,
    generation: i64,
    spec: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation},
        "spec": spec,
    })
}

/// The cell's pod as the operator makes it (label, owner reference), on `node` at `ip`, in
/// `phase`.
pub fn cell_pod(
    namespace: &str,
    cell: &str,
    cell_uid: &str,
    node: &str,
    ip: &str,
    phase: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": cell, "namespace": namespace, "uid": format!("pod-{cell_uid}"),
            "labels": {"cellgate.dev/cell": cell},
            "ownerReferences": [{"apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
                                  "name": cell, "uid": cell_uid, "controller": true}],
        },
        "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "agent:1"}]},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// The lockdown ConfigMap: `cluster` (node-wide) and `namespace.NS` entries with `reason`.
pub fn lockdown(namespace: &str, entries: &[(&str, &str)]) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(k, reason)| {
            let v = serde_json::json!({"reason": reason, "since": "2026-12-02T08:00:00Z", "by": "alice@example.com"});
            ((*k).to_string(), v.to_string().into())
        })
        .collect();
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": cellgate_api::crd::LOCKDOWN_CONFIGMAP, "namespace": namespace},
        "data": data,
    })
}

/// The revocations ConfigMap listing `jtis` (value: an expiry).
pub fn revocations(namespace: &str, jtis: &[&str]) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> = jtis
        .iter()
        .map(|j| ((*j).to_string(), "2099-01-01T00:00:00Z".into()))
        .collect();
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": cellgate_api::crd::REVOCATIONS_CONFIGMAP, "namespace": namespace},
        "data": data,
    })
}

fn remember(s: &mut State, what: Watched, o: &serde_json::Value) {
    if what == Watched::AgentCells {
        let ns = o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        s.objects.insert((ns, name), o.clone());
    }
}

/// Whether a `fieldSelector` (none, or `metadata.name=NAME`) selects an object named `name`.
fn selects(selector: Option<&str>, name: &str) -> bool {
    selector
        .and_then(|f| f.strip_prefix("metadata.name="))
        .is_none_or(|n| n == name)
}

fn answer(state: &Mutex<State>, call: &Call) -> Response<MockBody> {
    let Ok(mut s) = state.lock() else {
        return json(500, &not_found(&call.uri));
    };
    let path = call.path().to_string();
    if call.method == http::Method::GET {
        if let Some(what) = Watched::of(&path) {
            if call.query().get("watch").map(String::as_str) == Some("true") {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
                let selector = call.query().get("fieldSelector").cloned();
                // A watch re-opened with the same selector replaces the old one.
                s.watches
                    .retain(|(w, sel, _)| !(*w == what && *sel == selector));
                s.watches.push((what, selector, tx));
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    let b = rx.recv().await?;
                    Some((Ok::<_, Infallible>(http_body::Frame::data(b)), rx))
                });
                return Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap_or_default();
            }
            let (api_version, kind) = what.list_kind();
            let selector = call.query().get("fieldSelector").cloned();
            let items: Vec<serde_json::Value> = s
                .lists
                .get(&what)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| {
                    selects(
                        selector.as_deref(),
                        o["metadata"]["name"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            let rv = s.resource_version.max(1).to_string();
            return json(
                200,
                &serde_json::json!({
                    "apiVersion": api_version, "kind": kind,
                    "metadata": {"resourceVersion": rv}, "items": items,
                }),
            );
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if call.method == http::Method::GET {
        if let ["api", "v1", "namespaces", ns, "configmaps", name] = segments.as_slice() {
            return match s.configmaps.get(&((*ns).to_string(), (*name).to_string())) {
                Some(cm) => json(200, cm),
                None => json(404, &not_found(&call.uri)),
            };
        }
    }
    if let ["apis", "cellgate.dev", "v1alpha1", "namespaces", ns, "agentapprovals", rest @ ..] =
        segments.as_slice()
    {
        match (&call.method, rest) {
            (&http::Method::POST, []) if s.refuse_approvals => {
                return json(
                    403,
                    &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Forbidden", "code": 403,
                        "message": "agentapprovals.cellgate.dev is forbidden"}),
                );
            }
            (&http::Method::POST, []) => {
                let mut obj: serde_json::Value =
                    serde_json::from_slice(&call.body).unwrap_or_default();
                obj["metadata"]["namespace"] = (*ns).into();
                s.resource_version += 1;
                obj["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
                return json(201, &obj);
            }
            (&http::Method::DELETE, [name]) => {
                return json(
                    200,
                    &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": {"name": name, "kind": "agentapprovals"}}),
                );
            }
            _ => {}
        }
    }
    if call.method == http::Method::PATCH {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if let ["apis", "cellgate.dev", "v1alpha1", "namespaces", ns, "agentcells", name, "status"] =
            parts.as_slice()
        {
            let patch: serde_json::Value = serde_json::from_slice(&call.body).unwrap_or_default();
            let mut obj = s
                .objects
                .get(&((*ns).to_string(), (*name).to_string()))
                .cloned()
                .unwrap_or_else(|| {
                    serde_json::json!({
                        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
                        "metadata": {"name": name, "namespace": ns}, "spec": {},
                    })
                });
            obj["status"] = patch["status"].clone();
            return json(200, &obj);
        }
    }
    if call.method == http::Method::PATCH {
        if let ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", _] =
            segments.as_slice()
        {
            let mut obj: serde_json::Value = serde_json::from_slice(&call.body).unwrap_or_default();
            obj["metadata"]["namespace"] = (*ns).into();
            s.resource_version += 1;
            obj["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
            return json(200, &obj);
        }
    }
    json(404, &not_found(&call.uri))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        let c = Call {
            method: http::Method::GET,
            uri: "/api/v1/pods?labelSelector=cellgate.dev%2Fcell&watch=true".into(),
            body: Vec::new(),
            content_type: None,
        };
        assert_eq!(c.path(), "/api/v1/pods");
        assert_eq!(c.query()["labelSelector"], "cellgate.dev/cell");
        assert_eq!(Watched::of(c.path()), Some(Watched::Pods));
        assert_eq!(
            Watched::of("/api/v1/namespaces/cellgate-system/configmaps"),
            Some(Watched::ConfigMaps)
        );
    }
}
