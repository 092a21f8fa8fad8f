//! Property tests of the fake's model: random command sequences keep its invariants, a
//! failing transaction changes nothing, and a backup's point-in-time view survives any
//! guest writes.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::commands::dispatch;
use super::state::{FakeState, ImageFormat};
use super::{QemuRelease, Response};
use disk_transport::memory::MemoryDisk;

const SIZE: u64 = 4 << 20;

fn state() -> FakeState {
    let mut s = FakeState::new(QemuRelease::V7_2);
    s.add_image("/img/a.qcow2", ImageFormat::Qcow2, MemoryDisk::new(SIZE));
    s.add_image("/img/f.qcow2", ImageFormat::Qcow2, MemoryDisk::new(SIZE));
    s
}

fn run(s: &mut FakeState, name: &str, args: Value) -> Response {
    let Value::Object(args) = args else {
        unreachable!("arguments are objects")
    };
    dispatch(s, name, args)
}

fn ok(s: &mut FakeState, name: &str, args: Value) {
    match run(s, name, args.clone()) {
        Response::Return(_) => {}
        other => panic!("{name} {args}: {other:?}"),
    }
}

fn node() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["q0", "n0", "f0", "nope"])
}

fn bitmap() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c"])
}

/// One bitmap action (also usable inside a transaction).
fn bitmap_action() -> impl Strategy<Value = (String, Value)> {
    prop_oneof![
        (node(), bitmap(), prop::sample::select(vec![256u64, 512, 65536, 1 << 20]), any::<bool>(), any::<bool>())
            .prop_map(|(n, b, g, p, d)| ("block-dirty-bitmap-add".to_owned(),
                json!({"node": n, "name": b, "granularity": g, "persistent": p, "disabled": d}))),
        (prop::sample::select(vec!["remove", "clear", "enable", "disable"]), node(), bitmap())
            .prop_map(|(op, n, b)| (format!("block-dirty-bitmap-{op}"), json!({"node": n, "name": b}))),
        (node(), bitmap(), prop::collection::vec((node(), bitmap()), 1..3))
            .prop_map(|(n, t, srcs)| ("block-dirty-bitmap-merge".to_owned(), json!({"node": n, "target": t,
                "bitmaps": srcs.into_iter().map(|(n, b)| json!({"node": n, "name": b})).collect::<Vec<_>>()}))),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Command(String, Value),
    Transaction(Vec<(String, Value)>),
    Write(&'static str, u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => bitmap_action().prop_map(|(n, a)| Op::Command(n, a)),
        2 => prop::collection::vec(bitmap_action(), 1..4).prop_map(Op::Transaction),
        2 => (node(), 0..SIZE, 1..300_000u64).prop_map(|(n, o, l)| Op::Write(n, o, l)),
        1 => (node(), prop::sample::select(vec!["none", "full", "incremental"]), bitmap())
            .prop_map(|(n, sync, b)| Op::Command("blockdev-backup".into(),
                json!({"device": n, "target": "f0", "sync": sync, "bitmap": b, "job-id": "j"}))),
        1 => Just(Op::Command("block-job-cancel".into(), json!({"device": "j"}))),
        1 => Just(Op::Command("job-dismiss".into(), json!({"id": "j"}))),
        1 => Just(Op::Command("nbd-server-start".into(), json!({"addr": {"type": "unix", "data": {"path": "/x"}}}))),
        1 => Just(Op::Command("nbd-server-stop".into(), json!({}))),
        1 => (node(), prop::collection::vec(bitmap(), 0..2), any::<bool>()).prop_map(|(n, b, w)|
            Op::Command("block-export-add".into(), json!({"type": "nbd", "id": "e", "node-name": n, "bitmaps": b, "writable": w}))),
        1 => Just(Op::Command("block-export-del".into(), json!({"id": "e"}))),
        1 => node().prop_map(|n| Op::Command("blockdev-del".into(), json!({"node-name": n}))),
    ]
}

fn setup() -> FakeState {
    let mut s = state();
    ok(
        &mut s,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q0",
        "file": {"driver": "file", "filename": "/img/a.qcow2"}}),
    );
    ok(
        &mut s,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": SIZE}),
    );
    ok(
        &mut s,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "f0",
        "file": {"driver": "file", "filename": "/img/f.qcow2"}, "backing": "q0"}),
    );
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any sequence of bitmap, job, export and node commands keeps the model consistent, and
    /// a transaction that fails leaves the block graph exactly as it was.
    #[test]
    fn random_sequences_keep_invariants(ops in prop::collection::vec(op(), 1..40)) {
        let mut s = setup();
        for op in ops {
            match op {
                Op::Command(name, args) => {
                    run(&mut s, &name, args);
                }
                Op::Transaction(actions) => {
                    let before = (s.named_block_nodes(), s.jobs_json(), s.exports_json());
                    let actions: Vec<Value> = actions.into_iter()
                        .map(|(ty, data)| json!({"type": ty, "data": data})).collect();
                    if let Response::Error { .. } = run(&mut s, "transaction", json!({"actions": actions})) {
                        prop_assert_eq!(before, (s.named_block_nodes(), s.jobs_json(), s.exports_json()));
                    }
                }
                Op::Write(node, offset, len) => {
                    let len = len.min(SIZE - offset);
                    let _ = s.guest_write(node, &vec![0x5a; len as usize], offset);
                }
            }
            if let Err(e) = s.check_invariants() {
                return Err(TestCaseError::fail(format!("{e}\n{s:#?}")));
            }
        }
    }

    /// sync=none: whatever the guest writes after the job starts, the fleecing overlay reads
    /// as the source did at that moment.
    #[test]
    fn backup_sync_none_is_point_in_time(
        before in prop::collection::vec((0..SIZE - 70_000, 1..70_000u64, any::<u8>()), 0..6),
        after in prop::collection::vec((0..SIZE - 70_000, 1..70_000u64, any::<u8>()), 1..10),
    ) {
        let mut s = setup();
        for (off, len, byte) in before {
            s.guest_write("q0", &vec![byte; len as usize], off).unwrap();
        }
        let mut snapshot = vec![0u8; SIZE as usize];
        s.read("q0", &mut snapshot, 0).unwrap();
        ok(&mut s, "transaction", json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "q0", "name": "cp"}},
            {"type": "blockdev-backup", "data": {"device": "q0", "target": "f0", "sync": "none", "job-id": "fleece"}}]}));
        let mut expected_now = snapshot.clone();
        for (off, len, byte) in after {
            s.guest_write("q0", &vec![byte; len as usize], off).unwrap();
            expected_now[off as usize..(off + len) as usize].fill(byte);
        }
        let mut fleece = vec![0u8; SIZE as usize];
        s.read("f0", &mut fleece, 0).unwrap();
        prop_assert!(fleece == snapshot, "the overlay does not show the point in time");
        let mut now = vec![0u8; SIZE as usize];
        s.read("q0", &mut now, 0).unwrap();
        prop_assert!(now == expected_now);
        prop_assert!(s.node("q0").unwrap().bitmap("cp").unwrap().count() > 0);
    }
}

#[test]
fn full_backup_copies_and_incremental_clears_its_bitmap() {
    let mut s = setup();
    s.add_image("/img/t.qcow2", ImageFormat::Qcow2, MemoryDisk::new(SIZE));
    ok(
        &mut s,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t",
        "file": {"driver": "file", "filename": "/img/t.qcow2"}}),
    );
    s.guest_write("q0", &[7u8; 100], 1 << 20).unwrap();
    ok(
        &mut s,
        "block-dirty-bitmap-add",
        json!({"node": "q0", "name": "inc"}),
    );
    ok(
        &mut s,
        "blockdev-backup",
        json!({"device": "q0", "target": "t", "sync": "full", "job-id": "full"}),
    );
    let mut buf = [0u8; 100];
    s.read("t", &mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [7u8; 100]);
    assert!(s.jobs().is_empty(), "auto-dismissed");

    s.guest_write("q0", &[9u8; 10], 3 << 20).unwrap();
    assert_eq!(s.node("q0").unwrap().bitmap("inc").unwrap().count(), 65536);
    ok(
        &mut s,
        "blockdev-backup",
        json!({"device": "q0", "target": "t", "sync": "incremental",
        "bitmap": "inc", "job-id": "inc"}),
    );
    let mut buf = [0u8; 10];
    s.read("t", &mut buf, 3 << 20).unwrap();
    assert_eq!(buf, [9u8; 10]);
    let inc = s.node("q0").unwrap().bitmap("inc").unwrap();
    assert_eq!(
        (inc.count(), inc.busy),
        (0, false),
        "cleared on success, released"
    );
}

#[test]
fn failing_transaction_sends_no_events() {
    let mut s = setup();
    let before = s.next_event;
    let r = run(
        &mut s,
        "transaction",
        json!({"actions": [
        {"type": "blockdev-backup", "data": {"device": "q0", "target": "f0", "sync": "none", "job-id": "j"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "q0", "name": "missing"}}]}),
    );
    assert_eq!(
        r,
        Response::error("GenericError", "Dirty bitmap 'missing' not found")
    );
    assert_eq!(s.next_event, before);
    assert!(s.jobs().is_empty());
}

/// The async server: greeting, negotiation, and an event raised while the client is idle.
#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_server_speaks_the_wire_and_pushes_events() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let fake = super::FakeMonitor::new();
    let stream = fake.connect_duplex();
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let greeting = lines.next_line().await.unwrap().unwrap();
    assert!(greeting.contains("\"major\":10"), "{greeting}");
    write
        .write_all(b"{\"execute\": \"qmp_capabilities\", \"id\": 1}")
        .await
        .unwrap();
    assert_eq!(
        lines.next_line().await.unwrap().unwrap(),
        "{\"id\":1,\"return\":{}}"
    );
    fake.emit_event("RESUME", None);
    let event: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(event["event"], "RESUME");
    assert!(event["timestamp"]["seconds"].as_u64().unwrap() > 0);
}

/// The README's example, kept compiling and true.
#[test]
fn readme_example() -> Result<(), Box<dyn std::error::Error>> {
    use super::FakeMonitor;
    use crate::{cmd, types::BlockdevOptions, MonitorExt};

    let fake = FakeMonitor::builder().release(QemuRelease::V7_2).build();
    let mut qemu = fake.connect()?;
    qemu.call::<cmd::BlockdevAdd>(&BlockdevOptions::null_co("scratch", 1 << 20))?;
    qemu.call::<cmd::BlockDirtyBitmapAdd>(&cmd::BlockDirtyBitmapAddArgs::new("scratch", "b0"))?;
    fake.guest_write("scratch", &[1; 512], 0)?;
    assert_eq!(
        fake.state()
            .node("scratch")
            .unwrap()
            .bitmap("b0")
            .unwrap()
            .count(),
        65536
    );
    Ok(())
}
