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
use std::sync::{Arc, LazyLock};

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
    json: Value,
    derived: Value,
    hosts: Value,
    wildcards: Value,
    cidrs: Value,
    floor: Value,
    single: Value,
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
    json: "json".into(),
    derived: "derived".into(),
    hosts: "hosts".into(),
    wildcards: "wildcards".into(),
    cidrs: "cidrs".into(),
    floor: "floor".into(),
    single: "single".into(),
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

/// Number of keys a decision document may have: the seven required ones and `layers`.
const DECISION_FIELDS: usize = 8;
/// The keys of a decision document, in the order [`decision_from_value`] indexes them.
const DECISION_KEYS: [&str; DECISION_FIELDS] = [
    "allow",
    "capability",
    "hint",
    "layers",
    "mode",
    "outcome",
    "reason",
    "reasons",
];
/// Index of the optional `layers` key in [`DECISION_KEYS`].
const LAYERS_KEY: usize = 3;
/// Most layer names a decision may report (per kind); a policy naming more is malformed.
const MAX_LAYER_NAMES: usize = 1024;

/// The layer packages (`cellgate.layers.<name>`) a decision reports as having denied, and as
/// having denied in shadow (the optional `layers` field of the decision document).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LayerNames {
    pub(crate) deny: Vec<String>,
    pub(crate) shadow_deny: Vec<String>,
}

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
        (&k.protocol, s(&c.protocol)),
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
    let mut v = request_fields(r);
    if let (Some(json), Ok(map)) = (&r.json, v.as_object_mut()) {
        map.insert(k.json.clone(), Value::from(json.clone()));
    }
    v
}

fn request_fields(r: &RequestDoc) -> Value {
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
    /// What the common decision reads of this cell (see [`CellValue::warm`]).
    hot: Arc<[Value]>,
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
        let with_derived = Value::from(with_derived);
        Self {
            plain,
            hot: hot_values(&with_derived).into(),
            with_derived,
        }
    }

    /// Reads a little of every value the common decision of this cell looks at (the cell and
    /// index objects, the `single` entries with their ports, methods and prefixes, and the
    /// cell's name, namespace and role, which packs usually test), so that the memory they
    /// live in is fetched at once rather than one dependent miss at a time inside the
    /// evaluator: with thousands of cells, the cell a request belongs to is rarely in cache,
    /// and its values are reached through a dozen pointers. The reads are independent of each
    /// other, so the processor overlaps them; they change nothing.
    pub(crate) fn warm(&self) {
        let mut acc = 0_usize;
        for v in self.hot.iter() {
            acc = acc.wrapping_add(match v {
                Value::Object(o) => o.iter().map(|(_, x)| touch(x)).sum(),
                Value::Array(a) => a.iter().map(touch).sum(),
                other => touch(other),
            });
        }
        std::hint::black_box(acc);
    }
}

/// One read of the memory a value lives in.
fn touch(v: &Value) -> usize {
    match v {
        Value::String(x) => x.as_bytes().first().copied().map_or(0, usize::from),
        Value::Bool(b) => usize::from(*b),
        _ => 1,
    }
}

/// The values [`CellValue::warm`] reads, in `cell` (the cell as evaluated, with `derived`).
fn hot_values(cell: &Value) -> Vec<Value> {
    let k = &*KEYS;
    let mut hot = vec![cell.clone()];
    for key in [&k.name, &k.namespace, &k.role] {
        hot.push(cell[key].clone());
    }
    let derived = &cell[&k.derived];
    hot.push(derived.clone());
    let single = &derived[&k.single];
    hot.push(single.clone());
    if let Ok(single) = single.as_object() {
        for (host, entry) in single.iter() {
            hot.push(host.clone());
            hot.push(entry.clone());
            for key in [&k.ports, &k.methods, &k.prefixes, &k.exact, &k.name] {
                hot.push(entry[key].clone());
            }
            if let Ok(methods) = entry[&k.methods].as_object() {
                hot.extend(methods.keys().cloned());
            }
            if let Ok(prefixes) = entry[&k.prefixes].as_array() {
                hot.extend(prefixes.iter().cloned());
            }
        }
    }
    hot.retain(|v| !matches!(v, Value::Undefined | Value::Null));
    hot
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

/// An HTTP rule as indexed (`_derive_http` in the base policy), as the fields it adds to an
/// entry: `None` (any request) is the rule with no method and no path; a rule with no path lists
/// the prefix `""`.
fn derived_http(h: Option<&HttpRuleDoc>) -> [(Value, Value); 6] {
    let k = &*KEYS;
    let (methods, paths) = h.map_or((&[][..], &[][..]), |h| (&h.methods[..], &h.paths[..]));
    let mut exact = Vec::new();
    let mut prefixes = Vec::new();
    let mut globs = Vec::new();
    if paths.is_empty() {
        prefixes.push(s(""));
    }
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
    [
        (
            k.methods.clone(),
            true_set(methods.iter().map(String::as_str)),
        ),
        (k.any_method.clone(), Value::from(methods.is_empty())),
        (k.any_path.clone(), Value::from(paths.is_empty())),
        (k.exact.clone(), true_set(exact.into_iter())),
        (k.prefixes.clone(), Value::from(prefixes)),
        (k.globs.clone(), Value::from(globs)),
    ]
}

/// `[rank, cap]` of the first shadow capability: the highest `floor` of the index.
const FLOOR: (u64, u64) = (1, 0);

/// Whether destination host `pattern` names host `h`: the same host, or `*.example.com` and a
/// subdomain of `example.com` (`_names` in the base policy).
fn names(pattern: &str, h: &str) -> bool {
    pattern == h || wildcard_suffix(pattern).is_some_and(|suffix| h.ends_with(suffix))
}

/// `.example.com` of `*.example.com`.
fn wildcard_suffix(host: &str) -> Option<&str> {
    host.strip_prefix('*').filter(|x| x.starts_with('.'))
}

/// Rank of a capability mode in the index: enforce first, then shadow; `None` for a mode that
/// never grants nor refuses.
fn rank(mode: &str) -> Option<u64> {
    match mode {
        "enforce" => Some(0),
        "shadow" => Some(1),
        _ => None,
    }
}

/// `input.cell.derived`: what `_derive` computes in the base policy. `port_lists` holds the
/// converted port list of every destination, shared with the capabilities.
fn derived(c: &CellDoc, port_lists: &[Vec<Value>]) -> Value {
    let k = &*KEYS;
    // (destination, its entry), manifest order.
    let mut entries: Vec<(&DestinationDoc, Value)> = Vec::new();
    let mut cidr_min: Option<(u64, u64)> = None;
    for (i, (cap, cap_ports)) in c.capabilities.iter().zip(port_lists).enumerate() {
        let Some(rank) = rank(&cap.mode) else {
            continue; // never grants nor refuses
        };
        let cap_index = u64::try_from(i).unwrap_or(u64::MAX);
        let index = Value::from(cap_index);
        let http = derived_http(cap.http.as_ref());
        let passthrough = Value::from(cap.tls == "passthrough");
        let name = s(&cap.name);
        for (d, ports) in cap.destinations.iter().zip(cap_ports) {
            let entry: BTreeMap<Value, Value> = [
                (k.cap.clone(), index.clone()),
                (k.rank.clone(), Value::from(rank)),
                (k.name.clone(), name.clone()),
                (k.ports.clone(), ports.clone()),
                (k.passthrough.clone(), passthrough.clone()),
            ]
            .into_iter()
            .chain(http.iter().cloned())
            .collect();
            if d.cidr.is_some() {
                cidr_min = Some(cidr_min.map_or((rank, cap_index), |m| m.min((rank, cap_index))));
            }
            entries.push((d, Value::from(entry)));
        }
    }
    let with = |entry: &Value, key: &Value, v: Value| -> Value {
        let mut m: BTreeMap<Value, Value> = entry
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        m.insert(key.clone(), v);
        Value::from(m)
    };
    let floor = cidr_min.map_or(FLOOR, |m| m.min(FLOOR));
    let mut hosts: BTreeMap<Value, Value> = BTreeMap::new();
    let mut single: BTreeMap<Value, Value> = BTreeMap::new();
    let mut wildcards = Vec::new();
    let mut cidrs = Vec::new();
    for (d, entry) in &entries {
        if let Some(host) = &d.host {
            if let std::collections::btree_map::Entry::Vacant(slot) = hosts.entry(s(host)) {
                let naming: Vec<(u64, u64, Value)> = entries
                    .iter()
                    .filter(|(e, _)| e.host.as_deref().is_some_and(|p| names(p, host)))
                    .map(|(_, v)| {
                        (
                            v[&k.rank].as_u64().unwrap_or(u64::MAX),
                            v[&k.cap].as_u64().unwrap_or(u64::MAX),
                            v.clone(),
                        )
                    })
                    .collect();
                if let [(rank, cap, entry)] = &naming[..] {
                    if !c.suspended && (*rank, *cap) < floor {
                        single.insert(slot.key().clone(), entry.clone());
                    }
                }
                slot.insert(Value::from(
                    naming.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
                ));
            }
            if let Some(suffix) = wildcard_suffix(host) {
                wildcards.push(with(entry, &k.suffix, s(suffix)));
            }
        }
        if let Some(cidr) = &d.cidr {
            cidrs.push(with(entry, &k.cidr, s(cidr)));
        }
    }
    let (min_rank, min_cap) = floor;
    object([
        (&k.hosts, Value::from(hosts)),
        (&k.wildcards, Value::from(wildcards)),
        (&k.cidrs, Value::from(cidrs)),
        (&k.single, Value::from(single)),
        (
            &k.floor,
            Value::from(vec![Value::from(min_rank), Value::from(min_cap)]),
        ),
    ])
}

/// Builds the `input` document exactly as its JSON form; `cell` replaces `input.cell` when
/// given (it must describe the same cell).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn input_value(input: &InputDoc, cell: Option<&CellValue>) -> Value {
    let cell = cell.map_or_else(|| CellValue::new(&input.cell).plain, |c| c.plain.clone());
    build_input(input, cell)
}

/// The `cell` part of the input as evaluated: with the cell's derived fields.
pub(crate) fn eval_cell_value(input: &InputDoc, cell: Option<&CellValue>) -> Value {
    cell.map_or_else(
        || CellValue::new(&input.cell).with_derived,
        |c| c.with_derived.clone(),
    )
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

/// A reusable `input` document, filled in place for each request.
///
/// Building the input allocates a dozen objects and strings per request; a slot keeps one input
/// value and writes into it instead ([`InputSlot::fill`]). It remembers what it last wrote to
/// each field (`last`, reference-counted clones) and skips the fields that did not change, so a
/// request costs the fields that differ from the previous one filled into the same slot. The
/// result is always equal to the input built from scratch (a test checks it over a sequence of
/// requests), and nothing of the previous request survives in it.
///
/// The slot is not shared: when the evaluator still holds the previous value, writing to it
/// copies the object first (reference counting), so reuse saves work only when the slot is
/// filled again after the evaluator has let go of it; [`crate::PolicySet`] alternates two slots
/// per thread for that.
#[derive(Debug)]
pub(crate) struct InputSlot {
    value: Value,
    last: [Value; FIELDS],
}

/// The fields of the input a slot tracks, as indices into [`InputSlot::last`].
mod f {
    pub(super) const VERSION: usize = 0;
    pub(super) const TIME_NS: usize = 1;
    pub(super) const FRONT_DOOR: usize = 2;
    pub(super) const SRC_ADDRESS: usize = 3;
    pub(super) const SRC_PORT: usize = 4;
    pub(super) const JTI: usize = 5;
    pub(super) const CELL_UID: usize = 6;
    pub(super) const NAMESPACE: usize = 7;
    pub(super) const NAME: usize = 8;
    pub(super) const ROLE: usize = 9;
    pub(super) const CELL: usize = 10;
    pub(super) const PROTOCOL: usize = 11;
    pub(super) const HOST: usize = 12;
    pub(super) const PORT: usize = 13;
    pub(super) const SNI: usize = 14;
    pub(super) const METHOD: usize = 15;
    pub(super) const PATH: usize = 16;
    pub(super) const QUERY: usize = 17;
    pub(super) const HEADERS: usize = 18;
    pub(super) const DST_ADDRESS: usize = 19;
    pub(super) const DST_PORT: usize = 20;
    pub(super) const DNS_TYPE: usize = 21;
}
const FIELDS: usize = 22;

impl InputSlot {
    pub(crate) fn new() -> Self {
        Self {
            value: build_input(&InputDoc::default(), Value::Null),
            last: std::array::from_fn(|_| Value::Undefined), // never equal: the first fill writes all
        }
    }

    /// Writes `input` (its cell replaced by `cell`) into the slot; returns the value to evaluate
    /// (a reference-counted clone of the slot).
    pub(crate) fn fill(&mut self, input: &InputDoc, cell: Value) -> Value {
        if fill_input(&mut self.value, &mut self.last, input, cell.clone()).is_none() {
            // Not the expected shape (cannot happen: the slot builds it): rebuild, forget.
            self.value = build_input(input, cell);
            self.last = std::array::from_fn(|_| Value::Undefined);
        }
        self.value.clone()
    }
}

/// The new value of a field when it differs from `last` (which is updated), else `None`.
fn changed(last: &mut Value, new: Value) -> Option<Value> {
    (*last != new).then(|| {
        *last = new.clone();
        new
    })
}

fn changed_str(last: &mut Value, new: Option<&str>) -> Option<Value> {
    let same = match (&*last, new) {
        (Value::String(l), Some(n)) => &**l == n,
        (Value::Null, None) => true,
        _ => false,
    };
    if same {
        return None;
    }
    let v = new.map_or(Value::Null, s);
    *last = v.clone();
    Some(v)
}

/// Writes the pending `(key, value)` pairs into the existing fields of `obj`.
fn write(obj: &mut regorus::value::Object, pending: &mut Vec<(&Value, Value)>) -> Option<()> {
    for (key, v) in pending.drain(..) {
        *obj.get_mut(key)? = v;
    }
    Some(())
}

/// [`build_input`] into an existing input value, writing only the fields that differ from
/// `last`; `None` when `v` does not have the input's shape.
fn fill_input(
    v: &mut Value,
    last: &mut [Value; FIELDS],
    input: &InputDoc,
    cell: Value,
) -> Option<()> {
    let k = &*KEYS;
    let (i, r) = (&input.identity, &input.request);
    let port = |p: u16| Value::from(u64::from(p));
    let opt = Option::as_deref;
    let mut top = Vec::new();
    let mut source = Vec::new();
    let mut identity = Vec::new();
    let mut request = Vec::new();
    let mut destination = Vec::new();
    let mut str_field = |pending: &mut Vec<(&'static Value, Value)>,
                         key: &'static Value,
                         idx: usize,
                         new: Option<&str>|
     -> Option<()> {
        if let Some(v) = changed_str(last.get_mut(idx)?, new) {
            pending.push((key, v));
        }
        Some(())
    };
    str_field(&mut top, &k.version, f::VERSION, Some(&input.version))?;
    str_field(
        &mut top,
        &k.front_door,
        f::FRONT_DOOR,
        Some(&input.front_door),
    )?;
    str_field(
        &mut source,
        &k.address,
        f::SRC_ADDRESS,
        Some(&input.source.address),
    )?;
    str_field(&mut identity, &k.jti, f::JTI, Some(&i.jti))?;
    str_field(&mut identity, &k.cell_uid, f::CELL_UID, Some(&i.cell_uid))?;
    str_field(
        &mut identity,
        &k.namespace,
        f::NAMESPACE,
        Some(&i.namespace),
    )?;
    str_field(&mut identity, &k.name, f::NAME, Some(&i.name))?;
    str_field(&mut identity, &k.role, f::ROLE, opt(&i.role))?;
    str_field(&mut request, &k.protocol, f::PROTOCOL, Some(&r.protocol))?;
    str_field(&mut request, &k.host, f::HOST, opt(&r.host))?;
    str_field(&mut request, &k.sni, f::SNI, opt(&r.sni))?;
    str_field(&mut request, &k.method, f::METHOD, opt(&r.method))?;
    str_field(&mut request, &k.path, f::PATH, opt(&r.path))?;
    str_field(&mut request, &k.query, f::QUERY, opt(&r.query))?;
    str_field(&mut request, &k.dns_type, f::DNS_TYPE, opt(&r.dns_type))?;
    str_field(
        &mut destination,
        &k.address,
        f::DST_ADDRESS,
        Some(&r.destination.address),
    )?;
    let mut other = |pending: &mut Vec<(&'static Value, Value)>,
                     key: &'static Value,
                     idx: usize,
                     new: Value|
     -> Option<()> {
        if let Some(v) = changed(last.get_mut(idx)?, new) {
            pending.push((key, v));
        }
        Some(())
    };
    other(&mut top, &k.time_ns, f::TIME_NS, Value::from(input.time_ns))?;
    other(&mut top, &k.cell, f::CELL, cell)?;
    other(&mut source, &k.port, f::SRC_PORT, port(input.source.port))?;
    other(&mut request, &k.port, f::PORT, port(r.port))?;
    other(
        &mut destination,
        &k.port,
        f::DST_PORT,
        port(r.destination.port),
    )?;
    other(&mut request, &k.headers, f::HEADERS, string_map(&r.headers))?;

    let top_obj = v.as_object_mut().ok()?;
    write(top_obj, &mut top)?;
    if !source.is_empty() {
        write(
            top_obj.get_mut(&k.source)?.as_object_mut().ok()?,
            &mut source,
        )?;
    }
    if !identity.is_empty() {
        write(
            top_obj.get_mut(&k.identity)?.as_object_mut().ok()?,
            &mut identity,
        )?;
    }
    if !request.is_empty() || !destination.is_empty() {
        let req = top_obj.get_mut(&k.request)?.as_object_mut().ok()?;
        write(req, &mut request)?;
        if !destination.is_empty() {
            write(
                req.get_mut(&k.destination)?.as_object_mut().ok()?,
                &mut destination,
            )?;
        }
    }
    // `request.json` is there only for a request that has one (an inspected body).
    let had_json = top_obj
        .get(&k.request)
        .and_then(|r| r.as_object().ok())
        .is_some_and(|o| o.contains_key(&k.json));
    if r.json.is_some() || had_json {
        let req = top_obj.get_mut(&k.request)?.as_object_mut().ok()?;
        match &r.json {
            Some(j) => {
                req.insert(k.json.clone(), Value::from(j.clone()));
            }
            None => {
                req.remove(&k.json);
            }
        }
    }
    Some(())
}

fn malformed(field: &'static str, problem: impl Into<String>) -> EvalError {
    EvalError::Malformed {
        field,
        problem: problem.into(),
    }
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
#[cfg(test)]
pub(crate) fn decision_from_value(v: &Value) -> Result<DecisionDoc, EvalError> {
    decision_and_layers(v).map(|(d, _)| d)
}

/// Parses a decision document strictly, with its optional `layers` field.
pub(crate) fn decision_and_layers(v: &Value) -> Result<(DecisionDoc, LayerNames), EvalError> {
    let obj = match v {
        Value::Undefined => return Err(EvalError::Undefined),
        Value::Object(o) => o,
        other => return Err(malformed(".", format!("expected an object, got {other}"))),
    };
    if obj.len() != DECISION_FIELDS && obj.len() != DECISION_FIELDS - 1 {
        let keys: Vec<String> = obj.keys().map(ToString::to_string).collect();
        return Err(malformed(
            ".",
            format!(
                "expected exactly allow, outcome, capability, mode, reason, reasons, hint (and optionally layers); got {}",
                keys.join(", ")
            ),
        ));
    }
    // One pass over the (sorted) fields rather than a lookup per field.
    let mut fields: [Option<&Value>; DECISION_FIELDS] = [None; DECISION_FIELDS];
    for (key, value) in obj.iter() {
        let i = match key {
            Value::String(name) => DECISION_KEYS.iter().position(|n| **n == **name),
            _ => None,
        };
        match i.and_then(|i| fields.get_mut(i)) {
            Some(slot) => *slot = Some(value),
            None => return Err(malformed(".", format!("unexpected field {key}"))),
        }
    }
    let field = |i: usize, name: &'static str| {
        fields
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| malformed(name, "missing"))
    };
    let allow = match field(0, "allow")? {
        Value::Bool(b) => *b,
        other => {
            return Err(malformed(
                "allow",
                format!("expected a boolean, got {other}"),
            ))
        }
    };
    let reasons = match field(7, "reasons")? {
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
        outcome: want_string(field(5, "outcome")?, "outcome")?,
        capability: want_opt_string(field(1, "capability")?, "capability")?,
        mode: want_opt_string(field(4, "mode")?, "mode")?,
        reason: want_string(field(6, "reason")?, "reason")?,
        reasons,
        hint: want_opt_string(field(2, "hint")?, "hint")?,
    };
    doc.validate()?;
    let layers = match fields.get(LAYERS_KEY).copied().flatten() {
        None => LayerNames::default(),
        Some(v) => layer_names(v)?,
    };
    Ok((doc, layers))
}

/// `{"deny": [names], "shadow_deny": [names]}`.
fn layer_names(v: &Value) -> Result<LayerNames, EvalError> {
    let Value::Object(o) = v else {
        return Err(malformed("layers", format!("expected an object, got {v}")));
    };
    let mut out = LayerNames::default();
    for (key, value) in o.iter() {
        let slot = match key {
            Value::String(k) if &**k == "deny" => &mut out.deny,
            Value::String(k) if &**k == "shadow_deny" => &mut out.shadow_deny,
            other => return Err(malformed("layers", format!("unexpected field {other}"))),
        };
        let Value::Array(names) = value else {
            return Err(malformed(
                "layers",
                format!("expected an array, got {value}"),
            ));
        };
        if names.len() > MAX_LAYER_NAMES {
            return Err(malformed("layers", format!("{} names", names.len())));
        }
        *slot = names
            .iter()
            .map(|n| want_string(n, "layers"))
            .collect::<Result<_, _>>()?;
    }
    Ok(out)
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
            protocol: "http".into(),
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
        input.request.json =
            Some(serde_json::json!({"model": "m", "max_tokens": 5, "tools": [{"name": "t"}]}));
        let direct = input_value(&input, None);
        let via_json = Value::from_json_str(&serde_json::to_string(&input).unwrap()).unwrap();
        assert_eq!(direct, via_json);
        let cell = CellValue::new(&input.cell);
        assert_eq!(input_value(&input, Some(&cell)), via_json);
    }

    /// A slot filled request after request holds exactly the input built from scratch.
    #[test]
    fn input_slot_equals_a_fresh_input() {
        let mut slot = InputSlot::new();
        let cell_a = CellValue::new(&CellDoc {
            uid: "a".into(),
            ..CellDoc::default()
        });
        let cell_b = CellValue::new(&CellDoc::default());
        let mut input = InputDoc::default();
        for n in 0..40_u16 {
            let opt = |on: bool, v: &str| on.then(|| format!("{v}{}", n % 3));
            input.version = format!("v{}", n % 2);
            input.time_ns = i64::from(n / 3);
            input.front_door = ["intake", "dns"][usize::from(n % 2)].into();
            input.source.address = format!("10.0.0.{}", n % 4);
            input.source.port = n % 5;
            input.identity.jti = format!("j{}", n % 3);
            input.identity.role = opt(n % 4 == 0, "r");
            input.identity.name = format!("n{}", n % 6);
            input.request.protocol = ["https", "tls", "dns"][usize::from(n % 3)].into();
            input.request.host = opt(n % 5 != 0, "h");
            input.request.sni = opt(n % 2 == 0, "s");
            input.request.method = opt(n % 3 != 0, "GET");
            input.request.path = opt(n % 7 != 0, "/p");
            input.request.query = opt(n % 4 == 1, "q");
            input.request.json =
                (n % 3 == 1).then(|| serde_json::json!({"model": format!("m{}", n % 2), "n": n}));
            input.request.dns_type = opt(n % 6 == 0, "A");
            input.request.port = n % 3;
            input.request.destination.address = format!("192.0.2.{}", n % 2);
            input.request.destination.port = n % 4;
            input.request.headers.clear();
            if n % 3 == 0 {
                input
                    .request
                    .headers
                    .insert("x".into(), format!("{}", n % 2));
            }
            let cell = if n % 4 < 2 { &cell_a } else { &cell_b };
            let got = slot.fill(&input, cell.with_derived.clone());
            assert_eq!(
                got,
                build_input(&input, cell.with_derived.clone()),
                "fill {n}"
            );
        }
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
        let with = ok.replace(
            r#""hint":"h""#,
            r#""hint":"h","layers":{"deny":["a"],"shadow_deny":["b","c"]}"#,
        );
        let (_, layers) = decision_and_layers(&Value::from_json_str(&with).unwrap()).unwrap();
        assert_eq!(layers.deny, ["a"]);
        assert_eq!(layers.shadow_deny, ["b", "c"]);
        let bad = with.replace(r#"["a"]"#, "[1]");
        assert!(decision_and_layers(&Value::from_json_str(&bad).unwrap()).is_err());
        let bad = with.replace(r#""deny":"#, r#""allow":"#);
        assert!(decision_and_layers(&Value::from_json_str(&bad).unwrap()).is_err());
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
                protocol: "http".into(),
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
        // api.example.com (a), *.example.com (a), api.example.com (b)
        let caps_of = |host: &str| -> Vec<u64> {
            from_policy[&KEYS.hosts][host]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e[&KEYS.cap].as_u64().unwrap())
                .collect()
        };
        assert_eq!(caps_of("api.example.com"), vec![0, 0, 1]);
        assert_eq!(caps_of("*.example.com"), vec![0]);
        // b (shadow, index 1) is the first capability with a CIDR destination; [1, 0] is lower.
        assert_eq!(
            from_policy[&KEYS.floor],
            Value::from(vec![Value::from(1_u64), Value::from(0_u64)])
        );
    }
}
