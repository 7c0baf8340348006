# Sample policy pack: deny destructive operations.
#
# A pack is a package under cellgate.layers.<name> defining `deny`, a set of strings or of
# {"reason": label, "message": text} objects. Which layer a rule belongs to is expressed by its
# conditions: on input.cell.role (role layer), input.cell.namespace (namespace layer),
# input.cell.name (cell layer), or none (cluster layer). Any entry denies the request, whatever
# the capabilities grant.
package cellgate.layers.deny_destructive

import rego.v1

_destructive_methods := {"DELETE"}

# Role layer: read-only agents never delete, on any host.
deny contains {"reason": "destructive_method", "message": msg} if {
	input.cell.role == "readonly"
	input.request.method in _destructive_methods
	msg := sprintf("cells with role readonly may not send %s requests", [input.request.method])
}

# Namespace layer: nothing in prod reaches an admin path.
deny contains msg if {
	input.cell.namespace == "prod"
	is_string(input.request.path)
	contains(input.request.path, "/admin")
	msg := sprintf("admin paths are closed to cells in namespace prod (%s)", [input.request.path])
}
