//! `kubectl cellgate ca rotate|status`: starting a rotation of the interception CA, and watching
//! it.
//!
//! Like the other kubectl commands, these talk to the API server, never to the operator: the
//! operator keeps the rotation's state in the ConfigMap `cellgate-ca-rotation` of the control
//! namespace and acts on it (`cellgate_operator::ca`); `rotate` only writes the key `request` of
//! the ConfigMap `cellgate-ca-rotation-request` (server-side apply, field manager
//! `kubectl-cellgate`, on the resourceVersion it read), and `status` reads both, the node pods and
//! their report Leases. The contract is
//! `cellgate_api::ca_rotation`; the check of the nodes' reports is the operator's own
//! ([`ca_rotation::check_nodes`]).
//!
//! - [`request_rotation`]: refuses while a rotation is in progress (unless `--force` while the
//!   new CA is only introduced) or while an earlier request waits for the operator.
//! - [`status_text`]: the phase, the CAs with their fingerprints and expiry, which node holds
//!   which, and what the operator waits for.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use cellgate_api::ca_rotation::{
    self, check_nodes, node_pods, NodeReport, Phase, RotateRequest, State, Want, KEY_REQUEST,
    LABEL_NODE_REPORT, NODE_POD_SELECTOR, REQUEST_CONFIGMAP, ROTATION_CONFIGMAP,
};
use cellgate_api::crd::KUBECTL_FIELD_MANAGER;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;

use crate::kubectl::{self, Target};

/// `ca rotate`.
#[derive(Debug, Clone, clap::Args)]
pub struct RotateArgs {
    /// How long the old CA stays trusted (in every cell's bundle) once every node signs with the
    /// new one: a number and s, m, h or d; at most 30d.
    #[arg(long, default_value = "24h")]
    pub grace: String,
    /// While the rotation in progress is only Introduced (its new CA does not sign yet): replace
    /// that new CA by a fresh one and start over. Refused once the new CA signs.
    #[arg(long)]
    pub force: bool,
    /// Namespace the operator and nodes run in.
    #[arg(long, default_value = "cellgate-system")]
    pub control_namespace: String,
    #[command(flatten)]
    pub target: Target,
}

/// `ca status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Namespace the operator and nodes run in.
    #[arg(long, default_value = "cellgate-system")]
    pub control_namespace: String,
    #[command(flatten)]
    pub target: Target,
}

/// The state and the request ConfigMap (both written by the operator when it starts; `None`
/// until then).
async fn read_state(
    client: Client,
    control_ns: &str,
) -> anyhow::Result<Option<(State, ConfigMap)>> {
    let api: Api<ConfigMap> = Api::namespaced(client, control_ns);
    let read = |name: &'static str| {
        let api = api.clone();
        async move {
            api.get_opt(name)
                .await
                .with_context(|| format!("reading ConfigMap {control_ns}/{name}"))
        }
    };
    let Some(cm) = read(ROTATION_CONFIGMAP).await? else {
        return Ok(None);
    };
    let state = State::from_data(cm.data.as_ref().unwrap_or(&Default::default()))
        .map_err(|e| anyhow::anyhow!("ConfigMap {control_ns}/{ROTATION_CONFIGMAP}: {e}"))?;
    let Some(requests) = read(REQUEST_CONFIGMAP).await? else {
        return Ok(None);
    };
    Ok(Some((state, requests)))
}

/// A request not acted on yet.
fn pending(state: &State, requests: &ConfigMap) -> Option<RotateRequest> {
    let r = RotateRequest::from_data(requests.data.as_ref()?)?.ok()?;
    (state.handled.as_deref() != Some(r.id.as_str())).then_some(r)
}

/// Asks the operator to start a rotation with `grace`, as request `id` (unique: the time).
///
/// # Errors
/// A bad `--grace`; no state yet (the operator is not running, or too old); a rotation in
/// progress (with `force`, allowed only while the new CA is introduced); an earlier request the
/// operator has not acted on (unless `force`); a concurrent change (conflict: run it again).
pub async fn request_rotation(
    client: Client,
    control_ns: &str,
    grace: &str,
    force: bool,
    id: &str,
) -> anyhow::Result<String> {
    let request = RotateRequest {
        id: id.to_string(),
        grace: Some(grace.to_string()),
        force,
    };
    request
        .grace()
        .map_err(|e| anyhow::anyhow!("--grace: {e}"))?;
    let Some((state, cm)) = read_state(client.clone(), control_ns).await? else {
        bail!(
            "no CA rotation state in {control_ns}: the operator writes ConfigMaps {ROTATION_CONFIGMAP} and {REQUEST_CONFIGMAP} there when it starts (is cellgate-operator running, and is --control-namespace right?)"
        );
    };
    let since = state.since.as_deref().unwrap_or("?");
    match state.phase {
        Phase::Idle => {}
        Phase::Introduced if force => {}
        Phase::Introduced => bail!(
            "a CA rotation is in progress (phase Introduced since {since}): `kubectl cellgate ca status` shows what it waits for; --force replaces its new CA, which does not sign yet, by a fresh one"
        ),
        phase => bail!(
            "a CA rotation is in progress (phase {phase} since {since}) and its new CA already signs: wait until the phase is Idle (`kubectl cellgate ca status`)"
        ),
    }
    if let Some(p) = pending(&state, &cm) {
        if !force {
            bail!(
                "a rotation was already requested ({}) and the operator has not acted on it yet: is cellgate-operator running? (--force asks again)",
                p.id
            );
        }
    }
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": REQUEST_CONFIGMAP,
            "namespace": control_ns,
            "resourceVersion": cm.metadata.resource_version,
        },
        "data": {KEY_REQUEST: serde_json::to_string(&request)?},
    });
    let api: Api<ConfigMap> = Api::namespaced(client, control_ns);
    let params = PatchParams {
        field_manager: Some(KUBECTL_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(REQUEST_CONFIGMAP, &params, &Patch::Apply(&body))
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => anyhow::anyhow!(
                "ConfigMap {control_ns}/{REQUEST_CONFIGMAP} changed while the request was written: run the command again"
            ),
            e => anyhow::Error::new(e).context(format!("writing the request into {control_ns}/{REQUEST_CONFIGMAP}")),
        })?;
    Ok(format!(
        "CA rotation requested ({id}, grace {grace}{}): the operator introduces a new CA within seconds; follow it with `kubectl cellgate ca status`\n",
        if force { ", forced" } else { "" }
    ))
}

/// The role a fingerprint plays in `state`, or its short form when none.
fn role_of(state: &State, fingerprint: &str) -> String {
    let roles = [
        ("signing", Some(&state.signing)),
        ("next", state.next.as_ref()),
        ("previous", state.previous.as_ref()),
    ];
    roles
        .iter()
        .find(|(_, pem)| {
            pem.is_some_and(|p| {
                cellgate_tls::rotation::fingerprints(p)
                    .first()
                    .is_some_and(|f| f == fingerprint)
            })
        })
        .map_or_else(
            || ca_rotation::short(fingerprint).to_string(),
            |(r, _)| (*r).to_string(),
        )
}

/// The rotation as text: phase, times, what the operator waits for, the CAs, and every node pod
/// with what it has loaded, what it signs with, the token keys it trusts, and whether it is
/// ready for the phase's next step.
///
/// # Errors
/// When the API server refuses, or the state does not parse.
pub async fn status_text(client: Client, control_ns: &str) -> anyhow::Result<String> {
    let Some((state, cm)) = read_state(client.clone(), control_ns).await? else {
        return Ok(format!(
            "no CA rotation state in {control_ns} yet: the operator writes ConfigMaps {ROTATION_CONFIGMAP} and {REQUEST_CONFIGMAP} when it starts\n"
        ));
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Phase:        {} (since {})",
        state.phase,
        state.since.as_deref().unwrap_or("?")
    );
    if let Some(g) = &state.grace {
        let _ = writeln!(out, "Grace:        {g}");
    }
    if let Some(t) = &state.retire_after {
        let _ = writeln!(out, "Retire after: {t}");
    }
    if let Some(w) = &state.waiting {
        let _ = writeln!(out, "Waiting for:  {w}");
    }
    if let Some(p) = pending(&state, &cm) {
        let _ = writeln!(
            out,
            "Request:      {} (grace {}{}) not acted on yet",
            p.id,
            p.grace.as_deref().unwrap_or("24h"),
            if p.force { ", forced" } else { "" }
        );
    } else if let (Some(id), Some(o)) = (&state.handled, &state.outcome) {
        let _ = writeln!(out, "Last request: {id}: {o}");
    }

    let _ = writeln!(out, "\nCAs (published in every cell's bundle):");
    let mut rows = vec![[
        "ROLE".to_string(),
        "SHA-256 FINGERPRINT".to_string(),
        "SUBJECT".to_string(),
        "NOT AFTER".to_string(),
    ]];
    for (role, pem) in [
        ("previous", state.previous.as_ref()),
        ("signing", Some(&state.signing)),
        ("next", state.next.as_ref()),
    ] {
        let Some(pem) = pem else { continue };
        for info in cellgate_tls::rotation::describe(pem)
            .map_err(|e| anyhow::anyhow!("{role} CA of {ROTATION_CONFIGMAP}: {e}"))?
        {
            rows.push([
                role.to_string(),
                info.fingerprint,
                info.subject,
                cellgate_tls::rotation::utc_text(info.not_after),
            ]);
        }
    }
    out.push_str(&kubectl::table(&rows));

    let pods: Api<Pod> = Api::namespaced(client.clone(), control_ns);
    let pods = pods
        .list(&ListParams::default().labels(NODE_POD_SELECTOR))
        .await
        .with_context(|| format!("listing the node pods in {control_ns}"))?;
    let leases: Api<Lease> = Api::namespaced(client, control_ns);
    let reports: Vec<NodeReport> = leases
        .list(&ListParams::default().labels(&format!("{LABEL_NODE_REPORT}=ca")))
        .await
        .with_context(|| format!("listing the node reports in {control_ns}"))?
        .items
        .iter()
        .filter_map(NodeReport::from_lease)
        .collect();
    let new_fp = state
        .new_ca()
        .map(cellgate_tls::rotation::first_fingerprint);
    let signing_fp = cellgate_tls::rotation::first_fingerprint(&state.signing);
    let want = match (state.phase, &new_fp) {
        (Phase::Introduced, Some(fp)) => Want::Loaded(fp),
        _ => Want::Signing(&signing_fp),
    };
    let pods = node_pods(&pods.items);
    let _ = writeln!(
        out,
        "\nNodes ({}: {}):",
        pods.len(),
        match want {
            Want::Loaded(_) => "each must have loaded the next CA",
            Want::Signing(_) => "each must sign with the signing CA",
        }
    );
    if pods.is_empty() {
        let _ = writeln!(
            out,
            "none found in {control_ns} with labels {NODE_POD_SELECTOR}"
        );
    } else {
        let mut rows = vec![[
            "NODE".to_string(),
            "POD".to_string(),
            "LOADED".to_string(),
            "SIGNING".to_string(),
            "TOKEN KEYS".to_string(),
            "REPORTED".to_string(),
            "READY".to_string(),
        ]];
        for (p, check) in check_nodes(&pods, &reports, want) {
            let report = reports.iter().find(|r| r.node == p.node && r.pod == p.pod);
            let dash = || "-".to_string();
            rows.push([
                if p.node.is_empty() {
                    dash()
                } else {
                    p.node.clone()
                },
                p.pod.clone(),
                report.map_or_else(dash, |r| {
                    r.loaded
                        .iter()
                        .map(|f| role_of(&state, f))
                        .collect::<Vec<_>>()
                        .join(",")
                }),
                report.map_or_else(dash, |r| role_of(&state, &r.signing)),
                report.map_or_else(dash, |r| r.token_keys.join(",")),
                report.and_then(|r| r.time.clone()).unwrap_or_else(dash),
                if check.is_ready() {
                    "yes".to_string()
                } else {
                    format!("no: {}", check.describe(want))
                },
            ]);
        }
        out.push_str(&kubectl::table(&rows));
    }
    Ok(out)
}

/// `ca rotate`.
pub async fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let (client, _) = kubectl::connect(&args.target).await?;
    let id = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    print!(
        "{}",
        request_rotation(
            client,
            &args.control_namespace,
            &args.grace,
            args.force,
            &id
        )
        .await?
    );
    Ok(ExitCode::SUCCESS)
}

/// `ca status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (client, _) = kubectl::connect(&args.target).await?;
    print!("{}", status_text(client, &args.control_namespace).await?);
    Ok(ExitCode::SUCCESS)
}
