//! `-` as a copy endpoint, through real pipes: `vmsdk disk copy URI - | sha256sum` must give the
//! source's checksum and the very bytes `nbdcopy URI -` writes (libnbd 1.14 on the machine,
//! 1.22 in the Debian 13 root), for random and half-sparse images served by qemu-nbd and
//! nbdkit of both peer generations; `cat IMAGE | vmsdk disk copy - URI` must fill an export
//! with the image; a backup through gzip must come back intact. The edges: standard input
//! longer than the destination fails as nbdcopy fails, a shorter one succeeds as nbdcopy does
//! and leaves the rest; a reader that closes the pipe early gets a clear error, not a panic;
//! a terminal is refused, as nbdcopy refuses it.
//!
//! Every pipe here is an OS pipe between processes (`Stdio::piped`), never a buffer.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmsdk_tests::disk::{nbd_tool, random_image, sha256, sha256_file, sparse_image, NbdServer};
use vmsdk_tests::peers::{for_each_generation, Generation};

const MIB: u64 = 1 << 20;
/// Longest any process here may run.
const LIMIT: Duration = Duration::from_secs(120);

/// Waits for `child` at most [`LIMIT`]; kills it and panics after that.
fn wait(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// What `first | second` did.
struct Piped {
    first: ExitStatus,
    first_stderr: String,
    second: ExitStatus,
    second_stdout: Vec<u8>,
    second_stderr: String,
}

/// Runs `first | second` through an OS pipe, both within [`LIMIT`].
fn pipe(mut first: Command, mut second: Command) -> Piped {
    let mut a = first
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the writing side");
    let mut b = second
        .stdin(Stdio::from(a.stdout.take().expect("stdout")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reading side");
    // The commands hold the parent's copies of the pipe's ends: drop them, or the writer never
    // sees its reader leave (no EPIPE) and a reader never sees the end of its input.
    let (first_name, second_name) = (format!("{first:?}"), format!("{second:?}"));
    drop((first, second));
    let a_err = drain(a.stderr.take().expect("stderr"));
    let b_out = drain(b.stdout.take().expect("stdout"));
    let b_err = drain(b.stderr.take().expect("stderr"));
    let first = wait(&mut a, &first_name);
    let second = wait(&mut b, &second_name);
    Piped {
        first,
        first_stderr: String::from_utf8_lossy(&a_err.join().unwrap()).into_owned(),
        second,
        second_stdout: b_out.join().unwrap(),
        second_stderr: String::from_utf8_lossy(&b_err.join().unwrap()).into_owned(),
    }
}

fn vmsdk() -> Option<Command> {
    vmsdk_tests::vmsdk_binary().map(Command::new)
}

fn shell(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.args(["-c", script]);
    command
}

/// `vmsdk disk copy --no-progress SOURCE -`, its standard output's SHA-256 through a real
/// `sha256sum`, and its standard error.
fn vmsdk_to_sha256sum(source: &str, extra: &[&str]) -> Option<(String, String)> {
    let mut copy = vmsdk()?;
    copy.args(["disk", "copy", "--no-progress"])
        .args(extra)
        .args([source, "-"]);
    let out = pipe(copy, Command::new("sha256sum"));
    assert!(
        out.first.success() && out.second.success(),
        "vmsdk disk copy {source} - | sha256sum: {}{}",
        out.first_stderr,
        out.second_stderr
    );
    let text = String::from_utf8(out.second_stdout).unwrap();
    let hex = text.split_whitespace().next().unwrap().to_owned();
    Some((hex, out.first_stderr))
}

/// The SHA-256 of what `nbdcopy URI -` of `generation` writes to its standard output (a pipe).
fn nbdcopy_stdout_sha256(generation: Generation, uri: &str) -> Option<String> {
    let out = nbd_tool(generation, "nbdcopy")?
        .arg(uri)
        .arg("-")
        .output_within(LIMIT);
    vmsdk_tests::assert_success(&out, format_args!("nbdcopy {uri} - ({generation})"));
    Some(sha256(&out.stdout))
}

/// A random image and a half-sparse one (random first half, a hole, a little data near the
/// end, a hole to the end).
fn images(dir: &Path) -> [std::path::PathBuf; 2] {
    let random = dir.join("random.img");
    random_image(&random, 8 * MIB as usize, 11);
    let half = dir.join("half.img");
    sparse_image(
        &half,
        16 * MIB,
        &[(0, 8 * MIB as usize), (13 * MIB + 4096, 70_000)],
    );
    [random, half]
}

#[test]
fn exports_stream_to_stdout_as_the_source_and_as_nbdcopy() {
    for_each_generation(&["qemu-nbd", "nbdkit", "nbdcopy"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let mut sources: Vec<(NbdServer, Option<String>)> = Vec::new();
        for image in images(dir.path()) {
            let Some(server) =
                NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", image.to_str().unwrap()])
            else {
                return;
            };
            sources.push((server, Some(sha256_file(&image))));
            // nbdkit's file plugin serves the same image; sparse-random has no file behind it.
            let Some(server) = NbdServer::nbdkit_in(g, &["-r", "file", image.to_str().unwrap()])
            else {
                return;
            };
            sources.push((server, Some(sha256_file(&image))));
        }
        let Some(server) = NbdServer::nbdkit_in(
            g,
            &[
                "sparse-random",
                "size=32M",
                "seed=7",
                "percent=30",
                "runlength=1048576",
            ],
        ) else {
            return;
        };
        sources.push((server, None));
        for (server, file_sha) in &sources {
            let uri = server.uri();
            let Some((ours, _)) = vmsdk_to_sha256sum(&uri, &[]) else {
                return;
            };
            if let Some(expected) = file_sha {
                assert_eq!(&ours, expected, "{uri} ({})", server.version());
            }
            for tool in [Generation::Host, Generation::Trixie] {
                let Some(theirs) = nbdcopy_stdout_sha256(tool, &uri) else {
                    continue;
                };
                assert_eq!(
                    ours,
                    theirs,
                    "vmsdk and nbdcopy of {tool} wrote different bytes for {uri} ({})",
                    server.version()
                );
            }
            eprintln!(
                "{}: vmsdk disk copy URI - | sha256sum = {ours}, as nbdcopy 1.14 and 1.22",
                server.version()
            );
        }
    });
}

#[test]
fn a_block_hash_of_a_streamed_copy_goes_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let [_, half] = images(dir.path());
    let path = half.to_str().unwrap();
    let Some((stream_sha, stderr)) = vmsdk_to_sha256sum(path, &["--blkhash=sha256/64k"]) else {
        return;
    };
    assert_eq!(stream_sha, sha256_file(&half));
    let out = vmsdk()
        .unwrap()
        .args(["disk", "checksum", "--no-progress", path])
        .output()
        .unwrap();
    assert!(out.status.success());
    let checksum = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stderr.lines().last(),
        Some(checksum.trim()),
        "standard error: {stderr}"
    );
    assert!(
        stderr.contains("copied 16777216 bytes to standard output"),
        "{stderr}"
    );
}

/// A writable export of `size` zero bytes from `generation`: qemu-nbd over a file, or nbdkit's
/// memory plugin. The file, when there is one, stays in `dir`.
fn writable_exports(g: Generation, dir: &Path, size: u64) -> Option<Vec<NbdServer>> {
    let file = dir.join(format!("target-{g}.img"));
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    let qemu = NbdServer::qemu_nbd_in(g, &["-f", "raw", file.to_str().unwrap()])?;
    let kit = NbdServer::nbdkit_in(g, &["memory", &format!("size={size}")])?;
    Some(vec![qemu, kit])
}

#[test]
fn stdin_fills_exports_of_both_generations() {
    for_each_generation(&["qemu-nbd", "nbdkit"], |g| {
        let dir = tempfile::tempdir().unwrap();
        for image in images(dir.path()) {
            let size = std::fs::metadata(&image).unwrap().len();
            let Some(exports) = writable_exports(g, dir.path(), size) else {
                return;
            };
            for export in &exports {
                let uri = export.uri();
                let Some(mut copy) = vmsdk() else { return };
                copy.args(["disk", "copy", "--no-progress", "-", &uri]);
                let out = pipe(shell(&format!("cat '{}'", image.display())), copy);
                assert!(
                    out.first.success() && out.second.success(),
                    "cat | vmsdk disk copy - {uri}: {}",
                    out.second_stderr
                );
                assert!(out.second_stdout.is_empty());
                assert!(
                    out.second_stderr
                        .contains(&format!("copied {size} bytes from standard input")),
                    "{}",
                    out.second_stderr
                );
                // Read back through a pipe as well.
                let (back, _) = vmsdk_to_sha256sum(&uri, &[]).unwrap();
                assert_eq!(back, sha256_file(&image), "{uri} ({})", export.version());
                eprintln!(
                    "{}: cat {} | vmsdk disk copy - URI round trip ok",
                    export.version(),
                    image.file_name().unwrap().to_string_lossy()
                );
            }
        }
    });
}

#[test]
fn a_backup_through_gzip_comes_back_intact() {
    for_each_generation(&["qemu-nbd"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let [_, half] = images(dir.path());
        let Some(server) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", half.to_str().unwrap()])
        else {
            return;
        };
        let Some(mut copy) = vmsdk() else { return };
        copy.args(["disk", "copy", "--no-progress", &server.uri(), "-"]);
        let out = pipe(copy, shell("gzip -c"));
        assert!(
            out.first.success() && out.second.success(),
            "{}",
            out.first_stderr
        );
        let backup = dir.path().join("backup.img.gz");
        std::fs::write(&backup, &out.second_stdout).unwrap();
        // Holes compress: the backup is far smaller than the image.
        assert!(out.second_stdout.len() < 10 * MIB as usize);

        let restored = dir.path().join("restored.img");
        std::fs::File::create(&restored)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        let mut copy = vmsdk().unwrap();
        copy.args([
            "disk",
            "copy",
            "--no-progress",
            "-",
            restored.to_str().unwrap(),
        ]);
        let out = pipe(shell(&format!("gunzip -c '{}'", backup.display())), copy);
        assert!(
            out.first.success() && out.second.success(),
            "{}",
            out.second_stderr
        );
        assert_eq!(sha256_file(&restored), sha256_file(&half));
        eprintln!("{}: backup | gzip, gunzip | restore ok", server.version());
    });
}

/// `producer | nbdcopy - URI` of `generation`: whether it succeeded.
fn nbdcopy_from_stdin(generation: Generation, producer: &str, uri: &str) -> Option<bool> {
    let nbdcopy = nbd_tool(generation, "nbdcopy")?
        .arg("-")
        .arg(uri)
        .to_command();
    let out = pipe(shell(producer), nbdcopy);
    Some(out.second.success())
}

#[test]
fn stdin_longer_than_the_destination_fails_and_shorter_succeeds_as_nbdcopy() {
    for_each_generation(&["nbdkit", "nbdcopy"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.bin");
        random_image(&data, 2 * MIB as usize, 5);
        let Some(export) = NbdServer::nbdkit_in(g, &["memory", "size=1M"]) else {
            return;
        };
        let uri = export.uri();

        // Too long: an error naming the destination's size, as nbdcopy fails.
        let Some(mut copy) = vmsdk() else { return };
        copy.args(["disk", "copy", "--no-progress", "-", &uri]);
        let out = pipe(shell(&format!("cat '{}'", data.display())), copy);
        assert!(!out.second.success());
        assert!(
            out.second_stderr
                .contains("standard input holds more than the destination's 1048576 bytes"),
            "{}",
            out.second_stderr
        );
        assert!(
            !out.second_stderr.contains("panicked"),
            "{}",
            out.second_stderr
        );
        let nbdcopy = nbdcopy_from_stdin(g, &format!("cat '{}'", data.display()), &uri);
        assert_eq!(
            nbdcopy,
            Some(false),
            "nbdcopy of {g} accepted a too-long stdin"
        );

        // Too short: the first bytes are written, the rest left; nbdcopy succeeds too.
        let producer = format!("head -c 1000 '{}'", data.display());
        let mut copy = vmsdk().unwrap();
        copy.args([
            "disk",
            "copy",
            "--no-progress",
            "--stall-timeout",
            "10",
            "-",
            &uri,
        ]);
        let before = read_export(&uri);
        let out = pipe(shell(&producer), copy);
        assert!(out.second.success(), "{}", out.second_stderr);
        assert!(
            out.second_stderr.contains(
                "standard input ended after 1000 bytes; the destination's other 1047576 bytes"
            ),
            "{}",
            out.second_stderr
        );
        let after = read_export(&uri);
        let expected = std::fs::read(&data).unwrap();
        assert!(after[..1000] == expected[..1000]);
        assert!(after[1000..] == before[1000..]);
        assert_eq!(nbdcopy_from_stdin(g, &producer, &uri), Some(true));
        eprintln!(
            "{}: too long fails, too short succeeds, as nbdcopy",
            export.version()
        );
    });
}

/// The bytes of an export, read by vmsdk through a pipe.
fn read_export(uri: &str) -> Vec<u8> {
    let out = vmsdk()
        .unwrap()
        .args(["disk", "copy", "--no-progress", uri, "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    vmsdk_tests::assert_success(&out, "vmsdk disk copy URI -");
    out.stdout
}

#[test]
fn a_reader_that_leaves_early_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    random_image(&image, 32 * MIB as usize, 9);
    let Some(mut copy) = vmsdk() else { return };
    copy.args([
        "disk",
        "copy",
        "--no-progress",
        image.to_str().unwrap(),
        "-",
    ]);
    let out = pipe(copy, shell("head -c 1000 >/dev/null"));
    assert!(out.second.success());
    // An error status and a message, not a signal or a panic.
    assert_eq!(out.first.code(), Some(1), "{}", out.first_stderr);
    assert!(
        out.first_stderr
            .contains("write to standard output (the reading end of the pipe was closed)"),
        "{}",
        out.first_stderr
    );
    assert!(
        !out.first_stderr.contains("panicked"),
        "{}",
        out.first_stderr
    );
}

#[test]
fn a_terminal_is_refused_and_wrong_uses_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("small.img");
    random_image(&image, MIB as usize, 3);
    let Some(binary) = vmsdk_tests::vmsdk_binary() else {
        return;
    };
    // util-linux `script` gives the command a pseudo-terminal as standard output.
    if vmsdk_tests::require_program("script", "bsdutils").is_some() {
        let out = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "'{}' disk copy --no-progress '{}' -",
                binary.display(),
                image.display()
            ))
            .arg("/dev/null")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("standard output is a terminal: refusing to write a disk image"),
            "{text}"
        );
        assert!(text.len() < 1000, "image bytes reached the terminal");
    }
    let fails = |args: &[&str]| {
        let out = Command::new(&binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = dir.path().join("missing.img");
    let text = fails(&["disk", "copy", "-", missing.to_str().unwrap()]);
    assert!(
        text.contains("does not exist: a copy from standard input"),
        "{text}"
    );
    assert!(fails(&["disk", "copy", "-", "-"]).contains("on both sides"));
    let text = fails(&[
        "disk",
        "copy",
        "--dirty-bitmap",
        "b",
        image.to_str().unwrap(),
        "-",
    ]);
    assert!(text.contains("a stream does not have"), "{text}");
    let text = fails(&["disk", "info", "-"]);
    assert!(text.contains("a stream and not a disk"), "{text}");
}

#[test]
fn stalled_pipes_time_out_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    random_image(&image, 16 * MIB as usize, 12);
    // A writer that sends nothing for 8 s, against a stall timeout of 1 s.
    let Some(mut copy) = vmsdk() else { return };
    copy.args(["disk", "copy", "--no-progress", "--stall-timeout", "1", "-"])
        .arg(&image);
    let started = Instant::now();
    let out = pipe(shell("sleep 8"), copy);
    assert!(!out.second.success());
    assert!(
        out.second_stderr
            .contains("standard input moved no data for 1s"),
        "{}",
        out.second_stderr
    );
    // A reader that takes nothing for 8 s: the pipe fills, then the copy gives up.
    let mut copy = vmsdk().unwrap();
    copy.args(["disk", "copy", "--no-progress", "--stall-timeout", "1"])
        .arg(&image)
        .arg("-");
    let out = pipe(copy, shell("sleep 8"));
    assert!(!out.first.success());
    assert!(
        out.first_stderr
            .contains("standard output moved no data for 1s"),
        "{}",
        out.first_stderr
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn stdout_redirected_into_a_file_stays_sparse_as_with_nbdcopy() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let [_, half] = images(dir.path());
    let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
    let Some(mut copy) = vmsdk() else { return };
    let ours = dir.path().join("ours.img");
    let out = copy
        .args(["disk", "copy", "--no-progress"])
        .arg(&half)
        .arg("-")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&ours).unwrap())
        .output()
        .unwrap();
    vmsdk_tests::assert_success(&out, "vmsdk disk copy SRC - > FILE");
    assert_eq!(sha256_file(&ours), sha256_file(&half));
    // The 8 MiB hole and the tail stay holes (the source holds about 8 MiB of data).
    assert!(
        allocated(&ours) < 9 * MIB,
        "{} bytes allocated",
        allocated(&ours)
    );
    let Some(nbdcopy) = nbd_tool(Generation::Host, "nbdcopy") else {
        return;
    };
    let theirs = dir.path().join("theirs.img");
    let status = nbdcopy
        .arg(&half)
        .arg("-")
        .to_command()
        .stdout(std::fs::File::create(&theirs).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(sha256_file(&theirs), sha256_file(&half));
    assert!(
        allocated(&theirs) < 9 * MIB,
        "nbdcopy: {} bytes allocated",
        allocated(&theirs)
    );
    eprintln!(
        "> file: vmsdk allocates {} bytes, nbdcopy 1.14 {}",
        allocated(&ours),
        allocated(&theirs)
    );
}
