//! Block hashes of whole disks, as `nbdcopy --blkhash` (libnbd 1.24) computes them: a digest
//! that verifies a copy, computed while copying or on its own, in any order, on every core.
//!
//! The algorithm (the `blkhash` of ovirt-imageio and of Nir Soffer's blkhash library): split the
//! disk into blocks of [`BlkhashSpec::block_size`] bytes (the last may be shorter), hash each
//! block with the algorithm, then hash the block digests in order followed by the disk size as a
//! little-endian u64. An all-zero block always has the same digest, computed once: zero blocks
//! are recognised by a fast scan (or from the disk's extents, without reading them) and never
//! hashed. The result is not a `sha256sum` of the disk.
//!
//! [`BlkHasher`] takes pieces of the disk in any order and from any number of threads; the
//! [`copy`](crate::copy) engine feeds one when [`CopyOptions::blkhash`](crate::copy::CopyOptions::blkhash)
//! asks for it, and [`checksum`] hashes a disk without copying it.
//!
//! ```
//! use disk_transport::blkhash::{checksum, BlkhashSpec};
//! use disk_transport::copy::CopyOptions;
//! use disk_transport::memory::MemoryDisk;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `nbdcopy --blkhash=md5 -- [ nbdkit data '"hello"' ] null:` prints the same.
//! let disk = MemoryDisk::with_data(b"hello");
//! let spec: BlkhashSpec = "md5".parse()?;
//! let hash = checksum(&disk, spec, &CopyOptions::default(), &mut |_| {})?;
//! assert_eq!(hash.to_string(), "f741ac9ce55f5325906bb14e9c05d467");
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use md5::Digest as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::copy::{copy, is_zero, CopyError, CopyOptions, CopyProgress};
use crate::null::NullDisk;
use crate::{Disk, Error, Result};

/// A hash algorithm of [`BlkhashSpec`]: the four nbdcopy accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BlkhashAlgorithm {
    /// MD5 (16-byte digests).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes), nbdcopy's default.
    #[default]
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl BlkhashAlgorithm {
    /// The name nbdcopy takes: `md5`, `sha1`, `sha256`, `sha512`.
    pub fn name(self) -> &'static str {
        match self {
            BlkhashAlgorithm::Md5 => "md5",
            BlkhashAlgorithm::Sha1 => "sha1",
            BlkhashAlgorithm::Sha256 => "sha256",
            BlkhashAlgorithm::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            BlkhashAlgorithm::Md5 => 16,
            BlkhashAlgorithm::Sha1 => 20,
            BlkhashAlgorithm::Sha256 => 32,
            BlkhashAlgorithm::Sha512 => 64,
        }
    }

    fn hasher(self) -> Hasher {
        match self {
            BlkhashAlgorithm::Md5 => Hasher::Md5(md5::Md5::new()),
            BlkhashAlgorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            BlkhashAlgorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            BlkhashAlgorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn digest(self, data: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for BlkhashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BlkhashAlgorithm {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "md5" => Ok(BlkhashAlgorithm::Md5),
            "sha1" => Ok(BlkhashAlgorithm::Sha1),
            "sha256" => Ok(BlkhashAlgorithm::Sha256),
            "sha512" => Ok(BlkhashAlgorithm::Sha512),
            _ => Err(Error::InvalidParams(format!(
                "unknown block hash algorithm {text:?} (md5, sha1, sha256 or sha512)"
            ))),
        }
    }
}

/// The running hash of one algorithm.
enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> Digest {
        match self {
            Hasher::Md5(h) => Digest::from_slice(&h.finalize()),
            Hasher::Sha1(h) => Digest::from_slice(&h.finalize()),
            Hasher::Sha256(h) => Digest::from_slice(&h.finalize()),
            Hasher::Sha512(h) => Digest::from_slice(&h.finalize()),
        }
    }
}

/// A digest of up to 64 bytes, kept inline so hashes are `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Digest {
    bytes: [u8; 64],
    len: u8,
}

impl Digest {
    fn from_slice(data: &[u8]) -> Self {
        let mut bytes = [0u8; 64];
        bytes[..data.len()].copy_from_slice(data);
        Digest {
            bytes,
            len: data.len() as u8,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Which block hash: algorithm and block size. Parses and prints as nbdcopy's `--blkhash`
/// argument: `sha256`, `md5/4`, `sha512/1M` (the size a power of two, 1 byte to 2 GiB; K, M, G
/// suffixes). The default is nbdcopy's, `sha256/64k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlkhashSpec {
    /// The hash algorithm.
    pub algorithm: BlkhashAlgorithm,
    /// Block size in bytes.
    pub block_size: u64,
}

/// Largest block size nbdcopy accepts.
const MAX_BLOCK_SIZE: u64 = 1 << 31;

impl Default for BlkhashSpec {
    fn default() -> Self {
        BlkhashSpec {
            algorithm: BlkhashAlgorithm::Sha256,
            block_size: 64 * 1024,
        }
    }
}

impl BlkhashSpec {
    /// `algorithm` with blocks of `block_size` bytes (a power of two up to 2 GiB).
    pub fn new(algorithm: BlkhashAlgorithm, block_size: u64) -> Result<Self> {
        if !block_size.is_power_of_two() || block_size > MAX_BLOCK_SIZE {
            return Err(Error::InvalidParams(format!(
                "block hash block size {block_size} is not a power of two from 1 to 2G"
            )));
        }
        Ok(BlkhashSpec {
            algorithm,
            block_size,
        })
    }
}

impl fmt::Display for BlkhashSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = self.block_size;
        let (value, unit) = match size.trailing_zeros() {
            30.. => (size >> 30, "G"),
            20.. => (size >> 20, "M"),
            10.. => (size >> 10, "k"),
            _ => (size, ""),
        };
        write!(f, "{}/{value}{unit}", self.algorithm)
    }
}

impl FromStr for BlkhashSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let (algorithm, size) = match text.split_once('/') {
            Some((a, s)) => (a, Some(s)),
            None => (text, None),
        };
        let algorithm = algorithm.parse()?;
        let block_size = match size {
            None => BlkhashSpec::default().block_size,
            Some(s) => crate::parse_size(s).ok_or_else(|| {
                Error::InvalidParams(format!("block hash block size {s:?} is not a size"))
            })?,
        };
        BlkhashSpec::new(algorithm, block_size)
    }
}

/// A disk's block hash: what `nbdcopy --blkhash` prints. `Display` is the lowercase hex digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blkhash {
    spec: BlkhashSpec,
    size: u64,
    digest: Digest,
}

impl Blkhash {
    /// Algorithm and block size.
    pub fn spec(&self) -> BlkhashSpec {
        self.spec
    }
    /// The disk size that was hashed.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The digest bytes.
    pub fn digest(&self) -> &[u8] {
        self.digest.as_bytes()
    }
    /// The digest in lowercase hex.
    pub fn hex(&self) -> String {
        self.digest().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Blkhash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Blkhash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blkhash")
            .field("spec", &self.spec.to_string())
            .field("size", &self.size)
            .field("digest", &self.hex())
            .finish()
    }
}

/// The serialised form: `{"algorithm": "sha256", "block_size": 65536, "size": N, "digest": "hex"}`.
#[derive(Serialize, Deserialize)]
struct BlkhashRepr {
    algorithm: BlkhashAlgorithm,
    block_size: u64,
    size: u64,
    digest: String,
}

impl Serialize for Blkhash {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        BlkhashRepr {
            algorithm: self.spec.algorithm,
            block_size: self.spec.block_size,
            size: self.size,
            digest: self.hex(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Blkhash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let repr = BlkhashRepr::deserialize(deserializer)?;
        let spec = BlkhashSpec::new(repr.algorithm, repr.block_size).map_err(D::Error::custom)?;
        let hex = repr.digest.as_bytes();
        if hex.len() != 2 * repr.algorithm.digest_len() {
            return Err(D::Error::custom("digest length does not fit the algorithm"));
        }
        let bytes: Vec<u8> = hex
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(|| D::Error::custom("digest is not hex"))
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Blkhash {
            spec,
            size: repr.size,
            digest: Digest::from_slice(&bytes),
        })
    }
}

/// Finished blocks not yet folded into the outer hash.
enum Done {
    /// Digests of consecutive blocks.
    Digests(Vec<Digest>),
    /// This many consecutive all-zero full blocks.
    Zeros(u64),
}

/// A block received in pieces.
struct Partial {
    buf: Box<[u8]>,
    filled: u64,
}

struct State {
    outer: Hasher,
    /// The next block to fold into `outer`.
    next: u64,
    done: BTreeMap<u64, Done>,
    partial: HashMap<u64, Partial>,
}

/// Computes a [`Blkhash`] from pieces of a disk given in any order, from any threads
/// ([`update`](Self::update) for data, [`zeroes`](Self::zeroes) for ranges known to read as
/// zeros). Pieces must not overlap and must cover the disk once, then [`finish`](Self::finish).
///
/// Whole blocks are hashed by the calling thread without holding a lock, so several threads
/// feeding it hash in parallel; only the block digests are put in order under the lock.
/// Out-of-order digests wait in memory until the blocks before them arrive: feeding roughly in
/// order (as the copy engine does) keeps that small.
pub struct BlkHasher {
    spec: BlkhashSpec,
    size: u64,
    blocks: u64,
    zero_digest: OnceLock<Digest>,
    state: Mutex<State>,
}

impl fmt::Debug for BlkHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkHasher")
            .field("spec", &self.spec.to_string())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BlkHasher {
    /// A hasher for a disk of `size` bytes.
    pub fn new(spec: BlkhashSpec, size: u64) -> Self {
        BlkHasher {
            spec,
            size,
            blocks: size.div_ceil(spec.block_size),
            zero_digest: OnceLock::new(),
            state: Mutex::new(State {
                outer: spec.algorithm.hasher(),
                next: 0,
                done: BTreeMap::new(),
                partial: HashMap::new(),
            }),
        }
    }

    fn block_len(&self, index: u64) -> u64 {
        (self.size - index * self.spec.block_size).min(self.spec.block_size)
    }

    fn zero_digest(&self) -> Digest {
        *self.zero_digest.get_or_init(|| {
            self.spec
                .algorithm
                .digest(&vec![0u8; self.spec.block_size as usize])
        })
    }

    /// The digest of a complete block's bytes.
    fn block_digest(&self, data: &[u8]) -> Digest {
        if data.len() as u64 == self.spec.block_size && is_zero(data) {
            self.zero_digest()
        } else {
            self.spec.algorithm.digest(data)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the bytes at `offset` (any alignment, any length within the disk).
    pub fn update(&self, offset: u64, data: &[u8]) {
        self.add(offset, data.len() as u64, Some(data));
    }

    /// Adds `length` bytes at `offset` that read as zeros, without any buffer.
    pub fn zeroes(&self, offset: u64, length: u64) {
        self.add(offset, length, None);
    }

    fn add(&self, offset: u64, length: u64, data: Option<&[u8]>) {
        let end = (offset + length).min(self.size);
        if offset >= end {
            return;
        }
        let bs = self.spec.block_size;
        let mut pos = offset;
        // Whole blocks of this piece, hashed here, outside the lock.
        let mut whole: Option<(u64, Done)> = None;
        let mut edges: Vec<(u64, u64, u64)> = Vec::new(); // (block, start within, piece offset)
        while pos < end {
            let index = pos / bs;
            let block_start = index * bs;
            let block_end = block_start + self.block_len(index);
            let stop = block_end.min(end);
            // A zero piece counts whole blocks only when they are full-sized (a short last
            // block has its own digest, computed from its buffer below).
            let whole_block = pos == block_start
                && stop == block_end
                && (data.is_some() || block_end - block_start == bs);
            if whole_block {
                let entry = whole.get_or_insert_with(|| {
                    let done = if data.is_some() {
                        Done::Digests(Vec::new())
                    } else {
                        Done::Zeros(0)
                    };
                    (index, done)
                });
                match (&mut entry.1, data) {
                    (Done::Digests(list), Some(bytes)) => {
                        let from = (pos - offset) as usize;
                        let to = (stop - offset) as usize;
                        list.push(self.block_digest(&bytes[from..to]));
                    }
                    (Done::Zeros(n), _) => *n += 1,
                    (Done::Digests(_), None) => unreachable!("zero pieces count blocks"),
                }
            } else {
                edges.push((index, pos - block_start, pos - offset));
            }
            pos = stop;
        }
        // Edge blocks: fill their buffers under the lock, hash the completed ones outside it.
        let mut completed: Vec<(u64, Box<[u8]>)> = Vec::new();
        let mut state = self.lock();
        if let Some((first, done)) = whole.take() {
            state.done.insert(first, done);
        }
        for (index, within, at) in edges {
            let block_len = self.block_len(index);
            let n = (block_len - within).min(end - (index * bs + within));
            let partial = state.partial.entry(index).or_insert_with(|| Partial {
                buf: vec![0u8; block_len as usize].into_boxed_slice(),
                filled: 0,
            });
            if let Some(bytes) = data {
                partial.buf[within as usize..(within + n) as usize]
                    .copy_from_slice(&bytes[at as usize..(at + n) as usize]);
            }
            partial.filled += n;
            if partial.filled >= block_len {
                if let Some(p) = state.partial.remove(&index) {
                    completed.push((index, p.buf));
                }
            }
        }
        if completed.is_empty() {
            self.fold(&mut state);
            return;
        }
        drop(state);
        let digests: Vec<(u64, Digest)> = completed
            .iter()
            .map(|(index, buf)| (*index, self.block_digest(buf)))
            .collect();
        let mut state = self.lock();
        for (index, digest) in digests {
            state.done.insert(index, Done::Digests(vec![digest]));
        }
        self.fold(&mut state);
    }

    /// Folds the finished blocks that follow the last folded one into the outer hash.
    fn fold(&self, state: &mut State) {
        while let Some(done) = state.done.remove(&state.next) {
            match done {
                Done::Digests(list) => {
                    for d in &list {
                        state.outer.update(d.as_bytes());
                    }
                    state.next += list.len() as u64;
                }
                Done::Zeros(n) => {
                    let zero = self.zero_digest();
                    for _ in 0..n {
                        state.outer.update(zero.as_bytes());
                    }
                    state.next += n;
                }
            }
        }
    }

    /// The hash, once every byte of the disk was given; an error names the first missing block.
    pub fn finish(self) -> Result<Blkhash> {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        if state.next != self.blocks {
            return Err(Error::Protocol(format!(
                "block hash incomplete: nothing for the block at offset {}",
                state.next * self.spec.block_size
            )));
        }
        let mut outer = state.outer;
        outer.update(&self.size.to_le_bytes());
        Ok(Blkhash {
            spec: self.spec,
            size: self.size,
            digest: outer.finish(),
        })
    }
}

/// The block hash of all of `disk`: reads it with the [`copy`] engine into a sink, on
/// [`CopyOptions::threads`](crate::copy::CopyOptions::threads) threads, skipping what its
/// extents say reads as zeros (what `nbdcopy --blkhash … null:` does). `progress` is called
/// as reads complete.
pub fn checksum(
    disk: &dyn Disk,
    spec: BlkhashSpec,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> std::result::Result<Blkhash, CopyError> {
    let size = disk
        .info()
        .map_err(|error| CopyError {
            error,
            report: Box::default(),
        })?
        .capacity;
    let options = options
        .clone()
        .blkhash(Some(spec))
        .destination_is_zero(true)
        .flush(false);
    let report = copy(disk, &NullDisk::new(size), &options, progress)?;
    Ok(report
        .blkhash
        .expect("a copy asked for a block hash returns one"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryDisk;
    use proptest::prelude::*;

    fn blkhash_of(data: &[u8], spec: &str) -> String {
        let disk = MemoryDisk::with_data(data);
        checksum(
            &disk,
            spec.parse().unwrap(),
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap()
        .hex()
    }

    /// The known answers of libnbd's `copy/copy-blkhash-known.sh`.
    #[test]
    fn known_answers_of_nbdcopy() {
        let hello = b"hello";
        let pattern = b"12345678".repeat(512 * 256);
        for (data, spec, expected) in [
            (&b""[..], "sha256", "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
            (hello, "md5", "f741ac9ce55f5325906bb14e9c05d467"),
            (hello, "sha256", "337355feb53a5309d5aba92796223c2c84ffab930e706c01fef573a2722545e6"),
            (hello, "sha512", "eca04a593cf12ec4132993da709048e25a2f1be3526e132fb521ec9d41f023ec4018b3fd07b014a33e36bb5fa145b36991f431e62f9e1a93bebea6c9565682c1"),
            (hello, "md5/4", "8262896de34125dec173722c920e8bd0"),
            (&pattern, "md5", "84fc21ac2f49ac283ff399378d834d1a"),
            (&pattern, "sha256", "cbb388edd25e567b85f504c7b345497f9fb4f6bbf4e39768809184b9f9e678f8"),
            // From nbdcopy 1.24.4 itself (`--blkhash=sha1/4k` of the same five bytes).
            (hello, "sha1/4k", "f0f5e800dd7bbde1ee7e30706ef5e3b36a0a97b0"),
        ] {
            assert_eq!(blkhash_of(data, spec), expected, "{spec} of {} bytes", data.len());
        }
    }

    #[test]
    fn specs_parse_and_print_as_nbdcopy_takes_them() {
        assert_eq!(BlkhashSpec::default().to_string(), "sha256/64k");
        let s: BlkhashSpec = "SHA512/1M".parse().unwrap();
        assert_eq!(
            (s.algorithm, s.block_size),
            (BlkhashAlgorithm::Sha512, 1 << 20)
        );
        assert_eq!("md5/4".parse::<BlkhashSpec>().unwrap().to_string(), "md5/4");
        assert_eq!(
            "sha1/2G".parse::<BlkhashSpec>().unwrap().to_string(),
            "sha1/2G"
        );
        for bad in [
            "sha224",
            "sha256/3",
            "sha256/0",
            "sha256/4G",
            "sha256/",
            "md5/64k/2",
        ] {
            assert!(bad.parse::<BlkhashSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serialises_as_hex() {
        let disk = MemoryDisk::with_data(b"hello");
        let h = checksum(
            &disk,
            BlkhashSpec::default(),
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(
            json,
            r#"{"algorithm":"sha256","block_size":65536,"size":5,"digest":"337355feb53a5309d5aba92796223c2c84ffab930e706c01fef573a2722545e6"}"#
        );
        assert_eq!(serde_json::from_str::<Blkhash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<Blkhash>(&json.replace("33735", "3373")).is_err());
    }

    #[test]
    fn missing_pieces_are_an_error() {
        let h = BlkHasher::new("md5/4".parse().unwrap(), 10);
        h.update(0, b"abcd");
        h.update(8, b"ij");
        assert!(h.finish().unwrap_err().to_string().contains("offset 4"));
    }

    /// The reference: straight from the definition.
    fn reference(data: &[u8], spec: BlkhashSpec) -> String {
        let mut outer = spec.algorithm.hasher();
        for block in data.chunks(spec.block_size as usize) {
            outer.update(spec.algorithm.digest(block).as_bytes());
        }
        outer.update(&(data.len() as u64).to_le_bytes());
        outer
            .finish()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    proptest! {
        #[test]
        fn pieces_in_any_order_give_the_reference(
            size in 0usize..40_000,
            cuts in proptest::collection::vec(0usize..40_000, 0..12),
            zero_pieces in proptest::collection::vec(any::<bool>(), 12),
            order in proptest::collection::vec(any::<u32>(), 13),
            islands in proptest::collection::vec((0usize..40_000, 1usize..3000), 0..4),
            alg in 0usize..4,
            shift in 0u32..14,
        ) {
            let mut data = vec![0u8; size];
            for (at, len) in islands {
                let stop = (at + len).min(size);
                for (i, byte) in data.iter_mut().enumerate().take(stop).skip(at) {
                    *byte = (i % 251) as u8 | 1;
                }
            }
            let algorithm = [BlkhashAlgorithm::Md5, BlkhashAlgorithm::Sha1, BlkhashAlgorithm::Sha256, BlkhashAlgorithm::Sha512][alg];
            let spec = BlkhashSpec::new(algorithm, 1 << shift).unwrap();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (size + 1)).collect();
            bounds.push(0);
            bounds.push(size);
            bounds.sort_unstable();
            bounds.dedup();
            let mut pieces: Vec<(usize, usize, bool)> = bounds
                .windows(2)
                .enumerate()
                .map(|(i, w)| (w[0], w[1], zero_pieces[i % 12] && data[w[0]..w[1]].iter().all(|&b| b == 0)))
                .collect();
            pieces.sort_by_key(|p| order[p.0 % 13] ^ p.0 as u32);
            let hasher = BlkHasher::new(spec, size as u64);
            for (s, t, zero) in pieces {
                if zero {
                    hasher.zeroes(s as u64, (t - s) as u64);
                } else {
                    hasher.update(s as u64, &data[s..t]);
                }
            }
            prop_assert_eq!(hasher.finish().unwrap().hex(), reference(&data, spec));
        }
    }
}
