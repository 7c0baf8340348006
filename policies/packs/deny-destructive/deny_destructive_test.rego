# Tests of the deny-destructive pack. Test packages live outside cellgate.layers: the base policy
# evaluates every package under it on each request.
package cellgate.tests.deny_destructive

import rego.v1

_cell(namespace, role) := {
	"uid": "u1", "namespace": namespace, "name": "agent", "role": role,
	"suspended": false, "labels": {},
	"capabilities": [{
		"name": "api", "mode": "enforce", "tls": "intercept",
		"destinations": [{"host": "api.example.com", "cidr": null, "ports": [443]}],
		"http": null, "approval": false, "credential": false,
	}],
}

_input(namespace, role, method, path) := {
	"version": "cellgate.dev/input/v1", "time_ns": 0, "front_door": "intake",
	"source": {"address": "10.0.0.2", "port": 40000},
	"identity": {"jti": "j", "cell_uid": "u1", "namespace": namespace, "name": "agent", "role": role},
	"cell": _cell(namespace, role),
	"request": {
		"protocol": "https", "host": "api.example.com", "port": 443, "sni": "api.example.com",
		"method": method, "path": path, "query": null, "headers": {},
		"destination": {"address": "203.0.113.10", "port": 443}, "dns_type": null,
	},
}

test_readonly_delete_denied if {
	d := data.cellgate.authz.decision with input as _input("dev", "readonly", "DELETE", "/items/1")
	d.allow == false
	d.reason == "destructive_method"
	d.reasons == ["cells with role readonly may not send DELETE requests"]
}

test_readonly_get_allowed if {
	d := data.cellgate.authz.decision with input as _input("dev", "readonly", "GET", "/items/1")
	d.allow == true
}

test_writer_delete_allowed if {
	d := data.cellgate.authz.decision with input as _input("dev", "writer", "DELETE", "/items/1")
	d.allow == true
}

test_prod_admin_denied if {
	d := data.cellgate.authz.decision with input as _input("prod", null, "GET", "/v1/admin/users")
	d.allow == false
	d.reason == "policy_denied"
}

test_dev_admin_allowed if {
	d := data.cellgate.authz.decision with input as _input("dev", null, "GET", "/v1/admin/users")
	d.allow == true
}

test_both_layers_deny_as_policy_denied if {
	d := data.cellgate.authz.decision with input as _input("prod", "readonly", "DELETE", "/admin")
	d.reason == "policy_denied"
	count(d.reasons) == 2
}
