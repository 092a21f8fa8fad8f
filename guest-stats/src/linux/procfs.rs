//! Pure parsers for the kernel text files the Linux backend reads. Each takes the file's
//! contents and returns what it found or a message saying what was wrong; the caller adds the
//! path.

use std::collections::BTreeMap;

/// The aggregate `cpu` line of `/proc/stat`, in USER_HZ ticks, plus `btime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ProcStat {
    /// user + nice + system + irq + softirq (guest time is already inside user and nice).
    pub busy_ticks: u64,
    /// The `steal` column, absent on kernels older than 2.6.11.
    pub steal_ticks: Option<u64>,
    /// Boot time in seconds since the epoch.
    pub btime: Option<u64>,
}

pub(crate) fn parse_proc_stat(text: &str) -> Result<ProcStat, String> {
    let mut result = ProcStat::default();
    let mut seen_cpu = false;
    for (index, line) in text.lines().enumerate() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                let values = fields
                    .map(|field| {
                        field.parse::<u64>().map_err(|_| {
                            format!("line {}: `{field}` is not a tick count", index + 1)
                        })
                    })
                    .collect::<Result<Vec<u64>, String>>()?;
                if values.len() < 4 {
                    return Err(format!(
                        "line {}: the cpu line has {} columns, at least 4 expected",
                        index + 1,
                        values.len()
                    ));
                }
                let column = |n: usize| values.get(n).copied().unwrap_or(0);
                // user, nice, system, (idle), (iowait), irq, softirq
                result.busy_ticks = [0, 1, 2, 5, 6]
                    .iter()
                    .try_fold(0u64, |sum, &n| sum.checked_add(column(n)))
                    .ok_or_else(|| format!("line {}: tick counts overflow", index + 1))?;
                result.steal_ticks = values.get(7).copied();
                seen_cpu = true;
            }
            Some("btime") => {
                let value = fields.next().unwrap_or_default();
                result.btime =
                    Some(value.parse().map_err(|_| {
                        format!("line {}: btime `{value}` is not a number", index + 1)
                    })?);
            }
            _ => {}
        }
    }
    if seen_cpu {
        Ok(result)
    } else {
        Err("no aggregate `cpu` line".to_owned())
    }
}

/// Seconds since boot (first field of `/proc/uptime`) in milliseconds.
pub(crate) fn parse_uptime_ms(text: &str) -> Result<u64, String> {
    let first = text
        .split_ascii_whitespace()
        .next()
        .ok_or_else(|| "empty file".to_owned())?;
    let (seconds, fraction) = first.split_once('.').unwrap_or((first, ""));
    let bad = || format!("`{first}` is not a number of seconds");
    if seconds.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let seconds: u64 = seconds.parse().map_err(|_| bad())?;
    // Keep only millisecond precision: pad or cut the fraction to three digits.
    let millis: u64 = format!("{fraction:0<3}")[..3].parse().map_err(|_| bad())?;
    seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(millis))
        .ok_or_else(bad)
}

/// What the backend needs from `/proc/meminfo`, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct MemInfo {
    /// `Active`: the kernel's working-set estimate.
    pub active_kb: Option<u64>,
    /// `Balloon` (kernels since 6.x print the size of the virtio or VMware balloon here).
    pub balloon_kb: Option<u64>,
}

/// The `Active` and `Balloon` lines of `/proc/meminfo`. Every line is still checked (a key,
/// a number, `kB` or no unit), so a damaged file is an error, but nothing is allocated.
pub(crate) fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let mut result = MemInfo::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (key, rest) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: no `:` in `{line}`", index + 1))?;
        let mut fields = rest.split_ascii_whitespace();
        let value = fields.next().unwrap_or_default();
        let value: u64 = value
            .parse()
            .map_err(|_| format!("line {}: `{value}` is not a number", index + 1))?;
        match fields.next() {
            None | Some("kB") => {}
            Some(unit) => return Err(format!("line {}: unknown unit `{unit}`", index + 1)),
        }
        match key {
            "Active" => result.active_kb = Some(value),
            "Balloon" => result.balloon_kb = Some(value),
            _ => {}
        }
    }
    Ok(result)
}

/// The balloon counters of `/proc/vmstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct VmStat {
    /// `nr_balloon_pages` (kernels 5.x that count balloon pages as a zone stat).
    pub balloon_pages: Option<u64>,
    /// `balloon_inflate`: pages ever put into a balloon-compaction balloon.
    pub balloon_inflate: Option<u64>,
    /// `balloon_deflate`: pages ever taken out of it.
    pub balloon_deflate: Option<u64>,
}

/// The balloon counters of `/proc/vmstat`. Every line is checked as `name value`, without
/// allocating.
pub(crate) fn parse_vmstat(text: &str) -> Result<VmStat, String> {
    let mut result = VmStat::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
            return Err(format!("line {}: expected `name value`", index + 1));
        };
        // Some counters are signed in the kernel and a transient negative value is possible;
        // such a counter is skipped rather than failing the whole file.
        let value = match value.parse::<u64>() {
            Ok(value) => value,
            Err(_) if value.parse::<i64>().is_ok() => continue,
            Err(_) => return Err(format!("line {}: `{value}` is not a number", index + 1)),
        };
        match name {
            "nr_balloon_pages" => result.balloon_pages = Some(value),
            "balloon_inflate" => result.balloon_inflate = Some(value),
            "balloon_deflate" => result.balloon_deflate = Some(value),
            _ => {}
        }
    }
    Ok(result)
}

/// The first `cpu MHz` of `/proc/cpuinfo`, rounded to whole MHz (x86 only; other
/// architectures do not print it).
pub(crate) fn parse_cpuinfo_mhz(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = value.trim().parse().ok()?;
        (mhz.is_finite() && mhz > 0.0 && mhz < 1.0e6).then(|| mhz.round() as u64)
    })
}

/// A 128-bit boot id (`/proc/sys/kernel/random/boot_id`, a UUID) folded to 64 bits, never 0.
pub(crate) fn parse_boot_id(text: &str) -> Result<u64, String> {
    let hex: String = text.trim().chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{}` is not a UUID", text.trim()));
    }
    let value = u128::from_str_radix(&hex, 16).map_err(|error| error.to_string())?;
    let folded = (value >> 64) as u64 ^ value as u64;
    Ok(if folded == 0 { 1 } else { folded })
}

/// One decimal number in a sysfs/cgroupfs file.
pub(crate) fn parse_number(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    trimmed
        .parse()
        .map_err(|_| format!("`{trimmed}` is not a number"))
}

/// The entries of the auxiliary vector (`/proc/self/auxv`): native-endian `usize` pairs.
pub(crate) fn parse_auxv(bytes: &[u8]) -> BTreeMap<u64, u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    let mut map = BTreeMap::new();
    for pair in bytes.chunks_exact(2 * WORD) {
        let word = |chunk: &[u8]| {
            let mut buffer = [0u8; WORD];
            buffer.copy_from_slice(chunk);
            usize::from_ne_bytes(buffer) as u64
        };
        let (key, value) = (word(&pair[..WORD]), word(&pair[WORD..]));
        if key == 0 {
            break;
        }
        map.insert(key, value);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn proc_stat_sums_busy_columns_and_reads_steal() {
        let text = "cpu  10 1 5 100 7 2 3 4 9 0\ncpu0 10 1 5 100 7 2 3 4 9 0\nbtime 1700000000\n";
        let stat = parse_proc_stat(text).unwrap();
        assert_eq!(stat.busy_ticks, 10 + 1 + 5 + 2 + 3);
        assert_eq!(stat.steal_ticks, Some(4));
        assert_eq!(stat.btime, Some(1_700_000_000));
        // A 2.6.0-era line without steal.
        let old = parse_proc_stat("cpu 1 2 3 4\n").unwrap();
        assert_eq!(old.steal_ticks, None);
        assert!(parse_proc_stat("cpu0 1 2 3 4\n").is_err());
        assert!(parse_proc_stat("cpu 1 x 3 4\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(parse_proc_stat("cpu 1 2\n").is_err());
    }

    #[test]
    fn uptime_keeps_milliseconds() {
        assert_eq!(parse_uptime_ms("363.33 609.49\n").unwrap(), 363_330);
        assert_eq!(parse_uptime_ms("5 1\n").unwrap(), 5_000);
        assert_eq!(parse_uptime_ms("1.23456 0").unwrap(), 1_234);
        assert!(parse_uptime_ms("").is_err());
        assert!(parse_uptime_ms("-1.0 0").is_err());
        assert!(parse_uptime_ms(".5 0").is_err());
        assert!(parse_uptime_ms("99999999999999999999.0 0").is_err());
    }

    #[test]
    fn meminfo_and_vmstat() {
        let meminfo = parse_meminfo(
            "MemTotal:  1024 kB\nActive:     512 kB\nActive(anon): 9 kB\nHugePages_Total:   0\n",
        )
        .unwrap();
        assert_eq!(meminfo.active_kb, Some(512));
        assert_eq!(meminfo.balloon_kb, None);
        let meminfo = parse_meminfo("Balloon:  2048 kB\n").unwrap();
        assert_eq!(meminfo.balloon_kb, Some(2048));
        assert!(parse_meminfo("MemTotal 1024 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 1024 MB\n").is_err());
        // A damaged line fails the file even when it is not one the backend uses.
        assert!(parse_meminfo("Active: 1 kB\nSlab: lots kB\n").is_err());
        let vmstat =
            parse_vmstat("balloon_inflate 7\nnr_weird -3\nballoon_deflate 2\nnr_balloon_pages 5\n")
                .unwrap();
        assert_eq!(vmstat.balloon_inflate, Some(7));
        assert_eq!(vmstat.balloon_deflate, Some(2));
        assert_eq!(vmstat.balloon_pages, Some(5));
        assert_eq!(
            parse_vmstat("nr_balloon_pages -3\n").unwrap().balloon_pages,
            None
        );
        assert!(parse_vmstat("balloon_inflate seven\n").is_err());
        assert!(parse_vmstat("nr_free_pages 1\nlonely\n").is_err());
    }

    #[test]
    fn cpuinfo_boot_id_auxv() {
        assert_eq!(
            parse_cpuinfo_mhz("model name\t: X\ncpu MHz\t\t: 2596.128\n"),
            Some(2596)
        );
        assert_eq!(parse_cpuinfo_mhz("cpu MHz : NaN\n"), None);
        assert_eq!(parse_cpuinfo_mhz("BogoMIPS : 50.00\n"), None);
        let id = parse_boot_id("90dcb52c-27a6-4d94-88de-0bba2c0e4be9\n").unwrap();
        assert_eq!(id, 0x90dc_b52c_27a6_4d94 ^ 0x88de_0bba_2c0e_4be9);
        assert_eq!(
            parse_boot_id("00000000-0000-0000-0000-000000000000").unwrap(),
            1
        );
        assert!(parse_boot_id("not-a-uuid").is_err());
        let mut auxv = Vec::new();
        for (key, value) in [(6usize, 4096usize), (17, 100), (0, 0)] {
            auxv.extend_from_slice(&key.to_ne_bytes());
            auxv.extend_from_slice(&value.to_ne_bytes());
        }
        let map = parse_auxv(&auxv);
        assert_eq!(map.get(&17), Some(&100));
        assert_eq!(map.get(&6), Some(&4096));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC*") {
            let _ = parse_proc_stat(&text);
            let _ = parse_uptime_ms(&text);
            let _ = parse_meminfo(&text);
            let _ = parse_vmstat(&text);
            let _ = parse_cpuinfo_mhz(&text);
            let _ = parse_boot_id(&text);
            let _ = parse_number(&text);
        }

        #[test]
        fn structured_garbage_never_panics(
            lines in proptest::collection::vec(
                ("(cpu|btime|MemTotal:|Balloon:|cpu MHz\t:|x)", proptest::collection::vec("[0-9a-z.:-]{0,24}", 0..12)),
                0..8,
            )
        ) {
            let text: String = lines
                .iter()
                .map(|(key, fields)| format!("{key} {}\n", fields.join(" ")))
                .collect();
            let _ = parse_proc_stat(&text);
            let _ = parse_meminfo(&text);
            let _ = parse_vmstat(&text);
            let _ = parse_cpuinfo_mhz(&text);
        }

        #[test]
        fn auxv_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_auxv(&bytes);
        }

        #[test]
        fn uptime_round_trips(ms in 0u64..=u64::MAX / 1_000) {
            let text = format!("{}.{:03} 0.00\n", ms / 1_000, ms % 1_000);
            prop_assert_eq!(parse_uptime_ms(&text).unwrap(), ms);
        }
    }
}
