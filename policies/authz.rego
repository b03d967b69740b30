# ztagent authorization policy: data.ztagent.authz.decision
#
# Input: see input.schema.json (device, posture, user, request, context).
# Output: {"allow": bool, "reasons": [string], "headers": {string: string}}, see
# decision.schema.json. Default deny: a call is allowed only when the method is configured
# in data.ztagent.config.services and no denial below applies.
#
# Configuration lives in data.json at the policy root -> data.ztagent.config:
#   devices.deny            [device id]   always denied           -> "device_denied"
#   devices.allow           [device id]   optional; when an array, only these devices
#                                         may call anything       -> "device_not_allowed"
#   services[S].methods[M]  {"roles": [..], "scopes": [..], "open": bool,
#                            "require_posture": bool}
#       unknown S or M                                            -> "method_not_allowed"
#       open = true: no user needed; otherwise the user must be
#       authenticated                                             -> "user_unauthenticated"
#       roles/scopes: the user needs any one of the roles or any
#       one of the scopes                 -> "role_required:<r>", "scope_required:<s>"
#   posture requirements (see posture.rego)                       -> "posture_required"
#   gRPC server reflection (grpc.reflection.v1 / v1alpha ServerReflectionInfo) is an
#   open method for every device unless services[S] configures it       -> "open_method"
package ztagent.authz

# Written for the interpreter's cost model: every rule evaluated costs a few microseconds
# per request, builtins and comprehensions much less. So the method's configuration is
# read once (`route`), posture rules are referenced by full path (an import alias makes
# the interpreter evaluate the whole posture package), and the decision is built by one
# `else` chain instead of separate reasons/headers rules.

# The called method's configuration, read once per request: services[S].methods[M] when
# it is an object, else an unknown method (nothing open, nothing required).
route := {
	"known": true,
	"open": object.get(method_config, "open", false) == true,
	"roles": object.get(method_config, "roles", []),
	"scopes": object.get(method_config, "scopes", []),
} if {
	method_config := object.get(
		data.ztagent.config,
		["services", input.request.service, "methods", input.request.method],
		null,
	)
	is_object(method_config)
} else := {"known": true, "open": true, "roles": [], "scopes": []} if {
	# gRPC server reflection (grpcurl list / describe): open to every device that passed
	# the identity check (the user token is not needed), unless data configures the service
	# above. The sidecar answers it itself; the device deny / allow lists still apply.
	input.request.service in reflection_services
	input.request.method == "ServerReflectionInfo"
} else := {"known": false, "open": false, "roles": [], "scopes": []}

reflection_services := {
	"grpc.reflection.v1.ServerReflection",
	"grpc.reflection.v1alpha.ServerReflection",
}

authenticated if input.user.authenticated == true

# --- grants: what lets the user through this method ----------------------------------

grants contains "open_method" if route.open

grants contains sprintf("role_granted:%s", [role]) if {
	authenticated
	some role in route.roles
	role in input.user.roles
}

grants contains sprintf("scope_granted:%s", [scope]) if {
	authenticated
	some scope in route.scopes
	scope in input.user.scope
}

# A method without roles and scopes only needs an authenticated user.
grants contains "authenticated" if {
	authenticated
	count(route.roles) + count(route.scopes) == 0
}

# --- denials ---------------------------------------------------------------------------

deny contains "device_denied" if {
	input.device.id in object.get(data.ztagent.config, ["devices", "deny"], [])
}

deny contains "device_not_allowed" if {
	allowed_devices := data.ztagent.config.devices.allow
	is_array(allowed_devices)
	not input.device.id in allowed_devices
}

deny contains "method_not_allowed" if not route.known

deny contains "user_unauthenticated" if {
	not route.open
	not authenticated
}

# An authenticated user holding none of the method's roles and scopes: name them all.
deny contains sprintf("role_required:%s", [role]) if {
	route.known
	not route.open
	authenticated
	count(grants) == 0
	some role in route.roles
}

deny contains sprintf("scope_required:%s", [scope]) if {
	route.known
	not route.open
	authenticated
	count(grants) == 0
	some scope in route.scopes
}

deny contains "posture_required" if {
	data.ztagent.posture.required
	not data.ztagent.posture.posture_ok
}

# --- the decision ----------------------------------------------------------------------

default allow := false

allow if {
	route.known
	count(grants) > 0
	count(deny) == 0
}

# Two shapes of decision; `allow` decides which. Headers: x-ztagent-decision always,
# x-ztagent-user (the token subject) when the user is authenticated.
decision := {
	"allow": true,
	"reasons": sort({"allowed"} | grants),
	"headers": object.union({"x-ztagent-decision": "allow"}, user_headers),
} if allow
else := {
	"allow": false,
	"reasons": denial_reasons,
	"headers": object.union({"x-ztagent-decision": "deny"}, user_headers),
}

denial_reasons := sort(deny) if count(deny) > 0
else := ["denied"] # not reachable with the rules above; keeps the decision defined

user_headers := {"x-ztagent-user": input.user.sub} if {
	authenticated
	is_string(input.user.sub)
} else := {}
