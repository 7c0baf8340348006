# Cellgate base policy.
#
# Entry point: data.cellgate.authz.decision, a decision document (cellgate.dev/decision/v1):
#   {allow, outcome, capability, mode, reason, reasons, hint}
# Input: cellgate.dev/input/v1 (see docs/policy.md and crates/cellgate-api/src/policy.rs).
#
# A request is allowed when a capability of the cell grants it and no layer denies it.
# Layers are user packs under data.cellgate.layers.<name>, each defining a `deny` set of strings
# or {"reason": label, "message": text} objects. Deny wins.
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

decision := _deny("cell_suspended", ["the cell is suspended"], null) if {
	input.cell.suspended == true
} else := _deny(_layer_reason, _layer_messages, null) if {
	count(malformed_layers) > 0
} else := _deny(_layer_reason, _layer_messages, null) if {
	count(enforce_grants) > 0
	count(layer_denials) > 0
} else := _result(true, "allow", enforce_grants[0], "allowed", [], null) if {
	count(enforce_grants) > 0
} else := _result(true, "shadow_deny", shadow_grants[0], _layer_reason, _layer_messages, null) if {
	count(shadow_grants) > 0
	count(layer_denials) > 0
} else := _result(true, "allow", shadow_grants[0], "allowed", [], null) if {
	count(shadow_grants) > 0
} else := _result(true, "shadow_deny", _shadow_miss.index, _shadow_miss.status, [_shadow_miss.message], null) if {
	count(_shadow_misses) > 0
} else := _deny(_enforce_miss.status, [_enforce_miss.message], _miss_hint) if {
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

# The matching below is written for the evaluator: a handful of set and array comprehensions
# computed once per request, instead of helper functions called per capability and destination.
# Every stage narrows the previous one, so the reason for a miss falls out of set membership.

# Host patterns that match the request's host: the host itself and one `*.` wildcard per parent
# domain. `a.b.github.com` yields {a.b.github.com, *.b.github.com, *.github.com, *.com}; the bare
# `github.com` is never matched by `*.github.com`.
_host_keys := keys if {
	is_string(req.host)
	labels := split(req.host, ".")
	n := count(labels)
	keys := {req.host} | {k | some j, _ in labels; j > 0; k := concat(".", array.concat(["*"], array.slice(labels, j, n)))}
} else := set()

# [capability index, destination] for every destination naming the request's target.
# Host destinations match the name the request carries (Host, :authority, SNI, DNS question);
# CIDR destinations match the address the agent dialled, never a name, and never answer DNS.
_hits := array.concat(
	[[i, d] | some i, cap in caps; some d in cap.destinations; d.host in _host_keys],
	_cidr_hits,
)

_cidr_hits := [[i, d] |
	some i, cap in caps
	some d in cap.destinations
	is_string(d.cidr)
	net.cidr_contains(d.cidr, req.destination.address)
] if {
	req.protocol != "dns"
	req.destination.address != ""
} else := []

# Stage 1: capabilities naming the target.
target_caps := {i | some h in _hits; i := h[0]}

# Stage 2: ... on a listed port (a DNS query has no port to check).
_port_caps := target_caps if {
	req.protocol == "dns"
} else := {i | some h in _hits; req.port in h[1].ports; i := h[0]}

# Stage 3: an undecrypted TLS connection only through a passthrough capability.
_tls_caps := {i | some i in _port_caps; caps[i].tls == "passthrough"} if {
	req.protocol == "tls"
} else := _port_caps

# Stage 4: the HTTP rule, for decrypted HTTP only.
_http_protocols := {"http", "https"}

granted_caps := {i | some i in _tls_caps; _http_ok(caps[i].http)} if {
	req.protocol in _http_protocols
} else := _tls_caps

_http_ok(rule) if rule == null

_http_ok(rule) if {
	is_object(rule)
	_method_ok(rule.methods)
	_path_ok(rule.paths)
}

_method_ok(methods) if count(methods) == 0

_method_ok(methods) if req.method in methods

_path_ok(paths) if count(paths) == 0

_path_ok(paths) if {
	is_string(req.path)
	some g in paths
	path_match(g, req.path)
}

# Path globs: `*` matches one segment, `**` any number of segments. A trailing `/**` also
# matches the bare prefix: `/repos/**` matches `/repos`, `/repos/a/b`, never `/reposx`.
path_match(g, path) if glob.match(g, ["/"], path)

path_match(g, path) if {
	endswith(g, "/**")
	glob.match(trim_suffix(g, "/**"), ["/"], path)
}

# Sets of numbers iterate in ascending order, so [0] is the first in manifest order.
enforce_grants := [i | some i in granted_caps; caps[i].mode == "enforce"]

shadow_grants := [i | some i in granted_caps; caps[i].mode == "shadow"]

_enforce_misses := [i | some i in target_caps; not i in granted_caps; caps[i].mode == "enforce"]

_shadow_misses := [i | some i in target_caps; not i in granted_caps; caps[i].mode == "shadow"]

# Why capability i (naming the target) refused the request.
_status(i) := "port_not_allowed" if {
	not i in _port_caps
} else := "tls_passthrough_required" if {
	not i in _tls_caps
} else := "http_rule_mismatch"

# Among capabilities that name the target but refuse the request, report the closest miss: an
# HTTP rule mismatch says more than a TLS mode mismatch, which says more than a wrong port.
_rank := {"http_rule_mismatch": 0, "tls_passthrough_required": 1, "port_not_allowed": 2}

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

# Every entry of every layer's deny set. A layer package without a `deny` rule contributes
# nothing.
layer_denials contains d if {
	some layer in data.cellgate.layers
	is_set(layer.deny)
	some d in layer.deny
}

# A layer whose `deny` is not a set (for example `deny if ...`, a boolean) would silently deny
# nothing: it turns the decision into a policy error instead.
malformed_layers contains name if {
	some name, layer in data.cellgate.layers
	"deny" in object.keys(layer)
	not is_set(layer.deny)
}

malformed_layers contains d if {
	some d in layer_denials
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
