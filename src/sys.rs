//! Facts about this machine and process that nodes report and benchmarks print.

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if
/// known, leaving out [`read_bandwidth`]'s buffer.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmHWM:").map(|b| b.max(PEAK_BEFORE_PROBE.load(std::sync::atomic::Ordering::Relaxed)))
}

/// The peak before the last bandwidth probe, whose buffer is the probe's,
/// not memory the process needs: the probe resets the kernel's high-water
/// mark after it, and this keeps what came before.
static PEAK_BEFORE_PROBE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Current resident set size in bytes (Linux `VmRSS`), if known.
pub fn rss_bytes() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmRSS:")
}

/// Bytes of this process's memory in transparent huge pages (Linux
/// `AnonHugePages`): where the kernel's THP setting is "never", none of the
/// weights are (`kernels::arena`), and decode is slower.
pub fn huge_page_bytes() -> Option<u64> {
    proc_bytes("/proc/self/smaps_rollup", "AnonHugePages:")
}

/// (total, available) memory of the machine in bytes (Linux `/proc/meminfo`).
pub fn memory_bytes() -> Option<(u64, u64)> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some((kb_field(&info, "MemTotal:")?, kb_field(&info, "MemAvailable:")?))
}

/// A `KEY: N kB` line of a `/proc` file, in bytes.
fn proc_bytes(path: &str, key: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string(path).ok()?, key)
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The cores this process may use: the CPUs it may run on, and no more
/// than its cgroup's CPU quota, rounded up. (`available_parallelism` reads
/// the quota of cgroup v2 alone; on a host with both hierarchies, the v1
/// `cpu` controller's quota is the one that holds, as in many containers.)
/// A compute thread beyond the quota only spins the quota away.
pub fn cpu_cores() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    own_cpu_quota().map_or(cpus, |(q, _)| cpus.min(q.ceil().max(1.0) as usize))
}

/// This process's tightest CPU quota, and its cgroup.
fn own_cpu_quota() -> Option<(f64, String)> {
    cgroup_cpu_quota(
        &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        |p| std::fs::read_to_string(p).ok(),
    )
}

/// Which cores this process computes on, as a name that processes sharing
/// them report alike: the machine (`/etc/machine-id`, else the host name),
/// then for a GPU the device, for the CPU the cgroup whose quota holds the
/// process (processes under different quotas cannot take each other's CPU
/// time) and the CPUs it may run on. Two stages with the same name cannot
/// compute at once, so a head does not spread sessions to run them at once.
pub fn compute_id(device: &str) -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
    let machine = read("/etc/machine-id").or_else(|| read("/proc/sys/kernel/hostname")).unwrap_or_default();
    if device != "cpu" {
        return format!("{machine}/{device}");
    }
    let quota = own_cpu_quota().map(|(_, cgroup)| cgroup).unwrap_or_default();
    let status = read("/proc/self/status").unwrap_or_default();
    let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or_default().trim();
    format!("{machine}/cpu{cpus}/{quota}")
}

/// The tightest CPU quota (in cores) of the cgroups in `cgroup` (the text
/// of `/proc/self/cgroup`), found through the mounts in `mountinfo`: v1's
/// `cpu.cfs_quota_us / cpu.cfs_period_us`, v2's `cpu.max`; and that cgroup's path.
fn cgroup_cpu_quota(cgroup: &str, mountinfo: &str, read: impl Fn(&std::path::Path) -> Option<String>) -> Option<(f64, String)> {
    let mut tightest: Option<(f64, String)> = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "cpu") {
            continue;
        }
        // The mount of that hierarchy: (its root within the hierarchy, where it is mounted).
        let mount = mountinfo.lines().find_map(|m| {
            let (left, right) = m.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let options = r.nth(1).unwrap_or_default();
            let ok = if v2 { fstype == "cgroup2" } else { fstype == "cgroup" && options.split(',').any(|o| o == "cpu") };
            ok.then(|| (fields.get(3).copied().unwrap_or("/"), fields.get(4).copied().unwrap_or_default()))
        });
        let Some((root, point)) = mount else { continue };
        let relative = path.strip_prefix(root).unwrap_or(path).trim_start_matches('/');
        let dir = std::path::Path::new(point).join(relative);
        let cores = if v2 {
            read(&dir.join("cpu.max")).and_then(|t| {
                let mut f = t.split_whitespace();
                let (q, p) = (f.next()?.parse::<f64>().ok()?, f.next()?.parse::<f64>().ok()?);
                Some(q / p)
            })
        } else {
            let quota = read(&dir.join("cpu.cfs_quota_us"))?.trim().parse::<f64>().ok().filter(|q| *q > 0.0);
            let period = read(&dir.join("cpu.cfs_period_us")).and_then(|t| t.trim().parse::<f64>().ok()).filter(|p| *p > 0.0);
            quota.zip(period).map(|(q, p)| q / p)
        };
        if let Some(c) = cores.filter(|c| *c > 0.0) {
            if tightest.as_ref().is_none_or(|(t, _)| c < *t) {
                tightest = Some((c, path.to_string()));
            }
        }
    }
    tightest
}

/// Returns the heap's free pages to the system. A load's temporaries (a
/// 262k-entry vocabulary's tables, tensors read for conversion) leave holes
/// in the heap that its weights, kept in their own mappings
/// (`kernels::arena`), no longer fill: without this they stay resident.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: glibc's own heap maintenance; no memory in use is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes per second the compute pool's threads read from memory together:
/// the ceiling of a batch-of-one decode step, which streams every weight once
/// and does little arithmetic per byte. Streams a buffer larger than any
/// cache, each thread its share, best of a few passes.
pub fn read_bandwidth() -> f64 {
    const BYTES: usize = 256 << 20;
    if let Some(peak) = peak_rss_bytes() {
        PEAK_BEFORE_PROBE.fetch_max(peak, std::sync::atomic::Ordering::Relaxed);
    }
    // Ones, not zeros: a zeroed allocation can map every page to one shared
    // zero page, which would measure the cache instead. In huge pages where
    // the weights are (`kernels::arena`): 4 KiB pages read slower.
    let mut huge = crate::kernels::arena::HugeBuf::zeroed(BYTES);
    let mut words = Vec::new();
    let buf: &mut [u64] = match huge.as_mut() {
        // SAFETY: the buffer's bytes viewed as u64s: 64-byte aligned, BYTES a multiple of 8.
        Some(h) => unsafe { std::slice::from_raw_parts_mut(h.bytes_mut().as_mut_ptr().cast::<u64>(), BYTES / 8) },
        None => {
            words = vec![0u64; BYTES / 8];
            &mut words
        }
    };
    buf.fill(1);
    let buf = &*buf;
    let pool = crate::kernels::pool();
    let share = buf.len().div_ceil(pool.threads());
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = std::time::Instant::now();
        pool.run(&|i| {
            let part = &buf[(i * share).min(buf.len())..((i + 1) * share).min(buf.len())];
            std::hint::black_box(stream_sum(part));
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    drop((huge, words));
    // "5" resets VmHWM to the current RSS (Linux ≥ 4.0). Where that fails the
    // peak keeps the buffer: too high, never too low.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    BYTES as f64 / best
}

/// A sum the loads cannot skip, in eight independent lanes so the loop waits
/// on memory rather than on a chain of adds.
fn stream_sum(x: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in x.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(0, |s, a| s.wrapping_add(*a))
}

/// Sets the size of candle's CPU thread pool and of our kernels' pool; call
/// before any tensor work.
pub fn set_threads(n: usize) {
    crate::kernels::set_threads(n);
    if n > 0 {
        // Safe in edition 2021: called once at start-up, before any thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// A link's rate as people write it: `940 Mbit/s`, `2.4 Gbit/s`.
pub fn human_rate(bits_per_sec: f64) -> String {
    if bits_per_sec >= 1e9 {
        format!("{:.1} Gbit/s", bits_per_sec / 1e9)
    } else {
        format!("{:.0} Mbit/s", bits_per_sec / 1e6)
    }
}

/// Formats bytes the way people read them.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a size such as `200MB`, `24GB`, `1.5GiB` or `4096` (bytes).
/// Decimal units are powers of 1000, binary ones (`KiB`, `MiB`, `GiB`) of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (try 200MB or 24GB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    Ok((value * mult).round() as u64)
}

/// SIGINT or SIGTERM, heard from the moment this returns: the handlers are
/// installed here, not on the future's first poll, so a caller that installs
/// them before it says it is ready (prints its address) cannot be killed by
/// a stop signal sent in between. Needs a tokio runtime with signals enabled.
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hybrid layout seen on this project's machines (v1 `cpu` beside an
    /// empty v2 root), a container's nested mount, and pure v2.
    #[test]
    fn cpu_quotas_are_read_from_either_cgroup_hierarchy() {
        let files = |pairs: &'static [(&'static str, &'static str)]| {
            move |p: &std::path::Path| pairs.iter().find(|(k, _)| std::path::Path::new(k) == p).map(|(_, v)| v.to_string())
        };
        let hybrid_cg = "4:memory:/x\n1:cpu:/lab-h1\n0::/\n";
        let hybrid_mi = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                         40 31 0:40 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let read = files(&[
            ("/sys/fs/cgroup/cpu/lab-h1/cpu.cfs_quota_us", "60000\n"),
            ("/sys/fs/cgroup/cpu/lab-h1/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(cgroup_cpu_quota(hybrid_cg, hybrid_mi, read), Some((0.6, "/lab-h1".into())));
        // No quota (-1): none.
        let read =
            files(&[("/sys/fs/cgroup/cpu/lab-h1/cpu.cfs_quota_us", "-1\n"), ("/sys/fs/cgroup/cpu/lab-h1/cpu.cfs_period_us", "100000\n")]);
        assert_eq!(cgroup_cpu_quota(hybrid_cg, hybrid_mi, read), None);
        // A container sees its own cgroup as the mount's root.
        let nested_mi = "32 31 0:29 /kubepods/pod1 /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpuacct,cpu\n";
        let read =
            files(&[("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000"), ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000")]);
        assert_eq!(cgroup_cpu_quota("3:cpuacct,cpu:/kubepods/pod1\n", nested_mi, read).map(|q| q.0), Some(1.5));
        let v2_mi = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_cpu_quota("0::/app\n", v2_mi, files(&[("/sys/fs/cgroup/app/cpu.max", "250000 100000\n")])).map(|q| q.0),
            Some(2.5)
        );
        assert_eq!(cgroup_cpu_quota("0::/app\n", v2_mi, files(&[("/sys/fs/cgroup/app/cpu.max", "max 100000\n")])), None);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("200MB"), Ok(200_000_000));
        assert_eq!(parse_size("48GB"), Ok(48_000_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(1_610_612_736));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    /// The probe's 256 MiB buffer is the probe's: the reported peak must not
    /// grow by it (other tests running beside this one allocate far less).
    #[test]
    fn bandwidth_probe_leaves_the_peak_rss_alone() {
        let Some(before) = peak_rss_bytes() else { return };
        let bandwidth = read_bandwidth();
        assert!(bandwidth.is_finite() && bandwidth > 0.0, "{bandwidth}");
        let after = peak_rss_bytes().unwrap();
        assert!(after < before + (128 << 20), "peak RSS {before} -> {after} bytes");
    }
}
