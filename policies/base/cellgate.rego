# Cellgate base policy.
#
# Entry point: data.cellgate.authz.decision, a decision document (cellgate.dev/decision/v1):
#   {allow, outcome, capability, mode, reason, reasons, hint}, plus, when layers took part,
#   layers: {deny: [layer names], shadow_deny: [layer names]}
# Input: cellgate.dev/input/v1 (see docs/policy.md and crates/cellgate-api/src/policy.rs).
#
# A request is allowed when a capability of the cell grants it and no layer denies it.
# Layers are user packs under data.cellgate.layers.<name>, each defining a `deny` set of strings
# or {"reason": label, "message": text} objects. Deny wins. A `shadow_deny` set of the same shape
# (and the `deny` of a pack in shadow mode) only records what it would deny: `shadow_deny`.
#
# The decision is one `else` chain, so only the branch taken is evaluated: an allowed request
# never builds the hint text.
package cellgate.authz

import rego.v1

decision_version := "cellgate.dev/decision/v1"

req := input.request

caps := input.cell.capabilities

# ---------------------------------------------------------------------------------------------
# Decision
# ---------------------------------------------------------------------------------------------

decision := {
	# The common case first, in one body with no rule reference but the layers': an HTTP request
	# to a host that one destination names (`single` in the index: of an enforce capability
	# listed before every capability with a CIDR destination, which could grant it too, in a
	# cell that is not suspended), on a listed port and method, on a path under a literal
	# prefix (or any path), and no layer entry at all. When any of this does not hold, the
	# branches below decide, and they give the same answer when it holds.
	"allow": true,
	"outcome": "allow",
	"capability": h.name,
	"mode": "enforce",
	"reason": "allowed",
	"reasons": [],
	"hint": null,
} if {
	r := input.request
	r.protocol in {"http", "https"}
	path := r.path
	is_string(path)
	h := input.cell.derived.single[r.host]
	r.port in h.ports
	object.get(h.methods, r.method, h.any_method)
	strings.any_prefix_match(path, h.prefixes)
	not contains(path, "\u0000")
	data.cellgate.internal.layers.quiet
} else := {
	# The same on a literal path. (No `some` loop at the top of a branch: regorus 0.14's VM
	# leaves the whole rule undefined when such a loop ends without success.)
	"allow": true,
	"outcome": "allow",
	"capability": h.name,
	"mode": "enforce",
	"reason": "allowed",
	"reasons": [],
	"hint": null,
} if {
	r := input.request
	r.protocol in {"http", "https"}
	path := r.path
	is_string(path)
	h := input.cell.derived.single[r.host]
	r.port in h.ports
	object.get(h.methods, r.method, h.any_method)
	h.exact[path]
	not contains(path, "\u0000")
	data.cellgate.internal.layers.quiet
} else := {
	# The same for any HTTP request to a host the cell spells out (several destinations, a glob).
	"allow": true,
	"outcome": "allow",
	"capability": g[2],
	"mode": "enforce",
	"reason": "allowed",
	"reasons": [],
	"hint": null,
} if {
	c := input.cell
	c.suspended == false
	r := input.request
	r.protocol in {"http", "https"}
	is_string(r.path)
	ix := c.derived
	g := min({[h.rank, h.cap, h.name] |
		some h in ix.hosts[r.host]
		r.port in h.ports
		object.get(h.methods, r.method, h.any_method)
		_path_ok_fast(h, r.path)
	})
	[g[0], g[1]] < ix.floor
	data.cellgate.internal.layers.quiet
} else := _general

# Everything else, in its own rule: one `else` chain this long would need more registers than
# regorus's VM gives one rule.
_general := _deny("cell_suspended", ["the cell is suspended"], null) if {
	input.cell.suspended == true
} else := {
	# Any other request granted by an enforce capability first, with no layer entry at all.
	"allow": true,
	"outcome": "allow",
	"capability": input.cell.capabilities[g[1]].name,
	"mode": "enforce",
	"reason": "allowed",
	"reasons": [],
	"hint": null,
} if {
	g := min(_grants)
	g[0] == 0
	_layers_quiet
} else := _with_layers(_deny(_layer_reason, _layer_messages, null)) if {
	count(malformed_layers) > 0
} else := _with_layers(_result(false, "deny", enforce_grants[0], _layer_reason, _layer_messages, null)) if {
	count(enforce_grants) > 0
	count(layer_denials) > 0
} else := _with_layers(_result(true, "shadow_deny", enforce_grants[0], _shadow_layer_reason, _shadow_layer_messages, null)) if {
	# Only shadow rules (a shadow pack's `deny`, any pack's `shadow_deny`) object: recorded as
	# what enforcing them would deny; the request goes on.
	count(enforce_grants) > 0
	count(layer_shadow_denials) > 0
} else := _result(true, "allow", enforce_grants[0], "allowed", [], null) if {
	count(enforce_grants) > 0
} else := _with_layers(_result(true, "shadow_deny", shadow_grants[0], _layer_reason, _layer_messages, null)) if {
	count(shadow_grants) > 0
	count(layer_denials) > 0
} else := _with_layers(_result(true, "shadow_deny", shadow_grants[0], _shadow_layer_reason, _shadow_layer_messages, null)) if {
	count(shadow_grants) > 0
	count(layer_shadow_denials) > 0
} else := _result(true, "allow", shadow_grants[0], "allowed", [], null) if {
	count(shadow_grants) > 0
} else := _result(true, "shadow_deny", _shadow_miss.index, _shadow_miss.status, [_shadow_miss.message], null) if {
	count(_shadow_misses) > 0
} else := _result(false, "deny", _enforce_miss.index, _enforce_miss.status, [_enforce_miss.message], _miss_hint) if {
	# Named in the denial: the capability that reaches the destination but refused.
	count(_enforce_misses) > 0
} else := _deny("no_capability", [_no_capability_message], _reach_hint)

_deny(reason, reasons, hint) := {
	"allow": false,
	"outcome": "deny",
	"capability": null,
	"mode": null,
	"reason": reason,
	"reasons": reasons,
	"hint": hint,
}

_result(allow, outcome, i, reason, reasons, hint) := {
	"allow": allow,
	"outcome": outcome,
	"capability": caps[i].name,
	"mode": caps[i].mode,
	"reason": reason,
	"reasons": reasons,
	"hint": hint,
}

# ---------------------------------------------------------------------------------------------
# Capabilities
# ---------------------------------------------------------------------------------------------

# The matching below is written for the evaluator (regorus's RVM), where every rule reference,
# function call, builtin call and loop iteration has a fixed cost: the request is matched against
# an index of the cell (`_ix`) with lookups and one comprehension, and the finer stages that
# explain a refusal are computed only on the paths that need them.

# The index of the cell. Cellgate supplies it, computed once per cell, as `input.cell.derived`
# (docs/policy.md, "derived fields"); for any other input (policy tests, `opa eval`) it is
# computed here, with the same result.
_ix := input.cell.derived if {
	is_object(input.cell.derived)
} else := _derive

# One entry per (capability, destination) of an `enforce` or `shadow` capability (a capability
# of any other mode never grants nor refuses anything), keyed by what names the target:
#   hosts:     every host a destination spells out -> [entry, ...] of every destination naming
#              it: that host itself, and every `*.example.com` it is a subdomain of (a
#              `*.example.com` host is also a key, matching itself); manifest order
#   wildcards: [entry + {"suffix": ".example.com"}, ...] for every `*.example.com`
#   cidrs:     [entry + {"cidr": ...}, ...]
#   floor:     the smallest [rank, cap] of a CIDR entry, or [1, 0] (the first shadow
#              capability) when smaller: a host grant below it is an enforce grant that no CIDR
#              grant can precede
#   single:    host -> entry, for every host of `hosts` with a single entry, below `floor`;
#              empty when the cell is suspended
# entry: {"cap": index, "rank": 0 enforce | 1 shadow, "name": the capability's name,
#         "ports": [...], "passthrough": tls == "passthrough"} and the fields of its HTTP rule
#         split by kind of glob (`_derive_http`)
_derive := {
	"hosts": _hosts,
	"floor": _floor,
	"single": {h: es[0] |
		input.cell.suspended == false
		some h, es in _hosts
		count(es) == 1
		[es[0].rank, es[0].cap] < _floor
	},
	"wildcards": [object.union(e.entry, {"suffix": trim_prefix(e.dest.host, "*")}) |
		some e in _entries
		is_string(e.dest.host)
		startswith(e.dest.host, "*.")
	],
	"cidrs": [object.union(e.entry, {"cidr": e.dest.cidr}) | some e in _entries; is_string(e.dest.cidr)],
}

_hosts := {h: _host_entries(h) | some e in _entries; is_string(e.dest.host); h := e.dest.host}

_ranks := {"enforce": 0, "shadow": 1}

_entries := [{"dest": d, "entry": object.union(
	{
		"cap": i,
		"rank": _ranks[cap.mode],
		"name": cap.name,
		"ports": d.ports,
		"passthrough": cap.tls == "passthrough",
	},
	_derive_http(cap.http),
)} |
	some i, cap in caps
	some d in cap.destinations
]

_host_entries(h) := [e.entry | some e in _entries; _names(e.dest.host, h)]

# Whether destination host `pattern` names host `h`.
_names(pattern, h) if pattern == h

_names(pattern, h) if {
	is_string(pattern)
	startswith(pattern, "*.")
	endswith(h, trim_prefix(pattern, "*"))
}

_cidr_ranks := {[e.entry.rank, e.entry.cap] | some e in _entries; is_string(e.dest.cidr)}

_floor := min(_cidr_ranks | {[1, 0]})

# An HTTP rule: null (any request) is the rule with no method and no path; a rule that is not
# an object never matches. A rule with no path lists the prefix "" (any string).
_derive_http(rule) := {"methods": {}, "any_method": true, "any_path": true, "exact": {}, "prefixes": [""], "globs": []} if {
	rule == null
} else := {
	"methods": {m: true | some m in rule.methods},
	"any_method": count(rule.methods) == 0,
	"any_path": count(rule.paths) == 0,
	# literal paths, and the bare prefix P of every literal `P/**`
	"exact": {p: true | some g in rule.paths; some p in _glob_literals(g)},
	# `P/` of every literal `P/**`, or "" when there is no path
	"prefixes": array.concat(
		["" | count(rule.paths) == 0],
		[concat("", [trim_suffix(g, "/**"), "/"]) | some g in rule.paths; _literal_prefix_glob(g)],
	),
	# every other glob, matched with `path_match`
	"globs": [g | some g in rule.paths; not _literal_glob(g); not _literal_prefix_glob(g)],
} if {
	is_object(rule)
} else := {"methods": {}, "any_method": false, "any_path": false, "exact": {}, "prefixes": [], "globs": []}

# A glob without any glob syntax matches itself only.
_literal_glob(g) if not regex.match(`[*?\[\]{}\\,]`, g)

# `P/**` with a literal, non-empty P matches P and everything under `P/`.
_literal_prefix_glob(g) if {
	endswith(g, "/**")
	p := trim_suffix(g, "/**")
	p != ""
	_literal_glob(p)
}

_glob_literals(g) := [g] if _literal_glob(g)

_glob_literals(g) := [trim_suffix(g, "/**")] if _literal_prefix_glob(g)

# `_path_ok` for a string path (a rule with no path lists the prefix ""); NUL is checked only
# on a match: a path holding NUL matches no glob, and the branches below decide for it.
_path_ok_fast(rule, path) if {
	strings.any_prefix_match(path, rule.prefixes)
	not contains(path, "\u0000")
}

_path_ok_fast(rule, path) if {
	rule.exact[path]
	not contains(path, "\u0000")
}

_path_ok_fast(rule, path) if {
	not contains(path, "\u0000")
	some g in rule.globs
	path_match(g, path)
}

# Index entries of every destination naming the request's target.
# Host destinations match the name the request carries (Host, :authority, SNI, DNS question):
# `api.github.com` itself, `*.github.com` any name ending in `.github.com` (never `github.com`).
# CIDR destinations match the address the agent dialled, never a name, and never answer DNS.
_hits := array.concat(array.concat(object.get(_ix.hosts, input.request.host, []), _wildcard_hits), _cidr_hits)

# A request through an address (CIDR) destination is sent to the address the agent dialled, so
# it may name no host (other TCP, TLS without SNI) or only that address itself: a name (Host,
# :authority, SNI) would be a request for another destination, sent with this capability's
# credential to an address the name does not belong to. A name reaches an address capability's
# range only through a host destination, which the node resolves itself.
_names_dialled_address if not is_string(input.request.host)

_names_dialled_address if input.request.host == input.request.destination.address

_wildcard_hits := [w |
	some w in _ix.wildcards
	endswith(input.request.host, w.suffix)
] if {
	is_string(input.request.host)
	not _ix.hosts[input.request.host] # a host the cell spells out lists its wildcards already
} else := []

_cidr_hits := [c |
	some c in _ix.cidrs
	net.cidr_contains(c.cidr, input.request.destination.address)
] if {
	input.request.protocol != "dns"
	input.request.destination.address != ""
	_names_dialled_address
} else := []

# [rank, capability index] of every capability granting the request: one naming the target on a
# listed port (a DNS query has no port), through passthrough for an undecrypted TLS connection,
# and whose HTTP rule matches for decrypted HTTP.
_grants := {[h.rank, h.cap] | some h in _hits; input.request.port in h.ports; _http_ok(h)} if {
	input.request.protocol in {"https", "http"}
} else := {[h.rank, h.cap] | some h in _hits} if {
	input.request.protocol == "dns"
} else := {[h.rank, h.cap] | some h in _hits; input.request.port in h.ports; h.passthrough} if {
	input.request.protocol == "tls"
} else := {[h.rank, h.cap] | some h in _hits; input.request.port in h.ports; _tcp_capability(h.cap)}

# Only a capability that asks for raw TCP (`protocol: tcp`) grants a raw relay: bytes that are
# neither TLS nor HTTP never leave through an HTTP capability.
_tcp_capability(i) if object.get(caps[i], "protocol", "http") == "tcp"

_http_protocols := {"http", "https"}

# The method is listed (or the list is empty), and the path matches one glob (or the list is
# empty).
_http_ok(rule) if {
	object.get(rule.methods, input.request.method, rule.any_method)
	_path_ok(rule)
}

_path_ok(rule) if rule.any_path

_path_ok(rule) if rule.exact[_path]

_path_ok(rule) if {
	some p in rule.prefixes
	startswith(_path, p)
}

_path_ok(rule) if {
	some g in rule.globs
	path_match(g, _path)
}

# The request's path, when it can match a glob: `glob.match` refuses a string holding NUL, so
# such a path matches nothing (but an empty path list).
_path := input.request.path if {
	is_string(input.request.path)
	not contains(input.request.path, "\u0000")
}

# Path globs: `*` matches one segment, `**` any number of segments. A trailing `/**` also
# matches the bare prefix: `/repos/**` matches `/repos`, `/repos/a/b`, never `/reposx`.
path_match(g, path) if glob.match(g, ["/"], path)

path_match(g, path) if {
	endswith(g, "/**")
	glob.match(trim_suffix(g, "/**"), ["/"], path)
}

# The stages below explain a refusal; only denials and shadow modes evaluate them.

# Stage 1: capabilities naming the target.
target_caps := {h.cap | some h in _hits}

# Stage 2: ... on a listed port (a DNS query has no port to check).
_port_caps := target_caps if {
	req.protocol == "dns"
} else := {h.cap | some h in _hits; req.port in h.ports}

# Stage 3: an undecrypted TLS connection only through a passthrough capability.
_tls_caps := {i | some i in _port_caps; caps[i].tls == "passthrough"} if {
	req.protocol == "tls"
} else := _port_caps

# Stage 3b: raw TCP only through a tcp capability.
_proto_caps := {i | some i in _tls_caps; _tcp_capability(i)} if {
	req.protocol == "tcp"
} else := _tls_caps

# Stage 4: the HTTP rule, for decrypted HTTP only.
granted_caps := {g[1] | some g in _grants}

# Sets iterate in ascending order, so [0] is the first in manifest order.
enforce_grants := [g[1] | some g in _grants; g[0] == 0]

shadow_grants := [g[1] | some g in _grants; g[0] == 1]

_enforce_misses := [i | some i in target_caps; not i in granted_caps; caps[i].mode == "enforce"]

_shadow_misses := [i | some i in target_caps; not i in granted_caps; caps[i].mode == "shadow"]

# Why capability i (naming the target) refused the request.
_status(i) := "port_not_allowed" if {
	not i in _port_caps
} else := "tls_passthrough_required" if {
	not i in _tls_caps
} else := "tcp_capability_required" if {
	not i in _proto_caps
} else := "http_rule_mismatch"

# Among capabilities that name the target but refuse the request, report the closest miss: an
# HTTP rule mismatch says more than a TLS mode mismatch, which says more than a wrong port.
_rank := {"http_rule_mismatch": 0, "tcp_capability_required": 1, "tls_passthrough_required": 1, "port_not_allowed": 2}

_best_miss(indices) := m if {
	ranked := [[_rank[_status(i)], i] | some i in indices]
	best := min(ranked)
	i := best[1]
	status := _status(i)
	m := {"index": i, "status": status, "message": _miss_message(caps[i], status)}
}

_enforce_miss := _best_miss(_enforce_misses)

_shadow_miss := _best_miss(_shadow_misses)

# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

# The layers are resolved once per policy version: the loader generates the package
# `cellgate.internal.layers` naming every layer package, with
#   resolved := true
#   quiet if {not data.cellgate.layers["<name>"].deny != set(); ...}   (true with no layer)
#   denies contains ["<name>", data.cellgate.layers["<name>"].deny]  (for each layer with a deny)
# Without it (another evaluator, a set whose packages the loader cannot resolve), the rules
# below walk `data.cellgate.layers`, with the same result.

# Whether no layer has anything to say: no `deny` at all, or an empty set. Layers are evaluated
# on every request: keep them to cheap comparisons.
_layers_quiet if data.cellgate.internal.layers.quiet

_layers_quiet if {
	not data.cellgate.internal.layers.resolved
	not _layers_speak
}

_layers_speak if {
	some layer in data.cellgate.layers
	layer.deny != set()
}

_layers_speak if {
	some layer in data.cellgate.layers
	layer.shadow_deny != set()
}

# [layer name, its `deny`] for every layer that defines one.
_layer_denies := data.cellgate.internal.layers.denies if {
	data.cellgate.internal.layers.resolved
} else := {[name, layer.deny] |
	some name, layer in data.cellgate.layers
	"deny" in object.keys(layer)
}

# Every entry of every layer's deny set. A layer package without a `deny` rule contributes
# nothing.
layer_denials contains d if {
	some [_, deny] in _layer_denies
	is_set(deny)
	some d in deny
}

# [layer name, set] of what would deny in shadow: the `deny` of a layer in a shadow pack
# (`mode: shadow` in its pack.yaml) and the `shadow_deny` of any layer. The loader names them
# (`shadow_denies` of the generated package); without it, every `shadow_deny` set.
_layer_shadow_denies := data.cellgate.internal.layers.shadow_denies if {
	data.cellgate.internal.layers.resolved
} else := {[name, layer.shadow_deny] |
	some name, layer in data.cellgate.layers
	"shadow_deny" in object.keys(layer)
}

# Every entry of those sets: what enforcement would deny.
layer_shadow_denials contains d if {
	some [_, deny] in _layer_shadow_denies
	is_set(deny)
	some d in deny
}

# The layers that denied, and those that would have, by name (`cellgate.layers.<name>`); the
# loader maps them to packs.
_with_layers(d) := object.union(d, {"layers": {
	"deny": sort({name | some [name, deny] in _layer_denies; is_set(deny); count(deny) > 0}),
	"shadow_deny": sort({name | some [name, deny] in _layer_shadow_denies; is_set(deny); count(deny) > 0}),
}})

# A layer whose `deny` is not a set (for example `deny if ...`, a boolean) would silently deny
# nothing: it turns the decision into a policy error instead.
malformed_layers contains name if {
	some [name, deny] in _layer_denies
	not is_set(deny)
}

malformed_layers contains d if {
	some d in layer_denials
	not _well_formed_denial(d)
}

malformed_layers contains name if {
	some [name, deny] in _layer_shadow_denies
	not is_set(deny)
}

malformed_layers contains d if {
	some d in layer_shadow_denials
	not _well_formed_denial(d)
}

_well_formed_denial(d) if is_string(d)

_well_formed_denial(d) if {
	is_object(d)
	is_string(d.reason)
	is_string(d.message)
}

_denial_labels := {l | some d in layer_denials; l := _denial_label(d)}

_denial_label(d) := d.reason if is_object(d) else := "policy_denied"

# One label when every denial agrees on it, `policy_denied` otherwise.
_layer_reason := "policy_error" if {
	count(malformed_layers) > 0
} else := l if {
	count(_denial_labels) == 1
	some l in _denial_labels
} else := "policy_denied"

_layer_messages := [m | some d in malformed_layers; m := sprintf("malformed layer denial: %v", [d])] if {
	count(malformed_layers) > 0
} else := sort([m | some d in layer_denials; m := _denial_message(d)])

_shadow_denial_labels := {l | some d in layer_shadow_denials; l := _denial_label(d)}

_shadow_layer_reason := l if {
	count(_shadow_denial_labels) == 1
	some l in _shadow_denial_labels
} else := "policy_denied"

_shadow_layer_messages := sort([m | some d in layer_shadow_denials; m := _denial_message(d)])

_denial_message(d) := d if is_string(d) else := d.message

# ---------------------------------------------------------------------------------------------
# Messages and hints (built only on the branch that needs them)
# ---------------------------------------------------------------------------------------------

_target_text := sprintf("%s:%d", [req.host, req.port]) if {
	is_string(req.host)
} else := sprintf("%s:%d", [req.destination.address, req.port])

_request_text := sprintf("%s %s%s", [req.method, _target_text, req.path]) if {
	req.protocol in _http_protocols
	is_string(req.method)
	is_string(req.path)
} else := sprintf("%s %s", [req.protocol, _target_text])

_miss_message(cap, "port_not_allowed") := sprintf(
	"capability %s names %s but not port %d",
	[cap.name, _target_name, req.port],
)

_miss_message(cap, "tls_passthrough_required") := sprintf(
	"capability %s intercepts TLS; an undecrypted TLS connection needs a passthrough capability",
	[cap.name],
)

_miss_message(cap, "tcp_capability_required") := sprintf(
	"capability %s carries HTTP; a connection that is neither TLS nor HTTP needs a capability with protocol: tcp",
	[cap.name],
)

_miss_message(cap, "http_rule_mismatch") := sprintf(
	"capability %s reaches %s but does not allow %s %s",
	[cap.name, _target_name, _or_dash(req.method), _or_dash(req.path)],
)

_target_name := req.host if is_string(req.host) else := req.destination.address

_or_dash(x) := x if is_string(x) else := "-"

_no_capability_message := sprintf("no capability of this cell reaches %s", [_request_text])

_http_text(cap) := "any request" if {
	cap.http == null
} else := sprintf("%s %s", [_list_or_any(cap.http.methods, "any method"), _list_or_any(cap.http.paths, "any path")])

_list_or_any(xs, any) := any if count(xs) == 0 else := concat("|", xs)

_dest_text(d) := sprintf("%s:%s", [d.host, _ports_text(d.ports)]) if is_string(d.host) else := sprintf("%s:%s", [d.cidr, _ports_text(d.ports)])

_ports_text(ports) := concat(",", [format_int(p, 10) | some p in ports])

_cap_text(cap) := sprintf("%s via capability %s (%s)", [
	concat(" ", [_dest_text(d) | some d in cap.destinations]),
	cap.name,
	_http_text(cap),
])

_reach_hint := "this cell has no capabilities; ask an operator to grant one" if {
	count(caps) == 0
} else := sprintf("%s is not reachable from this cell. This cell may call: %s. Ask an operator to add a capability for anything else.", [
	_request_text,
	concat("; ", [_cap_text(cap) | some cap in caps]),
])

_miss_hint := sprintf("%s is refused. For this destination this cell may call: %s.", [
	_request_text,
	concat("; ", [_cap_text(caps[i]) | some i in _enforce_misses]),
])
