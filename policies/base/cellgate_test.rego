# Tests of the base policy, run by the loader before a set is accepted (and by `opa test`).
package cellgate.tests.base

import rego.v1

import data.cellgate.authz

_github := {
	"name": "github", "mode": "enforce", "tls": "intercept",
	"destinations": [{"host": "api.github.com", "cidr": null, "ports": [443]}],
	"http": {"methods": ["GET"], "paths": ["/repos/**"]},
	"approval": false, "credential": true,
}

_wild := {
	"name": "wild", "mode": "enforce", "tls": "intercept",
	"destinations": [{"host": "*.example.com", "cidr": null, "ports": [443]}],
	"http": null, "approval": false, "credential": false,
}

_db := {
	"name": "db", "mode": "enforce", "tls": "intercept", "protocol": "tcp",
	"destinations": [{"host": null, "cidr": "10.0.0.0/8", "ports": [5432]}],
	"http": null, "approval": false, "credential": false,
}

_trial := {
	"name": "trial", "mode": "shadow", "tls": "intercept",
	"destinations": [{"host": "trial.test", "cidr": null, "ports": [443]}],
	"http": {"methods": ["GET"], "paths": []},
	"approval": false, "credential": false,
}

_input(caps, request) := {
	"version": "cellgate.dev/input/v1", "time_ns": 0, "front_door": "intake",
	"source": {"address": "10.1.0.2", "port": 40000},
	"identity": {"jti": "j", "cell_uid": "u1", "namespace": "dev", "name": "agent", "role": null},
	"cell": {
		"uid": "u1", "namespace": "dev", "name": "agent", "role": null,
		"suspended": false, "labels": {}, "capabilities": caps,
	},
	"request": object.union(
		{
			"protocol": "https", "host": null, "port": 443, "sni": null, "method": null,
			"path": null, "query": null, "headers": {},
			"destination": {"address": "203.0.113.10", "port": 443}, "dns_type": null,
		},
		request,
	),
}

_decide(caps, request) := d if {
	d := authz.decision with input as _input(caps, request)
}

test_path_globs if {
	authz.path_match("/repos/**", "/repos")
	authz.path_match("/repos/**", "/repos/a")
	authz.path_match("/repos/**", "/repos/a/b/c")
	not authz.path_match("/repos/**", "/reposx")
	not authz.path_match("/repos/**", "/reposx/a")
	authz.path_match("/repos/*/issues", "/repos/a/issues")
	not authz.path_match("/repos/*/issues", "/repos/a/b/issues")
	authz.path_match("/a/**/z", "/a/z")
	authz.path_match("/a/**/z", "/a/b/c/z")
	authz.path_match("/exact", "/exact")
	not authz.path_match("/exact", "/exact/more")
}

test_https_allowed if {
	d := _decide([_github], {"host": "api.github.com", "method": "GET", "path": "/repos/x/y"})
	d == {
		"allow": true, "outcome": "allow", "capability": "github", "mode": "enforce",
		"reason": "allowed", "reasons": [], "hint": null,
	}
}

test_method_mismatch_names_the_rule if {
	d := _decide([_github], {"host": "api.github.com", "method": "POST", "path": "/repos/x"})
	d.allow == false
	d.reason == "http_rule_mismatch"
	contains(d.hint, "GET /repos/**")
}

test_wildcard_needs_a_subdomain if {
	_decide([_wild], {"host": "a.b.example.com", "method": "GET", "path": "/"}).allow
	_decide([_wild], {"host": "example.com", "method": "GET", "path": "/"}).reason == "no_capability"
	_decide([_wild], {"host": "badexample.com", "method": "GET", "path": "/"}).reason == "no_capability"
}

test_port_not_allowed if {
	d := _decide([_wild], {"host": "a.example.com", "port": 8443, "method": "GET", "path": "/"})
	d.reason == "port_not_allowed"
}

test_cidr_matches_dialled_address_only if {
	tcp := {"protocol": "tcp", "port": 5432, "destination": {"address": "10.2.3.4", "port": 5432}}
	_decide([_db], tcp).capability == "db"
	named := {"protocol": "tcp", "host": "10.2.3.4", "port": 5432, "destination": {"address": "192.0.2.1", "port": 5432}}
	_decide([_db], named).reason == "no_capability"
}

test_raw_tcp_needs_a_tcp_capability if {
	web := object.union(_db, {"name": "web", "protocol": "http"})
	tcp := {"protocol": "tcp", "port": 5432, "destination": {"address": "10.2.3.4", "port": 5432}}
	_decide([web], tcp).reason == "tcp_capability_required"
	_decide([web, _db], tcp).capability == "db"
}

test_cidr_request_names_no_other_host if {
	dialled := {"address": "10.2.3.4", "port": 5432}
	own := {"protocol": "http", "host": "10.2.3.4", "port": 5432, "method": "GET", "path": "/", "destination": dialled}
	_decide([_db], own).capability == "db"
	other := {"protocol": "http", "host": "evil.test", "port": 5432, "method": "GET", "path": "/", "destination": dialled}
	_decide([_db], other).reason == "no_capability"
	sni := {"protocol": "tls", "host": "evil.test", "sni": "evil.test", "port": 5432, "destination": dialled}
	_decide([object.union(_db, {"tls": "passthrough"})], sni).reason == "no_capability"
}

test_tls_needs_passthrough if {
	tls := {"protocol": "tls", "host": "a.example.com", "sni": "a.example.com"}
	_decide([_wild], tls).reason == "tls_passthrough_required"
}

test_dns_ignores_port if {
	q := {"protocol": "dns", "host": "api.github.com", "port": 53, "dns_type": "A"}
	_decide([_github], q).allow
}

test_shadow_would_deny if {
	d := _decide([_trial], {"host": "trial.test", "method": "POST", "path": "/x"})
	d.allow == true
	d.outcome == "shadow_deny"
	d.mode == "shadow"
	d.reason == "http_rule_mismatch"
}

test_suspended_denies if {
	inp := object.union(_input([_wild], {"host": "a.example.com"}), {"cell": {"suspended": true}})
	d := authz.decision with input as inp
	d.reason == "cell_suspended"
}

test_no_capability_hint_lists_reach if {
	d := _decide([_github, _db], {"host": "evil.test", "method": "GET", "path": "/"})
	d.reason == "no_capability"
	contains(d.hint, "api.github.com:443 via capability github (GET /repos/**)")
	contains(d.hint, "10.0.0.0/8:5432 via capability db (any request)")
}

# The index sends literal globs and literal `P/**` globs to string comparisons instead of
# `glob.match`: both must agree on every glob.
_index_globs := ["/repos/**", "/user", "/**", "**", "/a/*/b", "/x/**/y", "/v1/{a,b}", "", "/e/**", "/a,b", "/q?", "/r/[ab]"]

_index_paths := [
	"/repos", "/repos/", "/repos/a/b", "/reposx", "/user", "/user/", "/", "", "/a/x/b", "/x/y",
	"/x/1/2/y", "/v1/a", "/e", "/e/f", "/a,b", "/q1", "user", "/r/a", "/repos/a\u0000",
]

_indexed(g, p) := true if {
	authz._path_ok(authz._derive_http({"methods": [], "paths": [g]})) with input.request.path as p
} else := false

_globbed(g, p) := true if {
	not contains(p, "\u0000")
	authz.path_match(g, p)
} else := false

test_indexed_paths_agree_with_glob_match if {
	every g in _index_globs {
		every p in _index_paths {
			_indexed(g, p) == _globbed(g, p)
		}
	}
}
