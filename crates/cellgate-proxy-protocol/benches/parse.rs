//! Cost of decoding a typical Cellgate header (IPv4, ~700-byte token), the per-connection price
//! the node pays before it knows who is calling.

use std::hint::black_box;

use cellgate_proxy_protocol::{encode, parse, read_header};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn typical_header() -> Vec<u8> {
    let token: String = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0."
        .chars()
        .chain(std::iter::repeat_n('x', 700 - 36 - 87))
        .chain(
            ".c2lnbmF0dXJlLWJ5dGVzLWJhc2U2NHVybC1lbmNvZGVkLWVkMjU1MTktc2lnbmF0dXJlLXNpeHR5LWZvdXI"
                .chars(),
        )
        .collect();
    encode(
        "10.244.1.17:48122"
            .parse()
            .unwrap_or_else(|_| unreachable!()),
        "93.184.216.34:443"
            .parse()
            .unwrap_or_else(|_| unreachable!()),
        &token,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn bench(c: &mut Criterion) {
    let bytes = typical_header();
    let mut group = c.benchmark_group("ppv2");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("parse", |b| b.iter(|| parse(black_box(&bytes))));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("read_header", |b| {
        b.iter(|| {
            let mut r: &[u8] = black_box(&bytes);
            runtime.block_on(read_header(&mut r))
        })
    });
    group.bench_function("encode", |b| {
        b.iter(|| {
            encode(
                black_box(
                    "10.244.1.17:48122"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                ),
                black_box(
                    "93.184.216.34:443"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                ),
                black_box("eyJhbGciOiJFZERTQSJ9.e30.c2ln"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
