//! The revocation list: the ConfigMap `cellgate-revocations` in the control plane's namespace,
//! key = token id (`jti`), value = the token's expiry (RFC 3339). Nodes watch it.
//!
//! The operator adds the tokens of a deleted cell and prunes entries whose expiry has passed
//! (an expired token is refused anyway). It writes with a JSON merge patch of just the keys it
//! changes, so entries written by others (`kubectl cellgate revoke`) are never taken over or
//! dropped; the ConfigMap is created when missing.

use std::collections::BTreeMap;

use cellgate_api::crd::{MANAGED_BY, REVOCATIONS_CONFIGMAP};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use cellgate_identity::token::is_past_expiry;

use crate::token::parse_rfc3339;

/// The keys a write changes: `Some(expiry)` to add, `None` to prune.
pub type Changes = BTreeMap<String, Option<String>>;

/// What to write, given the current entries, the tokens to revoke (`jti`, expiry) and now.
/// Tokens already expired are not added; entries past their expiry are pruned; unparsable values
/// are left alone. "Expired" is the verifier's own rule ([`is_past_expiry`], clock leeway
/// included): an entry stays listed for as long as a node would still accept its token. Empty
/// when nothing changes.
pub fn changes(
    existing: &BTreeMap<String, String>,
    revoke: &[(String, String)],
    now: i64,
) -> Changes {
    let mut out = Changes::new();
    for (jti, expiry) in revoke {
        let live = parse_rfc3339(expiry).is_none_or(|exp| !is_past_expiry(exp, now));
        if live && existing.get(jti) != Some(expiry) && !jti.is_empty() {
            out.insert(jti.clone(), Some(expiry.clone()));
        }
    }
    for (jti, expiry) in existing {
        if parse_rfc3339(expiry).is_some_and(|exp| is_past_expiry(exp, now))
            && !out.contains_key(jti)
        {
            out.insert(jti.clone(), None);
        }
    }
    out
}

/// The merge-patch body for [`changes`] (a `null` value deletes the key).
pub fn merge_patch(changes: &Changes) -> serde_json::Value {
    serde_json::json!({ "data": changes })
}

/// The ConfigMap to create when none exists, holding the additions of `changes`.
pub fn new_configmap(namespace: &str, changes: &Changes) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(REVOCATIONS_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(
            changes
                .iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
                .collect(),
        ),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_live_tokens_and_prunes_expired_entries() {
        let now = 1_893_456_000; // 2030-01-01T00:00:00Z
        let existing = BTreeMap::from([
            ("old".to_string(), "2029-12-31T23:00:00Z".to_string()),
            ("kept".to_string(), "2030-01-02T00:00:00Z".to_string()),
            ("weird".to_string(), "someday".to_string()),
        ]);
        let c = changes(
            &existing,
            &[
                ("new".into(), "2030-01-01T01:00:00Z".into()),
                ("gone".into(), "2029-01-01T00:00:00Z".into()),
                ("kept".into(), "2030-01-02T00:00:00Z".into()),
            ],
            now,
        );
        assert_eq!(
            c,
            BTreeMap::from([
                ("new".to_string(), Some("2030-01-01T01:00:00Z".to_string())),
                ("old".to_string(), None),
            ])
        );
        assert_eq!(
            merge_patch(&c),
            serde_json::json!({"data": {"new": "2030-01-01T01:00:00Z", "old": null}})
        );
        let cm = new_configmap("cellgate-system", &c);
        assert_eq!(
            cm.data,
            Some(BTreeMap::from([(
                "new".to_string(),
                "2030-01-01T01:00:00Z".to_string()
            )]))
        );
        assert!(changes(&BTreeMap::new(), &[], now).is_empty());

        // Within the verifier's clock leeway a token is still accepted by nodes, so it is still
        // added, and an entry for it still kept.
        let just = "2029-12-31T23:59:58Z".to_string(); // 2 s ago, leeway 5 s
        let c = changes(
            &BTreeMap::from([("kept-in-leeway".to_string(), just.clone())]),
            &[("added-in-leeway".to_string(), just.clone())],
            now,
        );
        assert_eq!(
            c,
            BTreeMap::from([("added-in-leeway".to_string(), Some(just.clone()))])
        );
        let later = now + cellgate_identity::token::LEEWAY_SECS + 2;
        let c = changes(
            &BTreeMap::from([("kept-in-leeway".to_string(), just.clone())]),
            &[("added-in-leeway".to_string(), just)],
            later,
        );
        assert_eq!(c, BTreeMap::from([("kept-in-leeway".to_string(), None)]));
    }
}
