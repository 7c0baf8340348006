//! The OpenAPI 3.0 document served at `/api/v1/openapi.json`, written by hand. A test checks
//! that it lists exactly the routes the router serves ([`super::ROUTES`]).

use serde_json::{json, Value};

fn error_responses() -> Value {
    json!({
        "400": {"$ref": "#/components/responses/Error"},
        "401": {"$ref": "#/components/responses/Error"},
        "403": {"$ref": "#/components/responses/Error"},
        "502": {"$ref": "#/components/responses/Error"},
        "503": {"$ref": "#/components/responses/Error"}
    })
}

fn ok(description: &str, schema: Value) -> Value {
    let mut r = error_responses();
    r["200"] = json!({"description": description,
                      "content": {"application/json": {"schema": schema}}});
    r
}

fn op(summary: &str, rbac: &str, params: Value, responses: Value) -> Value {
    json!({
        "summary": summary,
        "description": format!("Authorization (SubjectAccessReview, group cellgate.dev): {rbac}."),
        "parameters": params,
        "responses": responses,
    })
}

fn with_body(mut op: Value, schema: Value) -> Value {
    op["requestBody"] = json!({"required": true,
                               "content": {"application/json": {"schema": schema}}});
    op
}

fn query(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false,
           "description": description, "schema": {"type": "string"}})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The document.
pub fn document() -> Value {
    let ns_query = query(
        "namespace",
        "Only this namespace; all namespaces when absent.",
    );
    let object = json!({"type": "object"});
    let list = json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object"}}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Cellgate control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Served by cellgate-operator over HTTPS. Every call needs a Kubernetes bearer token (TokenReview) and is authorized with a SubjectAccessReview against the cellgate.dev group; every call is recorded in the operator's audit log. See docs/control-api.md."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {
                    "error": {"type": "string", "description": "short label: unauthenticated, forbidden, bad_request, not_found, conflict, kube_error, node_error, authn_unavailable, authz_unavailable, audit_unavailable"},
                    "message": {"type": "string"}}}
            },
            "responses": {
                "Error": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/openapi.json": {"get": {
                "summary": "This document.",
                "description": "Needs an authenticated caller; no further authorization.",
                "responses": {"200": {"description": "The OpenAPI document", "content": {"application/json": {"schema": object}}},
                              "401": {"$ref": "#/components/responses/Error"}}
            }},
            "/api/v1/cells": {"get": op("List AgentCells with their status.",
                "list agentcells (in the namespace, or cluster-wide)",
                json!([ns_query]), ok("The cells", list.clone()))},
            "/api/v1/namespaces/{namespace}/cells/{name}": {"get": op(
                "One AgentCell: spec summary, status, usage and enforcement.",
                "get agentcells in the namespace",
                json!([path_param("namespace"), path_param("name")]), ok("The cell", object.clone()))},
            "/api/v1/revocations": {
                "get": op("The revoked token ids and their expiries (ConfigMap cellgate-revocations).",
                    "list revocations (cluster-wide)", json!([]), ok("The revocations", list.clone())),
                "post": with_body(op("Revokes a token id until its expiry; every node refuses it within a second.",
                    "create revocations (cluster-wide)", json!([]), ok("What was written", object.clone())),
                    json!({"type": "object", "required": ["tokenId", "expiry"], "properties": {
                        "tokenId": {"type": "string"}, "expiry": {"type": "string", "format": "date-time"}}}))
            },
            "/api/v1/approvals": {"get": op("List AgentApprovals (requests held for a human).",
                "list agentapprovals (in the namespace, or cluster-wide)",
                json!([ns_query]), ok("The approvals", list))},
            "/api/v1/namespaces/{namespace}/approvals/{name}/approve": {"post": with_body(op(
                "Approves a held request; the approver recorded is the caller.",
                "update agentapprovals in the namespace",
                json!([path_param("namespace"), path_param("name")]), ok("The decision", object.clone())),
                json!({"type": "object", "properties": {
                    "for": {"type": "string", "description": "validity of a retry-mode approval, e.g. 10m (at most 24h)"},
                    "uses": {"type": "integer", "minimum": 1, "maximum": 1000}}}))},
            "/api/v1/namespaces/{namespace}/approvals/{name}/deny": {"post": with_body(op(
                "Denies a held request; the approver recorded is the caller.",
                "update agentapprovals in the namespace",
                json!([path_param("namespace"), path_param("name")]), ok("The decision", object.clone())),
                json!({"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string"}}}))},
            "/api/v1/lockdown": {
                "get": op("The lockdowns in force (ConfigMap cellgate-lockdown).",
                    "get lockdowns (cluster-wide)", json!([]), ok("The lockdowns", object.clone())),
                "post": with_body(op("Sets or lifts a lockdown of the cluster or of one namespace.",
                    "update lockdowns in the namespace given, or cluster-wide without one",
                    json!([]), ok("What is in force now", object)),
                    json!({"type": "object", "required": ["state", "reason"], "properties": {
                        "state": {"type": "string", "enum": ["on", "off"]},
                        "namespace": {"type": "string"},
                        "reason": {"type": "string"}}}))
            },
            "/api/v1/audit": {"get": {
                "summary": "Audit records of every node, merged by time, as NDJSON.",
                "description": "Authorization (SubjectAccessReview, group cellgate.dev): list audit in the namespace (from namespace= or cell=), or cluster-wide. Without since and cursor: the most recent `limit` records; with either: pages forward. The X-Cellgate-Cursor response header continues after this page.",
                "parameters": [
                    query("namespace", "Only this namespace."),
                    query("cell", "Only this cell, NAMESPACE/NAME."),
                    query("since", "RFC 3339 time or a duration back from now (1h); records at or after."),
                    query("until", "RFC 3339 time or a duration back from now; records before."),
                    query("decision", "allow, deny, error, shadow_deny, approval, control (comma-separated)."),
                    query("reason", "The record's reason label, e.g. no_capability."),
                    query("host", "The record's host (case-insensitive)."),
                    query("limit", "Records per page, 1 to 1000 (default 100)."),
                    query("cursor", "X-Cellgate-Cursor of the previous page.")
                ],
                "responses": {
                    "200": {"description": "One audit record per line, oldest first",
                            "headers": {
                                "X-Cellgate-Cursor": {"schema": {"type": "string"}, "description": "cursor= for the next page"},
                                "X-Cellgate-Nodes": {"schema": {"type": "integer"}, "description": "node pods asked"}},
                            "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                    "400": {"$ref": "#/components/responses/Error"},
                    "401": {"$ref": "#/components/responses/Error"},
                    "403": {"$ref": "#/components/responses/Error"},
                    "502": {"$ref": "#/components/responses/Error"},
                    "503": {"$ref": "#/components/responses/Error"}
                }
            }}
        }
    })
}

/// The `(method, path)` pairs the document lists, methods upper case.
pub fn documented_routes() -> Vec<(String, String)> {
    let doc = document();
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, ops) in paths {
            for method in ops.as_object().into_iter().flat_map(|o| o.keys()) {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    out.sort();
    out
}
