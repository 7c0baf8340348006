//! Conversions between the API documents and regorus values, without going through JSON text.
//!
//! [`input_value`] builds the `input` document directly as a [`Value`] tree: object keys are
//! interned once per process ([`Keys`]) and cloned (a reference-count increment) into every
//! input. [`CellValue`] lets a caller that decides many requests for the same cell (the node)
//! build the cell part once. [`decision_from_value`] parses the policy's answer strictly.
//!
//! Strict tier: this is the boundary between request bytes and the decision, so no `unwrap`,
//! no panicking index.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use cellgate_api::policy::{
    AddrDoc, CapabilityDoc, CellDoc, DecisionDoc, DestinationDoc, HttpRuleDoc, IdentityDoc,
    InputDoc, RequestDoc,
};
use regorus::Value;

use crate::error::EvalError;

/// Interned object keys of the input and decision documents.
struct Keys {
    version: Value,
    time_ns: Value,
    front_door: Value,
    source: Value,
    identity: Value,
    cell: Value,
    request: Value,
    address: Value,
    port: Value,
    jti: Value,
    cell_uid: Value,
    namespace: Value,
    name: Value,
    role: Value,
    uid: Value,
    suspended: Value,
    labels: Value,
    capabilities: Value,
    mode: Value,
    tls: Value,
    destinations: Value,
    http: Value,
    approval: Value,
    credential: Value,
    host: Value,
    cidr: Value,
    ports: Value,
    methods: Value,
    paths: Value,
    protocol: Value,
    sni: Value,
    method: Value,
    path: Value,
    query: Value,
    headers: Value,
    destination: Value,
    dns_type: Value,
    allow: Value,
    outcome: Value,
    capability: Value,
    reason: Value,
    reasons: Value,
    hint: Value,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    version: "version".into(),
    time_ns: "time_ns".into(),
    front_door: "front_door".into(),
    source: "source".into(),
    identity: "identity".into(),
    cell: "cell".into(),
    request: "request".into(),
    address: "address".into(),
    port: "port".into(),
    jti: "jti".into(),
    cell_uid: "cell_uid".into(),
    namespace: "namespace".into(),
    name: "name".into(),
    role: "role".into(),
    uid: "uid".into(),
    suspended: "suspended".into(),
    labels: "labels".into(),
    capabilities: "capabilities".into(),
    mode: "mode".into(),
    tls: "tls".into(),
    destinations: "destinations".into(),
    http: "http".into(),
    approval: "approval".into(),
    credential: "credential".into(),
    host: "host".into(),
    cidr: "cidr".into(),
    ports: "ports".into(),
    methods: "methods".into(),
    paths: "paths".into(),
    protocol: "protocol".into(),
    sni: "sni".into(),
    method: "method".into(),
    path: "path".into(),
    query: "query".into(),
    headers: "headers".into(),
    destination: "destination".into(),
    dns_type: "dns_type".into(),
    allow: "allow".into(),
    outcome: "outcome".into(),
    capability: "capability".into(),
    reason: "reason".into(),
    reasons: "reasons".into(),
    hint: "hint".into(),
});

/// Number of keys in a decision document.
const DECISION_FIELDS: usize = 7;

fn s(v: &str) -> Value {
    Value::from(v)
}

fn opt(v: Option<&String>) -> Value {
    v.map_or(Value::Null, |v| Value::from(v.as_str()))
}

fn strings(v: &[String]) -> Value {
    Value::from(v.iter().map(|x| s(x)).collect::<Vec<_>>())
}

fn string_map(m: &BTreeMap<String, String>) -> Value {
    Value::from(
        m.iter()
            .map(|(k, v)| (s(k), s(v)))
            .collect::<BTreeMap<Value, Value>>(),
    )
}

fn object<const N: usize>(fields: [(&Value, Value); N]) -> Value {
    Value::from(
        fields
            .into_iter()
            .map(|(k, v)| (k.clone(), v))
            .collect::<BTreeMap<Value, Value>>(),
    )
}

fn addr(a: &AddrDoc) -> Value {
    let k = &*KEYS;
    object([
        (&k.address, s(&a.address)),
        (&k.port, Value::from(u64::from(a.port))),
    ])
}

fn identity(i: &IdentityDoc) -> Value {
    let k = &*KEYS;
    object([
        (&k.jti, s(&i.jti)),
        (&k.cell_uid, s(&i.cell_uid)),
        (&k.namespace, s(&i.namespace)),
        (&k.name, s(&i.name)),
        (&k.role, opt(i.role.as_ref())),
    ])
}

fn destination(d: &DestinationDoc) -> Value {
    let k = &*KEYS;
    object([
        (&k.host, opt(d.host.as_ref())),
        (&k.cidr, opt(d.cidr.as_ref())),
        (
            &k.ports,
            Value::from(
                d.ports
                    .iter()
                    .map(|p| Value::from(u64::from(*p)))
                    .collect::<Vec<_>>(),
            ),
        ),
    ])
}

fn http_rule(h: Option<&HttpRuleDoc>) -> Value {
    let k = &*KEYS;
    h.map_or(Value::Null, |h| {
        object([
            (&k.methods, strings(&h.methods)),
            (&k.paths, strings(&h.paths)),
        ])
    })
}

fn capability(c: &CapabilityDoc) -> Value {
    let k = &*KEYS;
    object([
        (&k.name, s(&c.name)),
        (&k.mode, s(&c.mode)),
        (&k.tls, s(&c.tls)),
        (
            &k.destinations,
            Value::from(c.destinations.iter().map(destination).collect::<Vec<_>>()),
        ),
        (&k.http, http_rule(c.http.as_ref())),
        (&k.approval, Value::from(c.approval)),
        (&k.credential, Value::from(c.credential)),
    ])
}

fn request(r: &RequestDoc) -> Value {
    let k = &*KEYS;
    object([
        (&k.protocol, s(&r.protocol)),
        (&k.host, opt(r.host.as_ref())),
        (&k.port, Value::from(u64::from(r.port))),
        (&k.sni, opt(r.sni.as_ref())),
        (&k.method, opt(r.method.as_ref())),
        (&k.path, opt(r.path.as_ref())),
        (&k.query, opt(r.query.as_ref())),
        (&k.headers, string_map(&r.headers)),
        (&k.destination, addr(&r.destination)),
        (&k.dns_type, opt(r.dns_type.as_ref())),
    ])
}

/// The `cell` part of the input, built once and reused for every request of that cell.
///
/// Cloning is a reference-count increment. The node keeps one per cell beside the cell's model
/// and rebuilds it when the cell changes; [`crate::PolicySet::evaluate_with_cell`] takes it.
#[derive(Debug, Clone)]
pub struct CellValue(Value);

impl CellValue {
    /// Converts a cell document.
    pub fn new(c: &CellDoc) -> Self {
        let k = &*KEYS;
        Self(object([
            (&k.uid, s(&c.uid)),
            (&k.namespace, s(&c.namespace)),
            (&k.name, s(&c.name)),
            (&k.role, opt(c.role.as_ref())),
            (&k.suspended, Value::from(c.suspended)),
            (&k.labels, string_map(&c.labels)),
            (
                &k.capabilities,
                Value::from(c.capabilities.iter().map(capability).collect::<Vec<_>>()),
            ),
        ]))
    }
}

/// Builds the `input` document; `cell` replaces `input.cell` when given (it must describe the
/// same cell).
pub(crate) fn input_value(input: &InputDoc, cell: Option<&CellValue>) -> Value {
    let k = &*KEYS;
    let cell = cell.map_or_else(|| CellValue::new(&input.cell).0, |c| c.0.clone());
    object([
        (&k.version, s(&input.version)),
        (&k.time_ns, Value::from(input.time_ns)),
        (&k.front_door, s(&input.front_door)),
        (&k.source, addr(&input.source)),
        (&k.identity, identity(&input.identity)),
        (&k.cell, cell),
        (&k.request, request(&input.request)),
    ])
}

fn malformed(field: &'static str, problem: impl Into<String>) -> EvalError {
    EvalError::Malformed {
        field,
        problem: problem.into(),
    }
}

fn field<'a>(
    obj: &'a regorus::value::Object,
    key: &Value,
    name: &'static str,
) -> Result<&'a Value, EvalError> {
    obj.get(key).ok_or_else(|| malformed(name, "missing"))
}

fn want_string(v: &Value, name: &'static str) -> Result<String, EvalError> {
    match v {
        Value::String(x) => Ok(x.to_string()),
        other => Err(malformed(name, format!("expected a string, got {other}"))),
    }
}

fn want_opt_string(v: &Value, name: &'static str) -> Result<Option<String>, EvalError> {
    match v {
        Value::Null => Ok(None),
        Value::String(x) => Ok(Some(x.to_string())),
        other => Err(malformed(
            name,
            format!("expected a string or null, got {other}"),
        )),
    }
}

/// Parses the policy's answer into a [`DecisionDoc`]: exactly the seven fields, each of the
/// right type, then [`DecisionDoc::validate`].
///
/// # Errors
///
/// [`EvalError::Undefined`] when the rule was undefined, [`EvalError::Malformed`] naming the
/// first bad field, [`EvalError::Invalid`] when an invariant is broken.
pub(crate) fn decision_from_value(v: &Value) -> Result<DecisionDoc, EvalError> {
    let k = &*KEYS;
    let obj = match v {
        Value::Undefined => return Err(EvalError::Undefined),
        Value::Object(o) => o,
        other => return Err(malformed(".", format!("expected an object, got {other}"))),
    };
    if obj.len() != DECISION_FIELDS {
        let keys: Vec<String> = obj.keys().map(ToString::to_string).collect();
        return Err(malformed(
            ".",
            format!(
                "expected exactly allow, outcome, capability, mode, reason, reasons, hint; got {}",
                keys.join(", ")
            ),
        ));
    }
    let allow = match field(obj, &k.allow, "allow")? {
        Value::Bool(b) => *b,
        other => {
            return Err(malformed(
                "allow",
                format!("expected a boolean, got {other}"),
            ))
        }
    };
    let reasons = match field(obj, &k.reasons, "reasons")? {
        Value::Array(a) => a
            .iter()
            .map(|r| want_string(r, "reasons"))
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(malformed(
                "reasons",
                format!("expected an array, got {other}"),
            ))
        }
    };
    let doc = DecisionDoc {
        allow,
        outcome: want_string(field(obj, &k.outcome, "outcome")?, "outcome")?,
        capability: want_opt_string(field(obj, &k.capability, "capability")?, "capability")?,
        mode: want_opt_string(field(obj, &k.mode, "mode")?, "mode")?,
        reason: want_string(field(obj, &k.reason, "reason")?, "reason")?,
        reasons,
        hint: want_opt_string(field(obj, &k.hint, "hint")?, "hint")?,
    };
    doc.validate()?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversion_matches_json() {
        let mut input = InputDoc {
            version: cellgate_api::policy::INPUT_VERSION.into(),
            time_ns: 42,
            ..InputDoc::default()
        };
        input.cell.capabilities.push(CapabilityDoc {
            name: "c".into(),
            mode: "enforce".into(),
            tls: "intercept".into(),
            destinations: vec![DestinationDoc {
                host: Some("a.example".into()),
                cidr: None,
                ports: vec![443],
            }],
            http: Some(HttpRuleDoc {
                methods: vec!["GET".into()],
                paths: vec![],
            }),
            approval: false,
            credential: true,
        });
        input.request.headers.insert("x-a".into(), "b".into());
        input.request.host = Some("a.example".into());
        let direct = input_value(&input, None);
        let via_json = Value::from_json_str(&serde_json::to_string(&input).unwrap()).unwrap();
        assert_eq!(direct, via_json);
        let cell = CellValue::new(&input.cell);
        assert_eq!(input_value(&input, Some(&cell)), via_json);
    }

    #[test]
    fn decision_parsing_is_strict() {
        let ok = r#"{"allow":false,"outcome":"deny","capability":null,"mode":null,
                     "reason":"no_capability","reasons":["x"],"hint":"h"}"#;
        let d = decision_from_value(&Value::from_json_str(ok).unwrap()).unwrap();
        assert_eq!(d.reason, "no_capability");
        assert!(matches!(
            decision_from_value(&Value::Undefined),
            Err(EvalError::Undefined)
        ));
        let bad = ok.replace(r#"["x"]"#, "[1]");
        let e = decision_from_value(&Value::from_json_str(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("reasons"), "{e}");
        let bad = ok.replace(r#""hint":"h""#, r#""hint":"h","extra":1"#);
        assert!(decision_from_value(&Value::from_json_str(&bad).unwrap()).is_err());
        let bad = ok.replace(r#""allow":false"#, r#""allow":true"#);
        assert!(matches!(
            decision_from_value(&Value::from_json_str(&bad).unwrap()),
            Err(EvalError::Invalid(_))
        ));
    }
}
