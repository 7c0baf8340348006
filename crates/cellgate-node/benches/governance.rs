//! The governance stages' cost per request: the budget ledger's count (a cell budget and a
//! capability budget, as a request under both is counted), the lockdown check when none is on,
//! and reading LLM usage from a response.
//!
//! `cargo bench -p cellgate-node --bench governance`.

use cellgate_api::manifest::BudgetSpec;
use cellgate_node::budget::{Ledger, Scope, Take, CELL_SCOPE};
use cellgate_node::usage::{PriceTable, Reading, UsageReader};
use criterion::{criterion_group, criterion_main, Criterion};

const CHAT: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1741569952,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I assist you today? I can help with code, writing, analysis and much more.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}"#;

fn budget(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger = Ledger::open(dir.path()).expect("ledger");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cell = BudgetSpec {
        requests: Some(u64::MAX / 2),
        lifetime: Some("365d".into()),
        ..BudgetSpec::default()
    };
    let cap = BudgetSpec {
        requests_per_window: Some(u64::MAX / 2),
        window: Some("1h".into()),
        ..BudgetSpec::default()
    };
    let scopes = [
        Scope {
            name: CELL_SCOPE,
            spec: &cell,
        },
        Scope {
            name: "api",
            spec: &cap,
        },
    ];
    let now = cellgate_node::decide::now_ms();
    c.bench_function("budget/take_cell_and_capability", |b| {
        b.iter(|| loop {
            // A write reserves 1/64 of the count so far ahead: counted in, amortized.
            match ledger.take("local:bench:cell", &scopes, now) {
                Take::Granted(v) => break v,
                Take::Persist => rt.block_on(ledger.persist()).expect("persist"),
                Take::Exhausted(e) => panic!("{e:?}"),
            }
        })
    });
    let lock = cellgate_node::lockdown::Lockdown::open(dir.path()).expect("lockdown");
    c.bench_function("lockdown/applies_when_off", |b| {
        b.iter(|| lock.applies("agents"))
    });
}

fn usage(c: &mut Criterion) {
    let prices = PriceTable::default_table();
    c.bench_function("usage/openai_json_body", |b| {
        b.iter(|| {
            let mut r = UsageReader::new(Some("application/json"), None);
            r.feed(CHAT);
            match r.finish(true) {
                Reading::Reported(u) => prices.cost_micros(&u),
                other => panic!("{other:?}"),
            }
        })
    });
    let mut sse = Vec::new();
    for i in 0..50 {
        sse.extend_from_slice(format!("data: {{\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i}\"}}}}],\"usage\":null}}\n\n").as_bytes());
    }
    sse.extend_from_slice(b"data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":50}}\n\ndata: [DONE]\n\n");
    c.bench_function("usage/openai_stream_51_events", |b| {
        b.iter(|| {
            let mut r = UsageReader::new(Some("text/event-stream"), None);
            for chunk in sse.chunks(256) {
                r.feed(chunk);
            }
            r.finish(true)
        })
    });
}

criterion_group!(benches, budget, usage);
criterion_main!(benches);
