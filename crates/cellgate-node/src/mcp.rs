//! MCP (Model Context Protocol, Streamable HTTP) governance: what a capability's `mcp` rules
//! let an agent use and see of an MCP server.
//!
//! - A request (`POST` of one JSON-RPC message or a batch) is checked message by message:
//!   `tools/call` by the tool's `name`, `resources/read` and `resources/subscribe` by the `uri`,
//!   `prompts/get` by the prompt's `name`. One that is not allowed is not sent: the agent gets a
//!   JSON-RPC error with its `id` ([`error_response`]), audited with the name refused. In a
//!   batch, every refused call is named; the batch is not sent, and each of its other requests
//!   is answered with an error saying so (so no call waits for an answer that never comes).
//! - The answers to `tools/list`, `resources/list`, `resources/templates/list` and
//!   `prompts/list`, JSON or SSE, are filtered ([`Filter`]): the agent never sees what it may not
//!   use.
//! - Anything else (initialize, notifications, pings, a `GET` opening the server's stream)
//!   passes: the rules govern what is used, not the session.

use std::sync::Arc;

use cellgate_api::model::{McpRule, McpRules};
use serde_json::Value;

use crate::decide::Reason;

/// JSON-RPC error code of a refusal (implementation-defined server error range).
pub const REFUSED_CODE: i64 = -32001;

/// What a governed method names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A tool, by name.
    Tool,
    /// A resource, by URI.
    Resource,
    /// A prompt, by name.
    Prompt,
}

impl Kind {
    fn rule(self, rules: &McpRules) -> &McpRule {
        match self {
            Kind::Tool => &rules.tools,
            Kind::Resource => &rules.resources,
            Kind::Prompt => &rules.prompts,
        }
    }

    /// The refusal's reason.
    pub fn reason(self) -> Reason {
        match self {
            Kind::Tool => Reason::McpToolDenied,
            Kind::Resource => Reason::McpResourceDenied,
            Kind::Prompt => Reason::McpPromptDenied,
        }
    }

    /// The word for it.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Resource => "resource",
            Kind::Prompt => "prompt",
        }
    }
}

/// A governed call of a request.
fn governed(method: &str) -> Option<(Kind, &'static str)> {
    Some(match method {
        "tools/call" => (Kind::Tool, "name"),
        "resources/read" | "resources/subscribe" => (Kind::Resource, "uri"),
        "prompts/get" => (Kind::Prompt, "name"),
        _ => return None,
    })
}

/// One call refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Its JSON-RPC id (null for a notification).
    pub id: Value,
    /// Its method.
    pub method: String,
    /// What it names.
    pub kind: Kind,
    /// The name or URI refused.
    pub name: String,
}

/// A request refused by the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// Every call refused, in order.
    pub refusals: Vec<Refusal>,
    /// The ids of the batch's other requests, not sent.
    pub unsent: Vec<Value>,
    /// Whether the request was a batch (the answer is then an array).
    pub batch: bool,
}

impl Refused {
    /// The reason of the first refusal.
    pub fn reason(&self) -> Reason {
        self.refusals
            .first()
            .map_or(Reason::McpMalformed, |r| r.kind.reason())
    }

    /// What was refused, for the audit record and the agent.
    pub fn detail(&self) -> String {
        self.refusals
            .iter()
            .map(|r| {
                format!(
                    "{} {} {:?} is not allowed by the capability's mcp rules",
                    r.method,
                    r.kind.noun(),
                    r.name
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The outcome of checking a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// Allowed; the lists whose answers must be filtered.
    Pass(Vec<Kind>),
    /// Refused.
    Refused(Arc<Refused>),
    /// Not a JSON-RPC request the rules can be applied to.
    Malformed(String),
}

/// Checks the JSON-RPC message(s) of a request body against `rules`.
pub fn check(rules: &McpRules, body: Option<&Value>) -> Checked {
    let Some(body) = body else {
        return Checked::Malformed("the body is not JSON (or was not read whole)".into());
    };
    let (messages, batch): (Vec<&Value>, bool) = match body {
        Value::Array(a) if !a.is_empty() => (a.iter().collect(), true),
        Value::Object(_) => (vec![body], false),
        _ => return Checked::Malformed("the body is not a JSON-RPC message or batch".into()),
    };
    let mut refusals = Vec::new();
    let mut ids = Vec::new();
    let mut lists = Vec::new();
    for m in &messages {
        let Some(method) = m.get("method").and_then(Value::as_str) else {
            // A response (to a server's request, e.g. sampling): nothing to govern.
            continue;
        };
        let id = m.get("id").cloned().unwrap_or(Value::Null);
        match method {
            "tools/list" => lists.push(Kind::Tool),
            "resources/list" | "resources/templates/list" => lists.push(Kind::Resource),
            "prompts/list" => lists.push(Kind::Prompt),
            _ => {}
        }
        let Some((kind, key)) = governed(method) else {
            if !id.is_null() {
                ids.push(id);
            }
            continue;
        };
        let Some(name) = m
            .get("params")
            .and_then(|p| p.get(key))
            .and_then(Value::as_str)
        else {
            return Checked::Malformed(format!("{method} without a string params.{key}"));
        };
        if kind.rule(rules).allows(name) {
            if !id.is_null() {
                ids.push(id);
            }
        } else {
            refusals.push(Refusal {
                id,
                method: method.to_string(),
                kind,
                name: name.to_string(),
            });
        }
    }
    if refusals.is_empty() {
        lists.dedup();
        return Checked::Pass(lists);
    }
    Checked::Refused(Arc::new(Refused {
        refusals,
        unsent: ids,
        batch,
    }))
}

/// The JSON-RPC answer to a refused request: an error per refused call (with the reason, the
/// name and the request id under `data`), and one per other request of a batch, not sent.
pub fn error_response(r: &Refused, data: &Value) -> Value {
    let error = |id: &Value, message: String, extra: Value| {
        let mut d = data.clone();
        if let (Some(d), Value::Object(extra)) = (d.as_object_mut(), extra) {
            d.extend(extra);
        }
        serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": REFUSED_CODE, "message": message, "data": d},
        })
    };
    let mut out: Vec<Value> = r
        .refusals
        .iter()
        .filter(|x| !x.id.is_null() || !r.batch)
        .map(|x| {
            error(
                &x.id,
                format!(
                    "refused by the cell's boundary: {} {:?} is not allowed",
                    x.kind.noun(),
                    x.name
                ),
                serde_json::json!({"reason": x.kind.reason().as_str(), x.kind.noun(): x.name}),
            )
        })
        .collect();
    out.extend(r.unsent.iter().map(|id| {
        error(
            id,
            "not sent: another call in this batch was refused by the cell's boundary; send it on its own".into(),
            serde_json::json!({"reason": "mcp_batch_refused"}),
        )
    }));
    if r.batch {
        Value::Array(out)
    } else {
        out.into_iter().next().unwrap_or(Value::Null)
    }
}

/// Filters the answers to list requests so they name only what the rules allow.
#[derive(Debug, Clone)]
pub struct Filter {
    rules: Arc<McpRules>,
    lists: Vec<Kind>,
}

impl Filter {
    /// A filter of the lists `lists` by `rules`.
    pub fn new(rules: Arc<McpRules>, lists: Vec<Kind>) -> Self {
        Self { rules, lists }
    }

    /// Removes what may not be seen from one JSON-RPC message (or batch); returns how many
    /// entries it removed.
    pub fn message(&self, msg: &mut Value) -> usize {
        if let Value::Array(a) = msg {
            return a.iter_mut().map(|m| self.message(m)).sum();
        }
        let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) else {
            return 0;
        };
        let mut removed = 0;
        for kind in &self.lists {
            let rule = kind.rule(&self.rules);
            let fields: &[(&str, &str)] = match kind {
                Kind::Tool => &[("tools", "name")],
                Kind::Resource => &[("resources", "uri"), ("resourceTemplates", "uriTemplate")],
                Kind::Prompt => &[("prompts", "name")],
            };
            for (field, key) in fields {
                if let Some(Value::Array(items)) = result.get_mut(*field) {
                    let before = items.len();
                    // An entry without its name is not shown: it could be anything.
                    items.retain(|i| {
                        i.get(*key)
                            .and_then(Value::as_str)
                            .is_some_and(|n| rule.allows(n))
                    });
                    removed += before - items.len();
                }
            }
        }
        removed
    }

    /// Filters a whole JSON body; `None` when it is not JSON.
    pub fn json(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut v: Value = serde_json::from_slice(body).ok()?;
        if self.message(&mut v) == 0 {
            return Some(body.to_vec());
        }
        serde_json::to_vec(&v).ok()
    }

    /// Filters one SSE event (its text up to, not including, the blank line that ends it):
    /// the JSON-RPC message in its `data` is filtered and written back on one `data:` line;
    /// other fields are kept. An event whose data is not JSON passes as it was.
    pub fn event(&self, event: &str) -> String {
        let mut data = Vec::new();
        let mut others = Vec::new();
        for line in event.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            } else {
                others.push(line);
            }
        }
        if data.is_empty() {
            return event.to_string();
        }
        let joined = data.join("\n");
        let Ok(mut v) = serde_json::from_str::<Value>(&joined) else {
            return event.to_string();
        };
        if self.message(&mut v) == 0 {
            return event.to_string();
        }
        let mut out = String::new();
        for o in others {
            out.push_str(o);
            out.push('\n');
        }
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> McpRules {
        McpRules {
            tools: McpRule {
                allow: Some(vec!["search_*".into(), "get_issue".into()]),
                deny: vec!["search_secrets".into()],
            },
            resources: McpRule {
                allow: Some(vec!["repo://*".into()]),
                deny: vec![],
            },
            prompts: McpRule {
                allow: Some(vec![]),
                deny: vec![],
            },
        }
    }

    fn call(id: i64, tool: &str) -> Value {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":{}}})
    }

    #[test]
    fn calls_are_checked_by_name_and_uri() {
        let r = rules();
        assert_eq!(
            check(&r, Some(&call(1, "search_code"))),
            Checked::Pass(vec![])
        );
        assert_eq!(
            check(&r, Some(&call(1, "get_issue"))),
            Checked::Pass(vec![])
        );
        for denied in ["search_secrets", "delete_repo", "get_issues", ""] {
            let Checked::Refused(x) = check(&r, Some(&call(7, denied))) else {
                panic!("{denied} allowed");
            };
            assert_eq!(x.refusals[0].id, json!(7));
            assert_eq!(x.reason(), Reason::McpToolDenied);
        }
        let read = |uri: &str| json!({"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":uri}});
        assert_eq!(check(&r, Some(&read("repo://x/y"))), Checked::Pass(vec![]));
        assert!(matches!(
            check(&r, Some(&read("file:///etc/passwd"))),
            Checked::Refused(_)
        ));
        let prompt = json!({"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"any"}});
        assert!(matches!(check(&r, Some(&prompt)), Checked::Refused(_)));
        // Not governed: passes; lists are noted for filtering.
        let list = json!({"jsonrpc":"2.0","id":3,"method":"tools/list"});
        assert_eq!(check(&r, Some(&list)), Checked::Pass(vec![Kind::Tool]));
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{}});
        assert_eq!(check(&r, Some(&init)), Checked::Pass(vec![]));
    }

    #[test]
    fn what_cannot_be_checked_is_refused() {
        let r = rules();
        assert!(matches!(check(&r, None), Checked::Malformed(_)));
        assert!(matches!(
            check(&r, Some(&json!("x"))),
            Checked::Malformed(_)
        ));
        assert!(matches!(check(&r, Some(&json!([]))), Checked::Malformed(_)));
        let nameless = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}});
        assert!(matches!(check(&r, Some(&nameless)), Checked::Malformed(_)));
    }

    #[test]
    fn a_batch_is_decided_call_by_call_and_every_request_answered() {
        let r = rules();
        let batch = json!([call(1, "search_code"), call(2, "delete_repo"), {"jsonrpc":"2.0","method":"notifications/progress"}, call(3, "drop_db")]);
        let Checked::Refused(x) = check(&r, Some(&batch)) else {
            panic!()
        };
        let names: Vec<_> = x.refusals.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["delete_repo", "drop_db"]);
        assert_eq!(x.unsent, vec![json!(1)]);
        let answer = error_response(&x, &json!({"request_id": "r1"}));
        let ids: Vec<_> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].clone())
            .collect();
        assert_eq!(ids, vec![json!(2), json!(3), json!(1)]);
        assert_eq!(answer[0]["error"]["data"]["reason"], "mcp_tool_denied");
        assert_eq!(answer[0]["error"]["data"]["tool"], "delete_repo");
        assert_eq!(answer[0]["error"]["data"]["request_id"], "r1");
        assert_eq!(answer[2]["error"]["data"]["reason"], "mcp_batch_refused");
        // A single call: one error object, not an array.
        let Checked::Refused(x) = check(&r, Some(&call(9, "nope"))) else {
            panic!()
        };
        let one = error_response(&x, &json!({}));
        assert_eq!(one["id"], 9);
        assert_eq!(one["error"]["code"], REFUSED_CODE);
    }

    #[test]
    fn lists_show_only_what_is_allowed() {
        let f = Filter::new(Arc::new(rules()), vec![Kind::Tool]);
        let body = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[
            {"name":"search_code"},{"name":"delete_repo"},{"name":"search_secrets"},{"description":"no name"}
        ]}});
        let out: Value =
            serde_json::from_slice(&f.json(body.to_string().as_bytes()).unwrap()).unwrap();
        let names: Vec<_> = out["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("search_code")]);
        // SSE: the event's data is rewritten, its other fields kept.
        let event = format!("event: message\nid: 4\ndata: {body}");
        let filtered = f.event(&event);
        assert!(
            filtered.starts_with("event: message\nid: 4\ndata: "),
            "{filtered}"
        );
        assert!(!filtered.contains("delete_repo") && filtered.contains("search_code"));
        // Not JSON, or nothing to remove: unchanged.
        assert_eq!(f.event("data: hello"), "data: hello");
        let clean =
            json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_issue"}]}}).to_string();
        assert_eq!(f.json(clean.as_bytes()).unwrap(), clean.as_bytes());
        assert!(f.json(b"not json").is_none());
        let res = Filter::new(Arc::new(rules()), vec![Kind::Resource]);
        let mut m = json!({"result":{"resources":[{"uri":"repo://a"},{"uri":"file:///x"}],"resourceTemplates":[{"uriTemplate":"repo://{x}"},{"uriTemplate":"db://{t}"}]}});
        assert_eq!(res.message(&mut m), 2);
        assert_eq!(m["result"]["resources"].as_array().unwrap().len(), 1);
        assert_eq!(
            m["result"]["resourceTemplates"][0]["uriTemplate"],
            "repo://{x}"
        );
    }
}
