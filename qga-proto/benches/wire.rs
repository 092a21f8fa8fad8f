//! Throughput of the reply decoder and round-trip cost of a call through the
//! real client and the fake agent.

// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qga_proto::wire::{encode_request, Decoder};
use qga_proto::{cmd, GuestAgent};

/// A `guest-file-read` reply carrying 1 MiB of data (about 1.4 MB of base64).
fn file_read_reply() -> Vec<u8> {
    let data = vec![0x5au8; 1 << 20];
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    format!(
        "{{\"return\": {{\"count\": {}, \"buf-b64\": \"{b64}\", \"eof\": false}}}}\n",
        data.len()
    )
    .into_bytes()
}

fn decoder(c: &mut Criterion) {
    let reply = file_read_reply();
    let mut group = c.benchmark_group("decoder");
    group.throughput(Throughput::Bytes(reply.len() as u64));
    group.bench_function("file-read 1 MiB in 64 KiB chunks", |b| {
        b.iter(|| {
            let mut d = Decoder::new();
            for chunk in reply.chunks(64 * 1024) {
                d.push(chunk);
            }
            black_box(d.next_frame())
        })
    });
    let small = b"{\"return\": {\"host-name\": \"vm\"}}\n";
    group.throughput(Throughput::Bytes(small.len() as u64));
    group.bench_function("host-name reply", |b| {
        b.iter(|| {
            let mut d = Decoder::new();
            d.push(black_box(small));
            black_box(d.next_frame())
        })
    });
    group.finish();
}

fn encoder(c: &mut Criterion) {
    let args = cmd::GuestExecArgs::new("/bin/echo")
        .args(["hello", "world"])
        .capture();
    c.bench_function("encode guest-exec request", |b| {
        b.iter(|| black_box(encode_request("guest-exec", black_box(&args), None)))
    });
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(async { qga_proto::fake::FakeAgent::linux().connect_async() });
    rt.block_on(client.ping()).expect("first call syncs");
    c.bench_function("guest-get-host-name via AsyncClient + fake agent", |b| {
        b.iter(|| rt.block_on(client.host_name()).expect("host name"))
    });
}

criterion_group!(benches, decoder, encoder, round_trip);
criterion_main!(benches);
