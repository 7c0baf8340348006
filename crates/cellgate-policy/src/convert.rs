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
    derived: Value,
    hosts: Value,
    wildcards: Value,
    cidrs: Value,
    suffix: Value,
    cap: Value,
    rank: Value,
    passthrough: Value,
    any_method: Value,
    any_path: Value,
    exact: Value,
    prefixes: Value,
    globs: Value,
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
    derived: "derived".into(),
    hosts: "hosts".into(),
    wildcards: "wildcards".into(),
    cidrs: "cidrs".into(),
    suffix: "suffix".into(),
    cap: "cap".into(),
    rank: "rank".into(),
    passthrough: "passthrough".into(),
    any_method: "any_method".into(),
    any_path: "any_path".into(),
    exact: "exact".into(),
    prefixes: "prefixes".into(),
    globs: "globs".into(),
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

fn ports(p: &[u16]) -> Value {
    Value::from(
        p.iter()
            .map(|p| Value::from(u64::from(*p)))
            .collect::<Vec<_>>(),
    )
}

fn destination(d: &DestinationDoc, ports: Value) -> Value {
    let k = &*KEYS;
    object([
        (&k.host, opt(d.host.as_ref())),
        (&k.cidr, opt(d.cidr.as_ref())),
        (&k.ports, ports),
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

/// A capability; `ports` holds the port list of each destination (shared with the derived
/// fields).
fn capability(c: &CapabilityDoc, ports: &[Value]) -> Value {
    let k = &*KEYS;
    object([
        (&k.name, s(&c.name)),
        (&k.mode, s(&c.mode)),
        (&k.tls, s(&c.tls)),
        (
            &k.destinations,
            Value::from(
                c.destinations
                    .iter()
                    .zip(ports)
                    .map(|(d, p)| destination(d, p.clone()))
                    .collect::<Vec<_>>(),
            ),
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
///
/// Besides the cell document it holds the cell's **derived fields** (`input.cell.derived`,
/// documented in `docs/policy.md`): an index of the destinations by kind and of the HTTP rules
/// by kind of path glob, which the base policy would otherwise recompute on every request. The
/// policy still decides; the index only saves it work, and it computes the same index itself
/// (`_derive`) for an input without one.
#[derive(Debug, Clone)]
pub struct CellValue {
    /// The cell document exactly as its JSON form.
    plain: Value,
    /// The same with the `derived` key, as evaluated.
    with_derived: Value,
}

impl CellValue {
    /// Converts a cell document.
    pub fn new(c: &CellDoc) -> Self {
        let k = &*KEYS;
        let port_lists: Vec<Vec<Value>> = c
            .capabilities
            .iter()
            .map(|cap| cap.destinations.iter().map(|d| ports(&d.ports)).collect())
            .collect();
        let capabilities: Vec<Value> = c
            .capabilities
            .iter()
            .zip(&port_lists)
            .map(|(cap, p)| capability(cap, p))
            .collect();
        let fields = [
            (&k.uid, s(&c.uid)),
            (&k.namespace, s(&c.namespace)),
            (&k.name, s(&c.name)),
            (&k.role, opt(c.role.as_ref())),
            (&k.suspended, Value::from(c.suspended)),
            (&k.labels, string_map(&c.labels)),
            (&k.capabilities, Value::from(capabilities.clone())),
        ];
        let plain = object(fields.clone());
        let mut with_derived: BTreeMap<Value, Value> =
            fields.into_iter().map(|(k, v)| (k.clone(), v)).collect();
        with_derived.insert(k.derived.clone(), derived(c, &port_lists));
        Self {
            plain,
            with_derived: Value::from(with_derived),
        }
    }
}

/// Characters that make a path glob more than a literal string (`glob.match` syntax and the
/// separators of its alternatives). Kept in step with `_literal_glob` in the base policy.
const GLOB_SYNTAX: [char; 8] = ['*', '?', '[', ']', '{', '}', '\\', ','];

fn is_literal_glob(g: &str) -> bool {
    !g.contains(GLOB_SYNTAX)
}

/// `P` of a `P/**` glob whose `P` is a non-empty literal.
fn literal_prefix_glob(g: &str) -> Option<&str> {
    g.strip_suffix("/**")
        .filter(|p| !p.is_empty() && is_literal_glob(p))
}

fn true_set<'a>(items: impl Iterator<Item = &'a str>) -> Value {
    Value::from(
        items
            .map(|x| (s(x), Value::Bool(true)))
            .collect::<BTreeMap<Value, Value>>(),
    )
}

/// An HTTP rule as indexed (`_derive_http` in the base policy): `None` (any request) is the rule
/// with no method and no path.
fn derived_http(h: Option<&HttpRuleDoc>) -> Value {
    let k = &*KEYS;
    let (methods, paths) = h.map_or((&[][..], &[][..]), |h| (&h.methods[..], &h.paths[..]));
    let mut exact = Vec::new();
    let mut prefixes = Vec::new();
    let mut globs = Vec::new();
    for g in paths {
        if is_literal_glob(g) {
            exact.push(g.as_str());
        } else if let Some(p) = literal_prefix_glob(g) {
            exact.push(p);
            prefixes.push(s(&format!("{p}/")));
        } else {
            globs.push(s(g));
        }
    }
    object([
        (&k.methods, true_set(methods.iter().map(String::as_str))),
        (&k.any_method, Value::from(methods.is_empty())),
        (&k.any_path, Value::from(paths.is_empty())),
        (&k.exact, true_set(exact.into_iter())),
        (&k.prefixes, Value::from(prefixes)),
        (&k.globs, Value::from(globs)),
    ])
}

/// `input.cell.derived`: what `_derive` computes in the base policy. `port_lists` holds the
/// converted port list of every destination, shared with the capabilities.
fn derived(c: &CellDoc, port_lists: &[Vec<Value>]) -> Value {
    let k = &*KEYS;
    let mut hosts: BTreeMap<Value, Vec<Value>> = BTreeMap::new();
    let mut wildcards = Vec::new();
    let mut cidrs = Vec::new();
    for (i, (cap, cap_ports)) in c.capabilities.iter().zip(port_lists).enumerate() {
        let rank = match cap.mode.as_str() {
            "enforce" => 0_u64,
            "shadow" => 1,
            _ => continue, // never grants nor refuses
        };
        let index = Value::from(u64::try_from(i).unwrap_or(u64::MAX));
        let http = derived_http(cap.http.as_ref());
        let passthrough = Value::from(cap.tls == "passthrough");
        for (d, ports) in cap.destinations.iter().zip(cap_ports) {
            let entry = |extra: Option<(&Value, Value)>| {
                let mut m: BTreeMap<Value, Value> = [
                    (k.cap.clone(), index.clone()),
                    (k.rank.clone(), Value::from(rank)),
                    (k.ports.clone(), ports.clone()),
                    (k.passthrough.clone(), passthrough.clone()),
                    (k.http.clone(), http.clone()),
                ]
                .into_iter()
                .collect();
                if let Some((key, v)) = extra {
                    m.insert(key.clone(), v);
                }
                Value::from(m)
            };
            if let Some(host) = &d.host {
                hosts.entry(s(host)).or_default().push(entry(None));
                if let Some(suffix) = host.strip_prefix('*').filter(|x| x.starts_with('.')) {
                    wildcards.push(entry(Some((&k.suffix, s(suffix)))));
                }
            }
            if let Some(cidr) = &d.cidr {
                cidrs.push(entry(Some((&k.cidr, s(cidr)))));
            }
        }
    }
    object([
        (
            &k.hosts,
            Value::from(
                hosts
                    .into_iter()
                    .map(|(h, v)| (h, Value::from(v)))
                    .collect::<BTreeMap<Value, Value>>(),
            ),
        ),
        (&k.wildcards, Value::from(wildcards)),
        (&k.cidrs, Value::from(cidrs)),
    ])
}

/// Builds the `input` document exactly as its JSON form; `cell` replaces `input.cell` when
/// given (it must describe the same cell).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn input_value(input: &InputDoc, cell: Option<&CellValue>) -> Value {
    let cell = cell.map_or_else(|| CellValue::new(&input.cell).plain, |c| c.plain.clone());
    build_input(input, cell)
}

/// Builds the `input` document as evaluated: with the cell's derived fields.
pub(crate) fn eval_input_value(input: &InputDoc, cell: Option<&CellValue>) -> Value {
    let cell = cell.map_or_else(
        || CellValue::new(&input.cell).with_derived,
        |c| c.with_derived.clone(),
    );
    build_input(input, cell)
}

fn build_input(input: &InputDoc, cell: Value) -> Value {
    let k = &*KEYS;
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
    /// The index built here is the one `_derive` in the base policy computes for an input
    /// without it: same entries, same order.
    #[test]
    fn derived_fields_match_the_policy_derivation() {
        let base = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../policies/base/cellgate.rego"
        );
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        engine.add_policy_from_file(base).unwrap();
        let cap =
            |name: &str, mode: &str, tls: &str, dests: Vec<DestinationDoc>, http| CapabilityDoc {
                name: name.into(),
                mode: mode.into(),
                tls: tls.into(),
                destinations: dests,
                http,
                approval: false,
                credential: false,
            };
        let dest = |host: Option<&str>, cidr: Option<&str>, ports: Vec<u16>| DestinationDoc {
            host: host.map(Into::into),
            cidr: cidr.map(Into::into),
            ports,
        };
        let rule = |methods: &[&str], paths: &[&str]| {
            Some(HttpRuleDoc {
                methods: methods.iter().map(|m| (*m).into()).collect(),
                paths: paths.iter().map(|p| (*p).into()).collect(),
            })
        };
        let mut input = InputDoc::default();
        input.cell.capabilities = vec![
            cap(
                "a",
                "enforce",
                "intercept",
                vec![
                    dest(Some("api.example.com"), None, vec![443]),
                    dest(Some("*.example.com"), None, vec![443, 80]),
                ],
                rule(
                    &["GET", "HEAD"],
                    &["/repos/**", "/user", "/x/*/y", "/**", "", "/a,b/**"],
                ),
            ),
            cap(
                "b",
                "shadow",
                "passthrough",
                vec![
                    dest(None, Some("10.0.0.0/8"), vec![5432]),
                    dest(Some("api.example.com"), Some("192.0.2.0/24"), vec![]),
                ],
                None,
            ),
            cap(
                "c",
                "audit",
                "intercept",
                vec![dest(Some("c.test"), None, vec![1])],
                None,
            ),
            cap(
                "d",
                "enforce",
                "intercept",
                vec![dest(Some("*"), None, vec![1])],
                rule(&[], &[]),
            ),
        ];
        let json = serde_json::to_string(&input).unwrap();
        engine.set_input(Value::from_json_str(&json).unwrap());
        let from_policy = engine
            .eval_rule("data.cellgate.authz._derive".into())
            .unwrap();
        let cell = CellValue::new(&input.cell);
        let from_rust = &cell.with_derived[&KEYS.derived];
        assert_eq!(from_rust, &from_policy);
        assert_eq!(
            from_policy[&KEYS.hosts]["api.example.com"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
