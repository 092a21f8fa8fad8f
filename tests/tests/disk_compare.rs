//! `vmsdk disk compare` against `qemu-img compare` of each peer generation: the same message
//! and exit status for identical, different, differently sized and unopenable disks, local
//! files and NBD exports alike; and sparse disks compared without reading their holes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vmsdk_tests::disk::{random_bytes, NbdServer};
use vmsdk_tests::peers::{for_each_generation, Generation};

const MIB: u64 = 1 << 20;

/// `qemu-img compare -f raw -F raw [-s] A B` of `generation`: (stdout, exit status).
fn qemu_img_compare(
    generation: Generation,
    a: &Path,
    b: &Path,
    strict: bool,
) -> Option<(String, i32)> {
    let mut command = generation
        .command("qemu-img", "qemu-utils")?
        .args(["compare", "-f", "raw", "-F", "raw"]);
    if strict {
        command = command.arg("-s");
    }
    let out = command.arg(a).arg(b).output();
    Some((
        String::from_utf8(out.stdout).unwrap(),
        out.status.code().unwrap(),
    ))
}

fn vmsdk_compare(a: &str, b: &str, extra: &[&str]) -> Option<(String, String, i32)> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    let out = Command::new(binary)
        .args(["disk", "compare"])
        .args(extra)
        .args([a, b])
        .output()
        .unwrap();
    Some((
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap(),
    ))
}

fn image(dir: &Path, name: &str, size: u64, writes: &[(u64, &[u8])]) -> std::path::PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    for (offset, data) in writes {
        file.write_all_at(data, *offset).unwrap();
    }
    path
}

#[test]
fn answers_as_qemu_img_compare_does() {
    for_each_generation(&["qemu-img", "qemu-nbd"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = random_bytes(3 * MIB as usize, 1);
        let base: &[(u64, &[u8])] = &[(MIB, &data), (40 * MIB, &data[..5000])];
        let a = image(d, "a.img", 64 * MIB, base);
        let same = image(d, "same.img", 64 * MIB, base);
        let mut moved = base.to_vec();
        moved.push((2 * MIB + 4321, b"x"));
        let changed = image(d, "changed.img", 64 * MIB, &moved);
        let mut late = base.to_vec();
        late.push((63 * MIB + 1000, b"tail"));
        let late_change = image(d, "late.img", 64 * MIB, &late);
        let longer = image(d, "longer.img", 80 * MIB, base);
        let mut longer_data = base.to_vec();
        longer_data.push((70 * MIB + 3, b"y"));
        let longer_dirty = image(d, "longer_dirty.img", 80 * MIB, &longer_data);
        let missing = d.join("missing.img");
        let cases = [
            (&a, &same, false),
            (&a, &changed, false),
            (&changed, &a, false),
            (&a, &late_change, false),
            (&a, &longer, false),
            (&longer, &a, false),
            (&a, &longer, true),
            (&a, &longer_dirty, false),
            (&a, &missing, false),
        ];
        for (x, y, strict) in cases {
            let Some((expected, status)) = qemu_img_compare(g, x, y, strict) else {
                return;
            };
            let flags: &[&str] = if strict { &["-s"] } else { &[] };
            let Some((out, err, code)) =
                vmsdk_compare(x.to_str().unwrap(), y.to_str().unwrap(), flags)
            else {
                return;
            };
            let case = format!("{} {} strict={strict}", x.display(), y.display());
            assert_eq!(code, status, "{case}: {err}");
            if status < 2 {
                assert_eq!(out, expected, "{case}");
            } else {
                assert!(err.contains("missing.img"), "{case}: {err}");
            }
        }
        // The same disks over NBD (qemu-nbd of this generation) answer the same.
        let Some(sa) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", a.to_str().unwrap()]) else {
            return;
        };
        let sc =
            NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", changed.to_str().unwrap()]).unwrap();
        let (expected, status) = qemu_img_compare(g, &a, &changed, false).unwrap();
        let (out, err, code) = vmsdk_compare(&sa.uri(), &sc.uri(), &[]).unwrap();
        assert_eq!((out, code), (expected, status), "{err}");
        let (out, _, code) = vmsdk_compare(&sa.uri(), a.to_str().unwrap(), &[]).unwrap();
        assert_eq!((out.as_str(), code), ("Images are identical.\n", 0));
        // JSON names the exact byte.
        let (out, _, code) = vmsdk_compare(&sa.uri(), &sc.uri(), &["--json"]).unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(code, 1);
        assert_eq!(value["first_difference"], 2 * MIB + 4321);
        assert_eq!(value["identical"], false);
    });
}

#[test]
fn holes_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(MIB as usize, 2);
    let writes: &[(u64, &[u8])] = &[(5 * MIB, &data), (900 * MIB, &data)];
    let a = image(dir.path(), "a.img", 1 << 30, writes);
    let b = image(dir.path(), "b.img", 1 << 30, writes);
    let Some((out, err, code)) =
        vmsdk_compare(a.to_str().unwrap(), b.to_str().unwrap(), &["--json"])
    else {
        return;
    };
    assert_eq!(code, 0, "{err}");
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value["identical"], true);
    // Both islands from both files; none of the 1022 MiB of holes.
    assert_eq!(value["read"], 4 * MIB, "{value}");
}
