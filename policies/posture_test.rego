# Tests of ztagent.posture. Run: ztagent policy test policies/
package ztagent.posture_test

import data.ztagent.posture

request(service, method, metadata) := {
	"service": service,
	"method": method,
	"full_method": sprintf("/%s/%s", [service, method]),
	"metadata": metadata,
	"peer": "ipv4:127.0.0.1:51234",
}

unverified := {
	"verified": false,
	"age_s": null,
	"firmware": {"name": null, "version": null, "signed": false, "signer": null},
	"boot": {"verified": false, "pcrs": {}},
	"host": {},
}

verified(age_s) := object.union(unverified, {
	"verified": true,
	"age_s": age_s,
	"firmware": {"name": "edge-fw", "version": "1.4.2", "signed": true, "signer": "vendor"},
	"boot": {"verified": true},
})

storage_get := {"posture": unverified, "request": request("ztagent.workloads.v1.Storage", "Get", {})}

critical_predict := {
	"posture": unverified,
	"request": request(
		"ztagent.workloads.v1.Inference", "Predict",
		{"x-model": "critical-demo"},
	),
}

# --- posture_ok ------------------------------------------------------------------------

test_unverified_not_ok if {
	not posture.posture_ok with input as storage_get
	posture.problems == {"posture_unverified"} with input as storage_get
}

test_verified_ok if {
	inp := object.union(storage_get, {"posture": verified(30)})
	posture.posture_ok with input as inp
	count(posture.problems) == 0 with input as inp
}

test_verified_must_be_true_not_truthy if {
	inp := object.union(storage_get, {"posture": object.union(unverified, {"verified": "yes"})})
	not posture.posture_ok with input as inp
}

test_max_age if {
	fresh := object.union(storage_get, {"posture": verified(30)})
	stale := object.union(storage_get, {"posture": verified(900)})
	posture.posture_ok with input as fresh with data.ztagent.config.posture.max_age_s as 300
	not posture.posture_ok with input as stale with data.ztagent.config.posture.max_age_s as 300
	posture.problems == {"posture_stale"} with input as stale
		with data.ztagent.config.posture.max_age_s as 300
	posture.posture_ok with input as stale
}

test_max_age_absent_means_no_limit if {
	inp := object.union(storage_get, {"posture": verified(100000)})
	posture.posture_ok with input as inp with data.ztagent.config.posture as {}
}

# --- required --------------------------------------------------------------------------

test_not_required_by_default if {
	not posture.required with input as storage_get
}

test_required_for_critical_model if {
	posture.required with input as critical_predict
}

test_not_required_for_other_model if {
	inp := object.union(critical_predict, {"request": {"metadata": {"x-model": "resnet"}}})
	not posture.required with input as inp
}

test_not_required_without_model_header if {
	inp := json.patch(critical_predict, [{"op": "replace", "path": "/request/metadata", "value": {}}])
	not posture.required with input as inp
}

test_critical_switch_off if {
	not posture.required with input as critical_predict
		with data.ztagent.config.services["ztagent.workloads.v1.Inference"].require_posture_for_critical as false
}

test_required_by_service_flag if {
	posture.required with input as storage_get
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].require_posture as true
}

test_required_by_method_flag if {
	posture.required with input as storage_get
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].methods.Get.require_posture as true
	not posture.required with input as storage_get
		with data.ztagent.config.services["ztagent.workloads.v1.Storage"].methods.Put.require_posture as true
}

test_required_for_unknown_service_is_false if {
	inp := {"posture": unverified, "request": request("x.v1.Nope", "Do", {})}
	not posture.required with input as inp
}
