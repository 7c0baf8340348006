//! Leaf minting (uncached: keygen + sign), a cache hit, and ClientHello parsing.
//!
//! `cargo bench -p cellgate-tls --bench mint`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellgate_tls::{parse_client_hello, Ca, LeafMinter, MinterConfig};
use criterion::{criterion_group, criterion_main, Criterion};

fn rustls_hello() -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(cellgate_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Criterion reports means; the mint target is a tail latency, so time calls one by one too.
fn print_percentiles(label: &str, mut f: impl FnMut(u64)) {
    const CALLS: u64 = 20_000;
    let mut samples: Vec<Duration> = (0..CALLS)
        .map(|i| {
            let start = Instant::now();
            f(i);
            start.elapsed()
        })
        .collect();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "{label}: p50 {:?}  p99 {:?}  p99.9 {:?}  max {:?}  ({CALLS} calls)",
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
}

fn benches(c: &mut Criterion) {
    let ca = Arc::new(Ca::generate("Cellgate bench CA").unwrap());
    let minter = LeafMinter::new(ca, MinterConfig::default());

    print_percentiles("mint_leaf", |_| {
        black_box(minter.mint_leaf("api.example.com").unwrap());
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    print_percentiles("server_config miss", |i| {
        let name = format!("p{i}.example.com");
        black_box(rt.block_on(minter.server_config(&name)).unwrap());
    });

    c.bench_function("mint_leaf (keygen + sign, uncached)", |b| {
        b.iter(|| minter.mint_leaf(black_box("api.example.com")).unwrap())
    });

    // A miss end to end, as the node sees it: validate, mint, build the rustls ServerConfig.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut n = 0u64;
    c.bench_function("server_config miss (mint + rustls config)", |b| {
        b.iter(|| {
            n += 1;
            let name = format!("h{n}.example.com");
            rt.block_on(minter.server_config(black_box(&name))).unwrap()
        })
    });

    rt.block_on(minter.server_config("hit.example.com"))
        .unwrap();
    c.bench_function("server_config hit", |b| {
        b.iter(|| {
            rt.block_on(minter.server_config(black_box("hit.example.com")))
                .unwrap()
        })
    });

    let hello = rustls_hello();
    c.bench_function(
        &format!("parse_client_hello ({} bytes)", hello.len()),
        |b| b.iter(|| parse_client_hello(black_box(&hello)).unwrap()),
    );
}

criterion_group!(mint, benches);
criterion_main!(mint);
