# Policy pack: limits on LLM API calls, decided on the request body (OpenAI chat completions and
# responses, Anthropic messages). Needs a capability that reads bodies (`inspect: {json: true}`),
# which puts the body in input.request.json; without it these rules have nothing to read and
# deny nothing.
#
# Configured per cell by labels on the AgentCell (absent label: no limit of that kind):
#   cellgate.dev/llm-models      comma-separated models allowed, e.g. "gpt-4o-mini,claude-3-5-haiku-20241022"
#   cellgate.dev/llm-max-tokens  the most output tokens a request may ask for (max_tokens,
#                                max_completion_tokens, max_output_tokens); a request that asks
#                                for none is refused too (the provider's default may be unbounded)
#   cellgate.dev/llm-tools       "false": no tool (function) definitions in requests
#   cellgate.dev/llm-stream      "false": no streamed responses (stream: true)
package cellgate.layers.llm_limits

import rego.v1

_labels := object.get(input.cell, "labels", {})

_body := input.request.json if is_object(input.request.json)

_models := {trim_space(m) | some m in split(_labels["cellgate.dev/llm-models"], ","); trim_space(m) != ""}

deny contains {"reason": "llm_model_not_allowed", "message": msg} if {
	_labels["cellgate.dev/llm-models"]
	model := object.get(_body, "model", "(none)")
	not model in _models
	msg := sprintf("model %v is not allowed for this cell (allowed: %v)", [model, concat(", ", sort(_models))])
}

_token_fields := ["max_tokens", "max_completion_tokens", "max_output_tokens"]

_asked contains n if {
	some f in _token_fields
	n := _body[f]
}

deny contains {"reason": "llm_max_tokens_too_high", "message": msg} if {
	cap := to_number(_labels["cellgate.dev/llm-max-tokens"])
	some n in _asked
	n > cap
	msg := sprintf("at most %v output tokens may be asked for; this request asks for %v", [cap, n])
}

deny contains {"reason": "llm_max_tokens_missing", "message": msg} if {
	cap := to_number(_labels["cellgate.dev/llm-max-tokens"])
	_body.model
	count(_asked) == 0
	msg := sprintf("set max_tokens (or max_completion_tokens, max_output_tokens) to at most %v", [cap])
}

deny contains {"reason": "llm_tools_not_allowed", "message": "tool definitions are not allowed for this cell"} if {
	_labels["cellgate.dev/llm-tools"] == "false"
	count(object.get(_body, "tools", [])) > 0
}

deny contains {"reason": "llm_stream_not_allowed", "message": "streamed responses are not allowed for this cell"} if {
	_labels["cellgate.dev/llm-stream"] == "false"
	_body.stream == true
}
