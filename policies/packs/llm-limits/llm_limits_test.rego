# Tests of the llm-limits pack.
package cellgate.tests.llm_limits

import rego.v1

_labels := {
	"cellgate.dev/llm-models": "gpt-4o-mini, claude-3-5-haiku-20241022",
	"cellgate.dev/llm-max-tokens": "1024",
	"cellgate.dev/llm-tools": "false",
	"cellgate.dev/llm-stream": "false",
}

_cell(labels) := {
	"uid": "u1", "namespace": "agents", "name": "agent", "role": null,
	"suspended": false, "labels": labels,
	"capabilities": [{
		"name": "llm", "mode": "enforce", "tls": "intercept",
		"destinations": [{"host": "api.openai.com", "cidr": null, "ports": [443]}],
		"http": null, "approval": false, "credential": false,
	}],
}

_input(labels, body) := {
	"version": "cellgate.dev/input/v1", "time_ns": 0, "front_door": "intake",
	"source": {"address": "10.0.0.2", "port": 40000},
	"identity": {"jti": "j", "cell_uid": "u1", "namespace": "agents", "name": "agent", "role": null},
	"cell": _cell(labels),
	"request": {
		"protocol": "https", "host": "api.openai.com", "port": 443, "sni": "api.openai.com",
		"method": "POST", "path": "/v1/chat/completions", "query": null, "headers": {},
		"destination": {"address": "203.0.113.10", "port": 443}, "dns_type": null,
		"json": body,
	},
}

_decide(labels, body) := d if {
	d := data.cellgate.authz.decision with input as _input(labels, body)
}

test_within_limits_allowed if {
	d := _decide(_labels, {"model": "gpt-4o-mini", "max_completion_tokens": 512, "messages": []})
	d.allow == true
}

test_other_model_denied if {
	d := _decide(_labels, {"model": "gpt-4o", "max_tokens": 10})
	d.allow == false
	d.reason == "llm_model_not_allowed"
}

test_too_many_tokens_denied if {
	d := _decide(_labels, {"model": "claude-3-5-haiku-20241022", "max_tokens": 4096})
	d.reason == "llm_max_tokens_too_high"
}

test_responses_api_field_counts if {
	d := _decide(_labels, {"model": "gpt-4o-mini", "max_output_tokens": 2048})
	d.reason == "llm_max_tokens_too_high"
}

test_no_cap_denied if {
	d := _decide(_labels, {"model": "gpt-4o-mini"})
	d.reason == "llm_max_tokens_missing"
}

test_tools_and_stream_denied if {
	d := _decide(_labels, {"model": "gpt-4o-mini", "max_tokens": 5, "tools": [{"type": "function"}]})
	d.reason == "llm_tools_not_allowed"
	s := _decide(_labels, {"model": "gpt-4o-mini", "max_tokens": 5, "stream": true})
	s.reason == "llm_stream_not_allowed"
}

test_no_labels_no_limits if {
	d := _decide({}, {"model": "anything", "max_tokens": 999999, "stream": true, "tools": [1]})
	d.allow == true
}

test_no_body_nothing_to_decide if {
	inp := _input(_labels, {})
	req := object.remove(inp.request, ["json"])
	d := data.cellgate.authz.decision with input as object.union(object.remove(inp, ["request"]), {"request": req})
	d.allow == true
}
