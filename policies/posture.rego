# Posture rules used by ztagent.authz.
#
# `required` says whether the requested route needs an attested device posture;
# `posture_ok` says whether input.posture satisfies it. The posture stage of the sidecar
# fills input.posture (verified, age_s, firmware, boot); until then `verified` is false.
# Extend this package (firmware allow lists, PCR reference values...) by adding
# conditions to `posture_ok`; keep its name, authz depends on it.
package ztagent.posture

service_config := object.get(data.ztagent.config, ["services", input.request.service], {})

# --- is posture required for this route? ---------------------------------------------

default required := false

# A whole service: services[S].require_posture = true
required if service_config.require_posture == true

# One method: services[S].methods[M].require_posture = true
required if {
	object.get(service_config, ["methods", input.request.method, "require_posture"], null) == true
}

# Named models of a service: services[S].require_posture_for_critical = true, the model
# named in request metadata services[S].model_metadata_key is in services[S].critical_models.
required if {
	service_config.require_posture_for_critical == true
	model := input.request.metadata[service_config.model_metadata_key]
	model in service_config.critical_models
}

# --- does the device posture satisfy it? ----------------------------------------------

# max_age_s: null (or absent) means no age limit beyond the sidecar's own posture.max_age.
max_age_s := object.get(data.ztagent.config, ["posture", "max_age_s"], null)

default fresh := false

fresh if max_age_s == null

fresh if {
	is_number(max_age_s)
	is_number(input.posture.age_s)
	input.posture.age_s <= max_age_s
}

default posture_ok := false

posture_ok if {
	input.posture.verified == true
	fresh
}

# Short stable reasons explaining why posture_ok is false (for decision reasons/logs).
problems contains "posture_unverified" if input.posture.verified != true

problems contains "posture_stale" if {
	input.posture.verified == true
	not fresh
}
