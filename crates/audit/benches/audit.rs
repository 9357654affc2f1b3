//! Merkle costs of the audit log: appending to the in-memory frontier (paid per
//! entry by the writer) and producing plus checking an inclusion proof in a
//! 100k-entry log (paid per `GetInclusionProof` call, from stored leaf hashes).
#![allow(missing_docs)]

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lienthong_audit::merkle::{self, Frontier, Hash};
use std::hint::black_box;

const LOG_SIZE: u64 = 100_000;

fn leaves(n: u64) -> Vec<Hash> {
    (0..n)
        .map(|i| merkle::leaf_hash(format!("{{\"request_id\":\"req-{i}\"}}").as_bytes()))
        .collect()
}

fn frontier_push(c: &mut Criterion) {
    let tree = leaves(LOG_SIZE);
    let next = merkle::leaf_hash(b"next entry");
    let mut group = c.benchmark_group("frontier");
    group.bench_function("push onto 100k", |b| {
        b.iter_batched_ref(
            || Frontier::from_leaves(&tree),
            |frontier| frontier.push(black_box(next)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("push + root onto 100k", |b| {
        b.iter_batched_ref(
            || Frontier::from_leaves(&tree),
            |frontier| {
                frontier.push(black_box(next));
                black_box(frontier.root())
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn inclusion(c: &mut Criterion) {
    let tree = leaves(LOG_SIZE);
    let root = merkle::root(&tree);
    let index = LOG_SIZE * 3 / 7;
    let proof = merkle::inclusion_proof(index, &tree);
    let mut group = c.benchmark_group("inclusion 100k");
    group.sample_size(20);
    group.bench_function("generate", |b| {
        b.iter(|| merkle::inclusion_proof(black_box(index), &tree))
    });
    group.bench_function("verify", |b| {
        b.iter(|| merkle::verify_inclusion(black_box(index), LOG_SIZE, &tree[index as usize], &proof, &root))
    });
    group.bench_function("generate + verify", |b| {
        b.iter(|| {
            let proof = merkle::inclusion_proof(black_box(index), &tree);
            assert!(merkle::verify_inclusion(
                index,
                LOG_SIZE,
                &tree[index as usize],
                &proof,
                &root
            ));
        })
    });
    group.finish();
}

criterion_group!(benches, frontier_push, inclusion);
criterion_main!(benches);
