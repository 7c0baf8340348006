//! The content stages' cost: reading a request body for the policy (JSON parse per KiB), the MCP
//! check of a `tools/call`, filtering a `tools/list` answer of 50 tools (JSON and one SSE event),
//! masking an injected secret in a streamed response (per MiB, in 16 KiB chunks), and the
//! secret and personal-data detectors over 1 KiB.
//!
//! `cargo bench -p cellgate-node --bench content`.

use std::sync::Arc;

use cellgate_api::model::{McpRule, McpRules};
use cellgate_node::mcp::{check, Filter, Kind};
use cellgate_node::scrub::Scrubber;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn rules() -> McpRules {
    McpRules {
        tools: McpRule {
            allow: Some(vec!["search_*".into(), "get_*".into(), "list_*".into()]),
            deny: vec!["*_admin".into()],
        },
        ..McpRules::default()
    }
}

fn inspect(c: &mut Criterion) {
    // A chat request of about 1 KiB, as a policy reads it.
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "max_completion_tokens": 512, "stream": false,
        "messages": [{"role": "system", "content": "x".repeat(300)},
                     {"role": "user", "content": "y".repeat(600)}],
    })
    .to_string();
    // What a request pays when no capability reads bodies: finding that out, for a cell of ten
    // capabilities (none inspects; the request's host is named by the last).
    let caps: String = (0..10)
        .map(|i| format!("    - name: c{i}\n      destinations: [{{host: h{i}.test}}]\n"))
        .collect();
    let yaml = format!("apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: b, namespace: n}}\nspec:\n  capabilities:\n{caps}");
    let cell = cellgate_api::manifest::parse_agent_cells(&yaml).expect("cell")[0]
        .to_model()
        .expect("model");
    let dst: std::net::IpAddr = "10.0.0.9".parse().expect("ip");
    c.bench_function("inspect/bound_none_of_10", |b| {
        b.iter(|| cellgate_node::inspect::bound(&cell, Some("h9.test"), 443, dst))
    });
    let mut g = c.benchmark_group("inspect");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("json_parse_1KiB", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(body.as_bytes()).expect("json"))
    });
    g.finish();
}

fn mcp(c: &mut Criterion) {
    let r = rules();
    let call = serde_json::json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_code","arguments":{"q":"x"}}});
    c.bench_function("mcp/check_tools_call", |b| {
        b.iter(|| check(&r, Some(&call)))
    });
    let tools: Vec<serde_json::Value> = (0..50)
        .map(|i| {
            let name = match i % 4 {
                0 => format!("search_{i}"),
                1 => format!("delete_{i}"),
                2 => format!("get_{i}"),
                _ => format!("list_{i}_admin"),
            };
            serde_json::json!({"name": name, "description": "d".repeat(120), "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}})
        })
        .collect();
    let list = serde_json::json!({"jsonrpc":"2.0","id":1,"result":{"tools": tools}}).to_string();
    let f = Filter::new(Arc::new(rules()), vec![Kind::Tool]);
    let mut g = c.benchmark_group("mcp");
    g.throughput(Throughput::Bytes(list.len() as u64));
    g.bench_function("filter_tools_list_50_json", |b| {
        b.iter(|| f.json(list.as_bytes()).expect("json"))
    });
    let event = format!("event: message\ndata: {list}");
    g.bench_function("filter_tools_list_50_sse_event", |b| {
        b.iter(|| f.event(&event))
    });
    g.finish();
}

fn scrub(c: &mut Criterion) {
    let secret = b"sk-live-0123456789abcdef".to_vec();
    let header = b"Bearer sk-live-0123456789abcdef".to_vec();
    // 1 MiB of SSE-like text with no secret in it, in 16 KiB chunks.
    let text: Vec<u8> = b"data: {\"delta\":\"some streamed tokens here\"}\n\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    let mut g = c.benchmark_group("scrub");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("mask_1MiB_in_16KiB_chunks", |b| {
        b.iter(|| {
            let mut s = Scrubber::new(vec![secret.clone(), header.clone()]);
            let mut n = 0;
            for chunk in text.chunks(16 * 1024) {
                n += s.feed(chunk).len();
            }
            n + s.finish().len()
        })
    });
    g.finish();
}

fn detect(c: &mut Criterion) {
    use cellgate_api::manifest::DetectAction;
    use cellgate_api::model::Detect;
    use cellgate_node::detect::Detectors;
    let d = Detect {
        secrets: Some(DetectAction::Deny),
        pii: Some(DetectAction::Redact),
        entropy: true,
        patterns: Vec::new(),
    };
    let ds = Detectors::of(&d, |_| true);
    // 1 KiB of chat request with nothing to find, and the same with an e-mail and a key in it.
    let clean = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "please summarise the attached meeting notes about the quarterly roadmap ".repeat(13)}],
    })
    .to_string();
    let dirty = clean.replace("attached", "ana.lopez@example.org AKIAIOSFODNN7EXAMPLE");
    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Bytes(clean.len() as u64));
    g.bench_function("scan_1KiB_clean", |b| b.iter(|| ds.scan(&clean)));
    g.bench_function("redact_1KiB_with_findings", |b| {
        b.iter(|| ds.redact(&dirty))
    });
    g.finish();
}

criterion_group!(benches, inspect, mcp, scrub, detect);
criterion_main!(benches);
