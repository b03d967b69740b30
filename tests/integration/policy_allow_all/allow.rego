# Test-only policy: allows every call, so proxy tests exercise forwarding alone.
package ztagent.authz

decision := {"allow": true, "reasons": ["test_allow_all"], "headers": {}}
