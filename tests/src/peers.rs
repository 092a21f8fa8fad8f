//! Generations of test peers: the Debian 12 programs installed on the machine, and the Debian 13
//! ("trixie") ones in the root `cargo xtask peer-root` builds under `<target>/peer-root/trixie`.
//!
//! A peer test runs once per [`Generation::selected`] generation (both by default;
//! `VMSDK_PEER_GENERATIONS=host`, `=trixie` or `=host,trixie` picks), starts its peers through
//! [`Generation::command`] and prints what it ran with [`announce`]:
//!
//! ```no_run
//! use vmsdk_tests::peers::{announce, Generation};
//!
//! for generation in Generation::selected() {
//!     let Some(qemu_nbd) = generation.command("qemu-nbd", "qemu-utils") else {
//!         continue; // skipped with a notice (a failure under CI=true)
//!     };
//!     announce(generation, &["qemu-nbd"]);
//!     let status = qemu_nbd.arg("--version").output().status;
//!     assert!(status.success());
//! }
//! ```
//!
//! # How a program runs in the Debian 13 root
//!
//! `unshare --mount --propagation private` gives the program a mount namespace of its own; in it
//! `/proc`, `/sys` and `/dev` are bind-mounted into the root, fresh tmpfs instances cover the
//! root's `/tmp` and `/run`, the directories the command names are bind-mounted at the same path
//! (so a socket created inside is reachable from the test at the path it asked for), and then
//! `chroot` runs the program. `unshare`, `sh` and `chroot` each `exec` the next, so the child's
//! PID is the peer's own PID and killing it by PID ends the peer.
//!
//! Nothing is mounted in the machine's namespace: the kernel drops the namespace and every
//! mount in it when its last process exits — also when the test panics, is killed, or the peer
//! is killed — so concurrent tests in one or several processes never see each other's mounts,
//! no reference counting is needed, and no mount is ever left behind. (`cargo xtask peer-root
//! --unmount` checks the machine's mount table anyway.)

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::running_in_ci;

/// The environment variable that picks generations: `host`, `trixie`, or both comma-separated.
pub const GENERATIONS_VAR: &str = "VMSDK_PEER_GENERATIONS";

/// The environment variable that overrides where the Debian 13 root is.
pub const TRIXIE_ROOT_VAR: &str = "VMSDK_TRIXIE_ROOT";

/// The stamp file `cargo xtask peer-root` writes into a finished root.
pub const STAMP: &str = "vmsdk-peer-root.stamp";

/// How long [`PeerCommand::output`] lets a one-shot program run.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The `PATH` programs in the root get.
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the private mounts and `exec`s chroot. Arguments: the root, the number of bind
/// mounts, those paths, then chroot's own arguments (options, root, program, arguments).
const CHROOT_SCRIPT: &str = r#"set -e
root=$1; n=$2; shift 2
for d in proc sys dev; do mount --rbind "/$d" "$root/$d"; done
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
while [ "$n" -gt 0 ]; do
  p=$1; shift; n=$((n - 1))
  if [ -d "$p" ]; then mkdir -p "$root$p"
  else mkdir -p "$root$(dirname "$p")"; [ -e "$root$p" ] || : > "$root$p"; fi
  # Recursive: a filesystem a test mounted inside its directory (a small tmpfs) is seen too.
  mount --rbind "$p" "$root$p"
done
exec chroot "$@""#;

/// A generation of peer programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Generation {
    /// Debian 12 ("bookworm"), installed on the machine: qemu-ga and qemu-nbd 7.2, nbdkit 1.32,
    /// libnbd 1.14, systemd 252.
    Host,
    /// Debian 13 ("trixie") in the root `cargo xtask peer-root` builds: qemu 10.0, nbdkit 1.42,
    /// libnbd 1.22 (plus nbdcopy/nbdinfo 1.24 from unstable as `nbdcopy-1.24`,
    /// `nbdinfo-1.24`), systemd 257.
    Trixie,
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Generation {
    /// Every generation, oldest first.
    pub const ALL: [Generation; 2] = [Generation::Host, Generation::Trixie];

    /// The generations to run: all of them, or those named in [`GENERATIONS_VAR`].
    ///
    /// # Panics
    ///
    /// On an unknown name in the variable.
    pub fn selected() -> Vec<Generation> {
        let Ok(value) = std::env::var(GENERATIONS_VAR) else {
            return Self::ALL.to_vec();
        };
        let mut chosen: Vec<Generation> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| {
                Self::from_name(name).unwrap_or_else(|| {
                    panic!("{GENERATIONS_VAR}: unknown generation `{name}` (use host, trixie)")
                })
            })
            .collect();
        chosen.sort();
        chosen.dedup();
        chosen
    }

    /// The generation called `name` (`host`, `trixie`; `debian12`, `debian13` too).
    pub fn from_name(name: &str) -> Option<Generation> {
        match name.to_ascii_lowercase().as_str() {
            "host" | "debian12" | "bookworm" => Some(Generation::Host),
            "trixie" | "debian13" => Some(Generation::Trixie),
            _ => None,
        }
    }

    /// `host` or `trixie`.
    pub fn name(self) -> &'static str {
        match self {
            Generation::Host => "host",
            Generation::Trixie => "trixie",
        }
    }

    /// A human description: `Debian 12 (host)`, `Debian 13 (trixie root)`.
    pub fn describe(self) -> &'static str {
        match self {
            Generation::Host => "Debian 12 (host)",
            Generation::Trixie => "Debian 13 (trixie root)",
        }
    }

    /// The root directory of the generation's file system: `None` for the machine itself, the
    /// Debian 13 root when it is built (its stamp exists), and otherwise `None` after a skip
    /// notice.
    ///
    /// # Panics
    ///
    /// For [`Generation::Trixie`] when the root is missing and [`running_in_ci`] is true.
    pub fn root(self) -> Option<PathBuf> {
        match self {
            Generation::Host => None,
            Generation::Trixie => {
                let root = trixie_root();
                if root.join(STAMP).is_file() {
                    // The kernel names files in the root by their real path (a program's open
                    // descriptors in /proc), so a root reached through a symlink is resolved.
                    Some(root.canonicalize().unwrap_or(root))
                } else {
                    let message = format!(
                        "the Debian 13 peer root {} is not built (`cargo xtask peer-root` builds \
                         it, as root)",
                        root.display()
                    );
                    assert!(!running_in_ci(), "{message}");
                    eprintln!("SKIPPED ({self}): {message}");
                    None
                }
            }
        }
    }

    /// Whether the generation can run programs here: always for the host; for Debian 13 when
    /// its root is built and this process may mount and chroot (is root). Prints a skip notice
    /// when not.
    ///
    /// # Panics
    ///
    /// When it cannot and [`running_in_ci`] is true.
    pub fn available(self) -> bool {
        match self {
            Generation::Host => true,
            Generation::Trixie => {
                if self.root().is_none() {
                    return false;
                }
                if !crate::running_as_root() {
                    let message = "running peers in the Debian 13 root needs root (mount, chroot)";
                    assert!(!running_in_ci(), "{message}");
                    eprintln!("SKIPPED ({self}): {message}");
                    return false;
                }
                true
            }
        }
    }

    /// Where `program` is, as the generation sees it (for the root: the path inside it).
    /// `None` when the generation lacks it; no notice.
    pub fn find(self, program: &str) -> Option<PathBuf> {
        match self {
            Generation::Host => crate::find_program(program),
            Generation::Trixie => {
                let root = trixie_root();
                if let Some(inside) = program.strip_prefix('/') {
                    return root.join(inside).is_file().then(|| PathBuf::from(program));
                }
                ROOT_PATH
                    .split(':')
                    .map(|dir| Path::new(dir).join(program))
                    .find(|inside| root.join(inside.strip_prefix("/").unwrap()).is_file())
            }
        }
    }

    /// A command running `program` of this generation, or `None` after a skip notice when the
    /// generation or the program is missing (Debian package `debian_package`).
    ///
    /// # Panics
    ///
    /// When either is missing and [`running_in_ci`] is true.
    pub fn command(self, program: &str, debian_package: &str) -> Option<PeerCommand> {
        if !self.available() {
            return None;
        }
        let Some(path) = self.find(program) else {
            let message = match self {
                Generation::Host => format!(
                    "peer `{program}` is missing (Debian package `{debian_package}`; `cargo \
                     xtask deps` installs it)"
                ),
                Generation::Trixie => format!(
                    "peer `{program}` is missing in the Debian 13 root {} (package \
                     `{debian_package}`; `cargo xtask peer-root --rebuild`)",
                    trixie_root().display()
                ),
            };
            assert!(!running_in_ci(), "{message}");
            eprintln!("SKIPPED ({self}): {message}");
            return None;
        };
        Some(PeerCommand {
            generation: self,
            program: path,
            args: Vec::new(),
            binds: Vec::new(),
            envs: Vec::new(),
            nobody: false,
        })
    }

    /// The versions of the generation's `programs` as one line, e.g. `trixie: qemu-nbd 10.0.13;
    /// nbdinfo 1.22.2`.
    pub fn versions(self, programs: &[&str]) -> String {
        let parts: Vec<String> = programs
            .iter()
            .map(|p| peer_version(self, p).unwrap_or_else(|| format!("{p} (missing)")))
            .collect();
        format!("{}: {}", self.describe(), parts.join("; "))
    }
}

/// The Debian 13 root: [`TRIXIE_ROOT_VAR`], else `<target>/peer-root/trixie` found from this
/// test executable's path (`<target>/<profile>/deps/<test>`), honouring `CARGO_TARGET_DIR`.
pub fn trixie_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(TRIXIE_ROOT_VAR) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_absolute() {
            dir
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir)
        };
        return dir.join("peer-root/trixie");
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|a| a.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
    });
    from_exe
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("peer-root/trixie")
}

/// The package versions the root's stamp records (`package <name>: <version>` and `unstable
/// <name>: <version>` lines), e.g. `("qemu-utils", "1:10.0.13+ds-0+deb13u1")`.
pub fn trixie_packages() -> Vec<(String, String)> {
    let stamp = std::fs::read_to_string(trixie_root().join(STAMP)).unwrap_or_default();
    stamp
        .lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("package ")
                .or_else(|| l.strip_prefix("unstable "))?;
            let (name, version) = rest.split_once(": ")?;
            let name = if l.starts_with("unstable ") {
                format!("{name} (unstable)")
            } else {
                name.to_owned()
            };
            Some((name, version.to_owned()))
        })
        .collect()
}

/// Version lines already probed, per generation and program.
type VersionCache = HashMap<(Generation, String), Option<String>>;

/// The version line of `program` in `generation` (`qemu-nbd 10.0.13 (Debian …)`), from its
/// `--version`, cached per process. `None` when the program is missing.
pub fn peer_version(generation: Generation, program: &str) -> Option<String> {
    static CACHE: OnceLock<Mutex<VersionCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (generation, program.to_owned());
    if let Some(known) = cache.lock().unwrap().get(&key) {
        return known.clone();
    }
    let version = (|| {
        generation.find(program)?;
        if generation == Generation::Trixie && !trixie_root().join(STAMP).is_file() {
            return None;
        }
        let command = PeerCommand {
            generation,
            program: generation.find(program)?,
            args: vec!["--version".into()],
            binds: Vec::new(),
            envs: Vec::new(),
            nobody: false,
        };
        let out = command.output_within(Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let first = lines.first()?.trim();
        // qemu-nbd 7.2 names itself by the path it was run as.
        let first = match first.split_once(' ') {
            Some((name, rest)) if name.starts_with('/') => {
                format!("{} {rest}", name.rsplit('/').next().unwrap_or(name))
            }
            _ => first.to_owned(),
        };
        // nbdinfo and nbdcopy name the library on their second line.
        match lines.get(1) {
            Some(lib) if lib.starts_with("libnbd ") && !first.contains("libnbd") => {
                Some(format!("{first} ({})", lib.trim()))
            }
            _ => Some(first),
        }
    })();
    cache.lock().unwrap().insert(key, version.clone());
    version
}

/// Prints (to stderr, shown with the test's output) which generation and peer versions a test
/// runs against.
pub fn announce(generation: Generation, programs: &[&str]) {
    eprintln!("peers: {}", generation.versions(programs));
}

/// Runs `body` once per selected generation that is available, printing a header with the
/// versions of `programs` before each. Returns the generations that ran.
pub fn for_each_generation(programs: &[&str], mut body: impl FnMut(Generation)) -> Vec<Generation> {
    let mut ran = Vec::new();
    for generation in Generation::selected() {
        if !generation.available() {
            continue;
        }
        eprintln!("=== generation {generation}");
        announce(generation, programs);
        body(generation);
        ran.push(generation);
    }
    ran
}

/// A program of one [`Generation`] with its arguments, the directories (or files) it needs to
/// see, and its user. Build it with [`Generation::command`], then [`PeerCommand::spawn`] a
/// server or take the [`PeerCommand::output`] of a one-shot run.
///
/// For the Debian 13 root, every absolute path among the arguments (also after `=`, as in
/// `socket=/tmp/x/nbd.sock` or `file=/tmp/x/img`) is made visible inside: an existing
/// directory is bind-mounted itself, any other path through its parent directory. Paths under
/// `/dev`, `/proc` and `/sys` are there already. [`PeerCommand::bind`] adds more. On the host
/// the binds are ignored.
#[derive(Debug, Clone)]
pub struct PeerCommand {
    generation: Generation,
    program: PathBuf,
    args: Vec<OsString>,
    binds: Vec<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    nobody: bool,
}

impl PeerCommand {
    /// Appends an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Makes `path` (a directory, or a single file such as `/.dockerenv`) visible at the same
    /// path inside the root.
    ///
    /// # Panics
    ///
    /// When `path` is `/` or a directory directly below it other than `/tmp`'s children
    /// (`/work`, `/home`, ...): a peer sees only what it needs.
    pub fn bind(mut self, path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        assert!(
            path.is_absolute() && path.components().count() >= 3 || path.is_file(),
            "refusing to bind-mount {} into the peer root: bind a test's own directory",
            path.display()
        );
        self.binds.push(path.to_path_buf());
        self
    }

    /// Sets an environment variable of the program.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the program as `nobody:nogroup` with no supplementary groups (when the test runs as
    /// root; otherwise as the test's user).
    pub fn as_nobody(mut self) -> Self {
        self.nobody = true;
        self
    }

    /// The generation this command runs in.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The program's path as its generation sees it.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The directories and files bind-mounted for a run in the root: the explicit ones plus
    /// those the arguments name, without duplicates or nested ones.
    pub fn bind_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.binds.clone();
        for arg in &self.args {
            let text = arg.to_string_lossy();
            for candidate in path_candidates(&text) {
                if let Some(dir) = bind_for(&candidate) {
                    paths.push(dir);
                }
            }
        }
        paths.sort();
        paths.dedup();
        let mut kept: Vec<PathBuf> = Vec::new();
        for path in paths {
            if !kept.iter().any(|k| path.starts_with(k)) {
                kept.push(path);
            }
        }
        kept
    }

    /// The ready-to-spawn [`Command`]. For the root: `unshare … sh -c … chroot … program`,
    /// with a clean environment (`PATH`, `LANG` and the [`PeerCommand::env`] variables).
    pub fn to_command(&self) -> Command {
        match self.generation {
            Generation::Host => {
                let mut command = if self.nobody && crate::running_as_root() {
                    let mut c = Command::new("setpriv");
                    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                        .arg(&self.program);
                    c
                } else {
                    Command::new(&self.program)
                };
                command.args(&self.args);
                command.envs(self.envs.iter().map(|(k, v)| (k, v)));
                command
            }
            Generation::Trixie => {
                let root = trixie_root();
                let binds = self.bind_paths();
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "--"])
                    .args(["sh", "-c", CHROOT_SCRIPT, "sh"])
                    .arg(&root)
                    .arg(binds.len().to_string())
                    .args(&binds);
                if self.nobody && crate::running_as_root() {
                    command.args(["--userspec=65534:65534", "--groups=65534"]);
                }
                command
                    .arg(&root)
                    .arg(&self.program)
                    .args(&self.args)
                    .env_clear()
                    .env("PATH", ROOT_PATH)
                    .env("LANG", "C.UTF-8")
                    .envs(self.envs.iter().map(|(k, v)| (k, v)));
                command
            }
        }
    }

    /// Starts the program with stdin closed (stdout and stderr as given).
    ///
    /// # Panics
    ///
    /// When it cannot be started.
    pub fn spawn(&self, stdout: Stdio, stderr: Stdio) -> Child {
        self.to_command()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} ({}): {e}",
                    self.program.display(),
                    self.generation
                )
            })
    }

    /// Runs the program to completion within [`DEFAULT_RUN_TIMEOUT`] and returns its output.
    ///
    /// # Panics
    ///
    /// When it cannot be started or outlives the timeout (it is killed first).
    pub fn output(&self) -> Output {
        self.output_within(DEFAULT_RUN_TIMEOUT)
    }

    /// [`PeerCommand::output`] with another limit.
    ///
    /// # Panics
    ///
    /// When it cannot be started or outlives `limit` (it is killed first).
    pub fn output_within(&self, limit: Duration) -> Output {
        let mut child = self.spawn(Stdio::piped(), Stdio::piped());
        let mut stdout = child.stdout.take().expect("stdout pipe");
        let mut stderr = child.stderr.take().expect("stderr pipe");
        let out_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let deadline = Instant::now() + limit;
        let status: ExitStatus = loop {
            if let Some(status) = child.try_wait().expect("wait for the peer") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} ({}) did not finish within {limit:?}; killed",
                    self.program.display(),
                    self.generation
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Output {
            status,
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
        }
    }
}

/// Absolute paths an argument names: itself, the part after `=` (`file=/x`), and a URI's
/// `socket=` parameter.
fn path_candidates(arg: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if arg.starts_with('/') {
        found.push(PathBuf::from(arg));
    }
    if !arg.contains("://") {
        // `key=/path`, also inside comma lists (`tls-creds-x509,id=t0,dir=/certs`).
        for item in arg.split(',') {
            if let Some((_, value)) = item.split_once('=') {
                if value.starts_with('/') {
                    found.push(PathBuf::from(value));
                }
            }
        }
    }
    if arg.contains("://") {
        // Local files in NBD URIs: `socket=`, `tls-certificates=`, `tls-psk-file=`.
        if let Some(query) = arg.split_once('?').map(|(_, q)| q) {
            for pair in query.split('&') {
                if let Some((_, value)) = pair.split_once('=') {
                    if value.starts_with('/') {
                        found.push(PathBuf::from(value));
                    }
                }
            }
        }
    }
    found
}

/// The directory to bind so that `path` is visible in the root, or `None` when nothing needs
/// binding (`/dev`, `/proc`, `/sys`, or a top-level path the root has anyway).
fn bind_for(path: &Path) -> Option<PathBuf> {
    if ["/dev", "/proc", "/sys"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        return None;
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent()?.to_path_buf()
    };
    // Only a test's own directories (at least two levels deep, e.g. /tmp/.tmpXYZ): never `/`,
    // `/tmp` as a whole or `/work`.
    (dir.components().count() >= 3 && dir.exists()).then_some(dir)
}
