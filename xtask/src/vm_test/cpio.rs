//! A writer for the `newc` cpio format the Linux kernel unpacks as an initramfs.
//!
//! Written here rather than shelling out to `cpio` so that device nodes (`/dev/console`) can go
//! into the archive without root, and the archive is the same on every machine.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// An initramfs being assembled in memory; parent directories are added on demand.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    directories: BTreeSet<String>,
    next_inode: u32,
}

const MODE_DIR: u32 = 0o040_000;
const MODE_FILE: u32 = 0o100_000;
const MODE_SYMLINK: u32 = 0o120_000;
const MODE_CHAR_DEVICE: u32 = 0o020_000;

impl Archive {
    pub fn new() -> Archive {
        Archive {
            next_inode: 1,
            ..Archive::default()
        }
    }

    /// Adds `path` (absolute inside the guest) and its parents as directories.
    pub fn directory(&mut self, path: &str) {
        let path = normalise(path);
        if path.is_empty() || self.directories.contains(&path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.directory(parent);
        }
        self.entry(&path, MODE_DIR | 0o755, 2, (0, 0), &[]);
        self.directories.insert(path);
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, permissions: u32, contents: &[u8]) {
        let path = normalise(path);
        self.parent_of(&path);
        self.entry(
            &path,
            MODE_FILE | (permissions & 0o7777),
            1,
            (0, 0),
            contents,
        );
    }

    /// Adds a symbolic link `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = normalise(path);
        self.parent_of(&path);
        self.entry(&path, MODE_SYMLINK | 0o777, 1, (0, 0), target.as_bytes());
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        let path = normalise(path);
        self.parent_of(&path);
        self.entry(&path, MODE_CHAR_DEVICE | 0o600, 1, (major, minor), &[]);
    }

    /// Appends the trailer and writes the archive out.
    pub fn finish(mut self, out: &mut impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        out.write_all(&self.bytes)
    }

    fn parent_of(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.directory(parent);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, links: u32, rdev: (u32, u32), data: &[u8]) {
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            links,
            0, // mtime: fixed, so the archive is reproducible
            u32::try_from(data.len()).expect("initramfs members are far below 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short names"),
            0, // check (unused by newc)
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

/// Archive member names are relative (`bin/sh`), without a leading or trailing slash.
fn normalise(path: &str) -> String {
    path.trim_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_aligned_and_parents_come_first() {
        let mut archive = Archive::new();
        archive.file("/usr/bin/x", 0o755, b"abc");
        archive.char_device("/dev/console", 5, 1);
        let mut out = Vec::new();
        archive.finish(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        let usr = text.find("usr\0").unwrap();
        let usr_bin = text.find("usr/bin\0").unwrap();
        let file = text.find("usr/bin/x\0").unwrap();
        assert!(usr < usr_bin && usr_bin < file);
        assert!(text.ends_with('\0') && text.contains("TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
        // Every header starts on a 4-byte boundary with the newc magic.
        for (offset, _) in text.match_indices("070701") {
            assert_eq!(offset % 4, 0);
        }
        // The console node carries its device numbers in rdevmajor/rdevminor.
        let console = text.find("dev/console\0").unwrap();
        let header = &text[console - 110..console];
        assert_eq!(&header[78..94], "0000000500000001");
    }
}
