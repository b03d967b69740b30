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
package ztagent.authz

import data.ztagent.posture

config := data.ztagent.config

method_config := object.get(
	config,
	["services", input.request.service, "methods", input.request.method],
	null,
)

known_method if is_object(method_config)

open_method if method_config.open == true

authenticated if input.user.authenticated == true

required_roles := object.get(method_config, "roles", []) if known_method else := []

required_scopes := object.get(method_config, "scopes", []) if known_method else := []

has_requirements if count(required_roles) + count(required_scopes) > 0

# --- grants: what lets the user through this method ----------------------------------

grants contains "open_method" if open_method

grants contains sprintf("role_granted:%s", [role]) if {
	authenticated
	some role in required_roles
	role in input.user.roles
}

grants contains sprintf("scope_granted:%s", [scope]) if {
	authenticated
	some scope in required_scopes
	scope in input.user.scope
}

grants contains "authenticated" if {
	authenticated
	not has_requirements
}

user_granted if {
	known_method
	count(grants) > 0
}

# --- denials ---------------------------------------------------------------------------

deny contains "device_denied" if input.device.id in object.get(config, ["devices", "deny"], [])

deny contains "device_not_allowed" if {
	allowed_devices := config.devices.allow
	is_array(allowed_devices)
	not input.device.id in allowed_devices
}

deny contains "method_not_allowed" if not known_method

deny contains "user_unauthenticated" if {
	not open_method
	not authenticated
}

deny contains sprintf("role_required:%s", [role]) if {
	known_method
	not open_method
	authenticated
	not user_granted
	some role in required_roles
}

deny contains sprintf("scope_required:%s", [scope]) if {
	known_method
	not open_method
	authenticated
	not user_granted
	some scope in required_scopes
}

deny contains "posture_required" if {
	posture.required
	not posture.posture_ok
}

# --- the decision ----------------------------------------------------------------------

default allow := false

allow if {
	known_method
	user_granted
	count(deny) == 0
}

reasons := sort({"allowed"} | grants) if allow

reasons := sort(deny) if {
	not allow
	count(deny) > 0
}

# Not reachable with the rules above; keeps the decision defined if a rule is edited.
reasons := ["denied"] if {
	not allow
	count(deny) == 0
}

user_headers := {"x-ztagent-user": input.user.sub} if {
	authenticated
	is_string(input.user.sub)
} else := {}

headers := object.union({"x-ztagent-decision": decision_word}, user_headers)

decision_word := "allow" if allow else := "deny"

decision := {"allow": allow, "reasons": reasons, "headers": headers}
