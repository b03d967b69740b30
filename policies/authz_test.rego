# Tests of ztagent.authz. Run: ztagent policy test policies/
# Each test builds an input from base_input and checks the decision (allow, reasons).
package ztagent.authz_test

import data.ztagent.authz

base_input := {
	"device": {
		"id": "demo-device",
		"spiffe_id": "spiffe://ztagent.dev/device/demo-device",
		"serial": "5f2a9c",
		"fingerprint_sha256": "8c1f0b3e4d5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
		"issuer": "CN=ztagent dev issuing CA",
		"not_before": "2026-11-26T00:00:00Z",
		"not_after": "2026-12-26T00:00:00Z",
	},
	"posture": {
		"verified": false,
		"age_s": null,
		"firmware": {"name": null, "version": null, "signed": false, "signer": null},
		"boot": {"verified": false, "pcrs": {}},
		"host": {},
	},
	"user": {
		"authenticated": true,
		"sub": "alice",
		"iss": "https://ztagent.dev/dev-issuer",
		"aud": ["ztagent"],
		"scope": [],
		"roles": ["reader"],
		"cert_bound": false,
		"claims": {"sub": "alice"},
	},
	"request": {
		"service": "ztagent.workloads.v1.Storage",
		"method": "Get",
		"full_method": "/ztagent.workloads.v1.Storage/Get",
		"metadata": {},
		"peer": "ipv4:127.0.0.1:51234",
	},
	"context": {"time": "2026-11-26T19:00:00Z", "node": "edge-01", "agent_version": "0.1.0"},
}

anonymous := {
	"authenticated": false, "sub": null, "iss": null, "aud": [], "scope": [], "roles": [],
	"cert_bound": false, "claims": {},
}

verified_posture := {
	"verified": true,
	"age_s": 30,
	"firmware": {"name": "edge-fw", "version": "1.4.2", "signed": true, "signer": "vendor"},
	"boot": {"verified": true, "pcrs": {}},
	"host": {},
}

storage := "ztagent.workloads.v1.Storage"

inference := "ztagent.workloads.v1.Inference"

# An input calling service/method as a user with these roles and scopes.
call(service, method, roles, scopes) := object.union(base_input, {
	"user": {"roles": roles, "scope": scopes},
	"request": {
		"service": service,
		"method": method,
		"full_method": sprintf("/%s/%s", [service, method]),
	},
})

anonymous_call(service, method) := object.union(call(service, method, [], []), {"user": anonymous})

# --- storage ---------------------------------------------------------------------------

test_reader_get_allowed if {
	d := authz.decision with input as call(storage, "Get", ["reader"], [])
	d.allow == true
	"allowed" in d.reasons
	"role_granted:reader" in d.reasons
}

test_reader_reads_allowed if {
	every method in ["Get", "List", "Watch"] {
		authz.allow with input as call(storage, method, ["reader"], [])
	}
}

test_writer_reads_allowed if {
	every method in ["Get", "List", "Watch"] {
		authz.allow with input as call(storage, method, ["writer"], [])
	}
}

test_read_scope_allows_get if {
	d := authz.decision with input as call(storage, "Get", [], ["storage.read"])
	d.allow == true
	"scope_granted:storage.read" in d.reasons
}

test_writer_put_allowed if {
	every method in ["Put", "BulkPut"] {
		authz.allow with input as call(storage, method, ["writer"], [])
	}
}

# Shipped data: deleting needs an attested device (require_posture on Storage.Delete).
test_writer_delete_needs_posture if {
	d := authz.decision with input as call(storage, "Delete", ["writer"], [])
	d.allow == false
	d.reasons == ["posture_required"]
	authz.allow with input as object.union(call(storage, "Delete", ["writer"], []), {"posture": verified_posture})
}

test_write_scope_allows_put if {
	authz.allow with input as call(storage, "Put", [], ["storage.write"])
}

test_reader_put_denied if {
	d := authz.decision with input as call(storage, "Put", ["reader"], ["storage.read"])
	d.allow == false
	"role_required:writer" in d.reasons
	"scope_required:storage.write" in d.reasons
	not "allowed" in d.reasons
}

test_no_roles_get_denied if {
	d := authz.decision with input as call(storage, "Get", [], [])
	d.allow == false
	"role_required:reader" in d.reasons
	"role_required:writer" in d.reasons
	"scope_required:storage.read" in d.reasons
}

test_write_scope_does_not_grant_read if {
	not authz.allow with input as call(storage, "Get", [], ["storage.write"])
}

# --- users -----------------------------------------------------------------------------

test_no_user_denied if {
	d := authz.decision with input as anonymous_call(storage, "Get")
	d.allow == false
	d.reasons == ["user_unauthenticated"]
	not d.headers["x-ztagent-user"]
}

test_authenticated_flag_is_what_counts if {
	# roles present but authenticated false: still denied
	inp := object.union(call(storage, "Get", ["reader"], []), {"user": {"authenticated": false}})
	d := authz.decision with input as inp
	d.allow == false
	"user_unauthenticated" in d.reasons
}

test_open_method_allows_anonymous if {
	d := authz.decision with input as anonymous_call("grpc.health.v1.Health", "Check")
	d.allow == true
	"open_method" in d.reasons
}

test_open_method_marked_in_data if {
	cfg := {"services": {"x.v1.Svc": {"methods": {"Ping": {"open": true}, "Pong": {}}}}}
	authz.allow with input as anonymous_call("x.v1.Svc", "Ping") with data.ztagent.config as cfg
	not authz.allow with input as anonymous_call("x.v1.Svc", "Pong") with data.ztagent.config as cfg
}

test_method_without_requirements_needs_authentication if {
	cfg := {"services": {"x.v1.Svc": {"methods": {"Pong": {}}}}}
	d := authz.decision with input as call("x.v1.Svc", "Pong", [], []) with data.ztagent.config as cfg
	d.allow == true
	"authenticated" in d.reasons
}

# Server reflection: any device may list services, without a user token.
test_reflection_open_for_devices if {
	every service in ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"] {
		d := authz.decision with input as anonymous_call(service, "ServerReflectionInfo")
		d.allow == true
		"open_method" in d.reasons
	}
}

test_reflection_other_method_not_allowed if {
	d := authz.decision with input as anonymous_call("grpc.reflection.v1alpha.ServerReflection", "Other")
	d.allow == false
	"method_not_allowed" in d.reasons
}

test_reflection_denied_device if {
	inp := anonymous_call("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo")
	cfg := {"devices": {"deny": ["demo-device"]}, "services": {}}
	d := authz.decision with input as inp with data.ztagent.config as cfg
	d.allow == false
	"device_denied" in d.reasons
}

test_reflection_configured_in_data_wins if {
	inp := anonymous_call("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo")
	cfg := {"services": {"grpc.reflection.v1alpha.ServerReflection": {"methods": {"ServerReflectionInfo": {"roles": ["admin"]}}}}}
	d := authz.decision with input as inp with data.ztagent.config as cfg
	d.allow == false
	"user_unauthenticated" in d.reasons
}

# --- devices ---------------------------------------------------------------------------

test_denied_device if {
	d := authz.decision with input as call(storage, "Get", ["writer"], [])
		with data.ztagent.config.devices.deny as ["demo-device"]
	d.allow == false
	d.reasons == ["device_denied"]
}

test_deny_list_names_other_device if {
	authz.allow with input as call(storage, "Get", ["reader"], [])
		with data.ztagent.config.devices.deny as ["other-device"]
}

test_device_allow_list if {
	inp := call(storage, "Get", ["reader"], [])
	authz.allow with input as inp with data.ztagent.config.devices.allow as ["demo-device"]
	d := authz.decision with input as inp with data.ztagent.config.devices.allow as ["edge-02"]
	d.allow == false
	d.reasons == ["device_not_allowed"]
}

test_device_allow_list_null_means_no_list if {
	authz.allow with input as call(storage, "Get", ["reader"], [])
		with data.ztagent.config.devices.allow as null
}

test_device_denied_on_open_method if {
	inp := anonymous_call("grpc.health.v1.Health", "Check")
	d := authz.decision with input as inp with data.ztagent.config.devices.deny as ["demo-device"]
	d.allow == false
	"device_denied" in d.reasons
}

# --- methods ---------------------------------------------------------------------------

test_unknown_method if {
	d := authz.decision with input as call(storage, "Drop", ["writer"], [])
	d.allow == false
	d.reasons == ["method_not_allowed"]
}

test_unknown_service if {
	d := authz.decision with input as call("evil.v1.Shell", "Exec", ["writer"], ["inference"])
	d.allow == false
	d.reasons == ["method_not_allowed"]
}

test_unknown_method_anonymous if {
	d := authz.decision with input as anonymous_call(storage, "Drop")
	d.allow == false
	"method_not_allowed" in d.reasons
}

# --- inference -------------------------------------------------------------------------

test_inference_scope if {
	every method in ["Predict", "PredictStream", "ListModels"] {
		authz.allow with input as call(inference, method, [], ["inference"])
	}
	d := authz.decision with input as call(inference, "Predict", [], [])
	d.allow == false
	d.reasons == ["scope_required:inference"]
}

test_inference_roles_do_not_grant if {
	d := authz.decision with input as call(inference, "Predict", ["writer"], ["storage.write"])
	d.allow == false
	"scope_required:inference" in d.reasons
}

# --- posture ---------------------------------------------------------------------------

critical_call := object.union(
	call(inference, "Predict", [], ["inference"]),
	{"request": {"metadata": {"x-model": "critical-demo"}}},
)

test_posture_required_denied if {
	d := authz.decision with input as critical_call
	d.allow == false
	d.reasons == ["posture_required"]
}

test_posture_required_allowed if {
	inp := object.union(critical_call, {"posture": verified_posture})
	d := authz.decision with input as inp
	d.allow == true
	"scope_granted:inference" in d.reasons
}

test_posture_not_required_for_other_models if {
	inp := object.union(critical_call, {"request": {"metadata": {"x-model": "resnet"}}})
	authz.allow with input as inp
}

# The shipped model (make model): the float variant is critical, the int8 one is not.
test_shipped_model_critical if {
	inp := object.union(critical_call, {"request": {"metadata": {"x-model": "vibration-anomaly"}}})
	d := authz.decision with input as inp
	d.reasons == ["posture_required"]
	authz.allow with input as object.union(inp, {"posture": verified_posture})
	int8 := {"request": {"metadata": {"x-model": "vibration-anomaly-int8"}}}
	authz.allow with input as object.union(critical_call, int8)
}

test_posture_required_by_method_flag if {
	inp := call(storage, "Put", ["writer"], [])
	d := authz.decision with input as inp
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].methods.Put.require_posture as true
	d.reasons == ["posture_required"]
	authz.allow with input as object.union(inp, {"posture": verified_posture})
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].methods.Put.require_posture as true
}

test_posture_required_by_service_flag if {
	inp := call(storage, "Get", ["reader"], [])
	not authz.allow with input as inp
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].require_posture as true
	authz.allow with input as object.union(inp, {"posture": verified_posture})
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].require_posture as true
}

test_posture_denial_adds_to_role_denial if {
	d := authz.decision with input as object.union(critical_call, {"user": {"scope": []}})
	d.reasons == ["posture_required", "scope_required:inference"]
}

# --- headers and shape -----------------------------------------------------------------

test_headers if {
	d := authz.decision with input as call(storage, "Get", ["reader"], [])
	d.headers == {"x-ztagent-decision": "allow", "x-ztagent-user": "alice"}
	e := authz.decision with input as anonymous_call(storage, "Get")
	e.headers == {"x-ztagent-decision": "deny"}
}

test_deny_without_reason_still_has_one if {
	inp := call(storage, "Get", ["reader"], [])
	d := authz.decision with input as inp with authz.allow as false with authz.deny as set()
	d.reasons == ["denied"]
	d.allow == false
}

test_decision_shape if {
	d := authz.decision with input as call(storage, "Put", ["reader"], [])
	is_boolean(d.allow)
	is_array(d.reasons)
	is_object(d.headers)
	count(d.reasons) > 0
}
