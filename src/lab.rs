//! A network lab on one machine: hosts in network namespaces of their own,
//! each with an address on one bridge (in a hub namespace), so traffic
//! between them crosses real interfaces. Each host's link has a bandwidth
//! cap (`tc tbf`, both directions) and a delay: QUIC is UDP, and the kernel
//! here has no `netem`, so a relay of our own ([`relay`]) in front of each
//! node's port holds every datagram for half the round trip each way (with
//! optional jitter and loss). A host's processes can be held to a share of
//! a core (a cgroup CPU quota), so hosts behave like separate small
//! machines instead of sharing every core.
//!
//! The lab's addresses exist only inside the namespaces it creates: the
//! root namespace gets no interface on the bridge and no route into it.
//! Everything is torn down on drop (processes, namespaces, cgroups).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The bridge's subnet (inside the lab's namespaces only).
const SUBNET: [u8; 3] = [10, 213, 0];
/// Where a node listens on its host's address, and the relay in front of it.
pub const NODE_PORT: u16 = 7000;
pub const RELAY_PORT: u16 = 7001;

/// What every host's link to the bridge is like.
#[derive(Debug, Clone, Default)]
pub struct LinkSpec {
    /// A `tc` rate (`"100mbit"`, `"1gbit"`), each direction; None: uncapped.
    pub rate: Option<String>,
    /// The round trip the relay adds to each path into a host.
    pub rtt: Duration,
    /// Each direction's delay varies uniformly by up to this much.
    pub jitter: Duration,
    /// Each datagram is dropped with this probability, each direction.
    pub loss: f64,
}

impl LinkSpec {
    /// As a node reports it (`sollol node --link`): "lab: 100mbit, 5 ms RTT ±1 ms, 0.1% loss".
    pub fn describe(&self) -> String {
        let mut s = format!("lab: {}, {} ms RTT", self.rate.as_deref().unwrap_or("uncapped"), self.rtt.as_secs_f64() * 1e3);
        if !self.jitter.is_zero() {
            s += &format!(" ±{} ms", self.jitter.as_secs_f64() * 1e3);
        }
        if self.loss > 0.0 {
            s += &format!(", {}% loss", self.loss * 100.0);
        }
        s
    }

    /// `rate` in bits per second, when capped.
    pub fn bits_per_sec(&self) -> Option<f64> {
        rate_bits_per_sec(self.rate.as_deref()?)
    }
}

/// A `tc` rate (`100mbit`, `1gbit`) in bits per second.
pub fn rate_bits_per_sec(rate: &str) -> Option<f64> {
    let r = rate.to_ascii_lowercase();
    let (num, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, scale)| r.strip_suffix(unit).map(|n| (n.to_string(), *scale)))?;
    num.trim().parse::<f64>().ok().map(|n| n * scale)
}

/// A host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Its link to the bridge: the rate caps both ways on it, the relay in
    /// front of its node adds the round trip to every path into the node.
    pub link: LinkSpec,
    /// Its cgroup and the cores it allows, when its CPU is capped.
    cgroup: Option<(PathBuf, f64)>,
}

impl Host {
    /// Where its node is reached from the other hosts: the relay in front of it.
    pub fn node_addr(&self) -> String {
        SocketAddr::from((self.addr, RELAY_PORT)).to_string()
    }
}

pub struct Lab {
    id: String,
    hub: String,
    pub hosts: Vec<Host>,
    /// The `sollol` binary the lab runs its relays with.
    sollol: PathBuf,
    children: Mutex<Vec<Child>>,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| Error::Lab(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Lab(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Why no lab can be made here, if none can (not root, no `ip`, no namespaces).
pub fn unavailable() -> Option<String> {
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("sollol-probe-{}-{n}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            Command::new("tc").arg("-V").output().err().map(|e| format!("no tc: {e}"))
        }
        Err(e) => Some(format!("network namespaces cannot be made here ({e})")),
    }
}

impl Lab {
    /// Builds `hosts` hosts on one bridge, each link as `link`, each host's
    /// processes capped to `cpu` cores (None: uncapped). The relays are the
    /// `sollol` binary at `sollol`'s.
    pub fn up(hosts: usize, link: LinkSpec, cpu: Option<f64>, sollol: &Path) -> Result<Self> {
        Self::up_with(vec![link; hosts], cpu, sollol)
    }

    /// [`Lab::up`] with a link of its own for each host.
    pub fn up_with(links: Vec<LinkSpec>, cpu: Option<f64>, sollol: &Path) -> Result<Self> {
        let hosts = links.len();
        if hosts == 0 || hosts > 200 {
            return Err(Error::InvalidRequest(format!("a lab has 1 to 200 hosts, not {hosts}")));
        }
        // Short enough for interface names (15 characters), unique per
        // process and per lab in it (tests build labs at once).
        static LABS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let id = format!("sl{}x{n}", std::process::id() % 100_000);
        let hub = format!("sollol-{id}-hub");
        let mut lab =
            Lab { id: id.clone(), hub: hub.clone(), hosts: Vec::new(), sollol: sollol.to_path_buf(), children: Mutex::new(Vec::new()) };
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, link) in links.into_iter().enumerate() {
            let netns = format!("sollol-{id}-h{}", i + 1);
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 10 + i as u8);
            ip(&["netns", "add", &netns])?;
            lab.hosts.push(Host { netns: netns.clone(), addr, link, cgroup: None });
            let (inside, outside) = (format!("{id}h{}", i + 1), format!("{id}b{}", i + 1));
            ip(&["link", "add", &inside, "netns", &netns, "type", "veth", "peer", "name", &outside, "netns", &hub])?;
            ip(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", &inside])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "link", "set", &inside, "up"])?;
            ip(&["-n", &hub, "link", "set", &outside, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &outside, "up"])?;
            if let Some(rate) = &lab.hosts[i].link.rate {
                // Each direction: out of the host, and out of the bridge toward it.
                for (ns, dev) in [(&netns, &inside), (&hub, &outside)] {
                    run(Command::new("tc")
                        .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "200ms"]))?;
                }
            }
            if let Some(cores) = cpu {
                lab.hosts[i].cgroup = Some((cpu_cgroup(&format!("sollol-{id}-h{}", i + 1), cores)?, cores));
            }
        }
        Ok(lab)
    }

    /// A command that runs `program` on host `host` (in its namespace; not
    /// in its cgroup: for a head or a client the caller runs itself).
    pub fn exec(&self, host: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host].netns]).arg(program);
        c
    }

    /// Runs `cmd` on host `host` (inside its namespace and cgroup), until
    /// the lab goes down; returns its pid.
    pub fn spawn(&self, host: usize, cmd: &Command) -> Result<u32> {
        self.spawn_in(host, cmd, true)
    }

    /// [`Lab::spawn`], in the host's cgroup or not (a relay is the link's,
    /// not the host's: it does not spend the host's CPU share).
    fn spawn_in(&self, host: usize, cmd: &Command, capped: bool) -> Result<u32> {
        let h = &self.hosts[host];
        let mut wrapped = match h.cgroup.as_ref().filter(|_| capped) {
            // Into the cgroup before the command starts: no instruction of
            // it runs uncapped.
            Some((cg, _)) => {
                let mut sh = Command::new("sh");
                sh.arg("-c").arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#).arg(cg).args(["ip", "netns", "exec", &h.netns]);
                sh.arg(cmd.get_program());
                sh
            }
            None => self.exec(host, cmd.get_program()),
        };
        wrapped.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped.stdin(Stdio::null());
        let child = wrapped.spawn().map_err(|e| Error::Lab(format!("{wrapped:?}: {e}")))?;
        // `sh` and `ip netns exec` exec the command: the pid is the command's.
        let pid = child.id();
        self.children.lock().expect("children lock").push(child);
        Ok(pid)
    }

    /// Starts a node on host `host` with the relay in front of it; returns
    /// its pid and the address the other hosts reach it at. It listens on the
    /// host's address (its connections to the next stage leave from there),
    /// so `args` carry the cluster key.
    pub fn node(&self, host: usize, args: &[&str]) -> Result<(u32, String)> {
        let h = &self.hosts[host];
        let direct = SocketAddr::from((h.addr, NODE_PORT)).to_string();
        let mut node = Command::new(&self.sollol);
        node.args(["node", "--listen", &direct, "--link", &h.link.describe()]).args(args);
        if let Some((_, cores)) = h.cgroup {
            // As many compute threads as the host has cores: more would spin
            // the quota away. (The node cannot see its quota itself: `ip netns
            // exec` mounts a fresh /sys, hiding the cgroup hierarchy.)
            node.args(["--threads", &(cores.ceil().max(1.0) as usize).to_string()]);
            // Nor can it tell that its cores are its own: a head spreads a
            // chain's sessions over capped hosts so they compute at once.
            node.args(["--compute-id", &format!("lab host {}", host + 1)]);
        }
        let pid = self.spawn(host, &node)?;
        let mut relay = Command::new(&self.sollol);
        relay.args(["lab", "relay", "--listen", &h.node_addr(), "--to", &direct]);
        relay.args(["--rtt-us", &h.link.rtt.as_micros().to_string(), "--jitter-us", &h.link.jitter.as_micros().to_string()]);
        relay.args(["--loss", &h.link.loss.to_string()]);
        self.spawn_in(host, &relay, false)?;
        Ok((pid, h.node_addr()))
    }

    /// Waits until the node behind `host`'s relay answers a handshake.
    pub fn wait_node(&self, host: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut probe = Command::new("ip");
            probe.args(["netns", "exec", &self.hosts[host].netns, "ss", "-Hlun", &format!("sport = :{NODE_PORT}")]);
            let out = probe.output().map_err(|e| Error::Lab(e.to_string()))?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Lab(format!("the node on {} did not start", self.hosts[host].netns)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every process the lab started and removes its namespaces and cgroups.
    pub fn down(&mut self) {
        for mut c in self.children.lock().expect("children lock").drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in self.hosts.drain(..) {
            let _ = ip(&["netns", "del", &h.netns]);
            if let Some((cg, _)) = h.cgroup {
                let _ = std::fs::remove_dir(cg);
            }
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Removes the namespaces and cgroups of labs whose process is gone (one
/// killed before it could tear down); returns how many.
pub fn clean() -> usize {
    let alive = |id: &str| {
        id.strip_prefix("sl").and_then(|n| n.split('x').next()?.parse::<u32>().ok()).is_some_and(|pid| {
            // The id is the pid modulo 100000: any live process with that remainder may own it.
            std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
                e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| p % 100_000 == pid)
                    && std::fs::read_to_string(e.path().join("cmdline")).is_ok_and(|c| c.contains("sollol") || c.contains("lab"))
            })
        })
    };
    let lab_of = |name: &str| name.strip_prefix("sollol-").and_then(|r| r.split('-').next()).map(str::to_string);
    let mut removed = 0;
    let namespaces =
        Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    for ns in namespaces.lines().filter_map(|l| l.split_whitespace().next()) {
        if lab_of(ns).is_some_and(|id| id.starts_with("sl") && !alive(&id)) && ip(&["netns", "del", ns]).is_ok() {
            removed += 1;
        }
    }
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu"] {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if lab_of(&name).is_some_and(|id| id.starts_with("sl") && !alive(&id)) && std::fs::remove_dir(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}

/// A cgroup holding its processes to `cores` of CPU time (v2 `cpu.max`,
/// or v1's CFS quota).
fn cpu_cgroup(name: &str, cores: f64) -> Result<PathBuf> {
    const PERIOD: u64 = 100_000;
    let quota = ((cores * PERIOD as f64) as u64).max(1000);
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let io = |p: &Path, e: std::io::Error| Error::Lab(format!("{}: {e}", p.display()));
    if std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu")) {
        let dir = Path::new("/sys/fs/cgroup").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD}")).map_err(|e| io(&dir, e))?;
        return Ok(dir);
    }
    let dir = Path::new("/sys/fs/cgroup/cpu").join(name);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    std::fs::write(dir.join("cpu.cfs_period_us"), PERIOD.to_string()).map_err(|e| io(&dir, e))?;
    std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).map_err(|e| io(&dir, e))?;
    Ok(dir)
}

/// Datagrams a direction holds before it drops more (a router's queue).
const RELAY_QUEUE: usize = 4096;

/// A datagram and when it is due out.
type Held = (Instant, Vec<u8>);

/// Forwards UDP datagrams between the clients of `listen` and `to`, each
/// held `link.rtt / 2` (± jitter) each way and dropped with `link.loss`;
/// one upstream socket per client, so replies find their way back. Stops
/// after `ttl`, so a lab left behind does not run for ever.
///
/// Plain threads, not an async runtime: a timer wheel rounds every delay up
/// to its millisecond tick, which alone added 2-3 ms to each token's hops;
/// a thread sleeping until a datagram is due is within tens of µs.
pub fn relay(listen: SocketAddr, to: SocketAddr, link: LinkSpec, ttl: Duration) -> Result<()> {
    use std::collections::HashMap;
    use std::net::UdpSocket;
    use std::sync::mpsc::{sync_channel, SyncSender};
    use std::sync::Arc;

    let io = |e: std::io::Error| Error::Lab(format!("relay {listen} -> {to}: {e}"));
    let front = Arc::new(UdpSocket::bind(listen).map_err(io)?);
    let end = Instant::now() + ttl;
    front.set_read_timeout(Some(Duration::from_millis(500))).map_err(io)?;
    // One direction: datagrams wait their due time in order, then go out.
    let pipe = |socket: Arc<UdpSocket>, dest: SocketAddr| -> SyncSender<Held> {
        let (tx, rx) = sync_channel::<Held>(RELAY_QUEUE);
        std::thread::spawn(move || {
            while let Ok((due, bytes)) = rx.recv() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let _ = socket.send_to(&bytes, dest);
            }
        });
        tx
    };
    let half = link.rtt / 2;
    let (jitter, loss) = (link.jitter, link.loss);
    // When a datagram is due out (never before the one ahead: a link does
    // not reorder); None when the link loses it.
    let delay = move |last: &mut Instant| -> Option<Instant> {
        if loss > 0.0 && rand::random::<f64>() < loss {
            return None;
        }
        let jitter = jitter.as_secs_f64() * (2.0 * rand::random::<f64>() - 1.0);
        let wait = Duration::from_secs_f64((half.as_secs_f64() + jitter).max(0.0));
        *last = (Instant::now() + wait).max(*last);
        Some(*last)
    };
    // Per client: its way to `to`, and when its last datagram is due.
    let mut clients: HashMap<SocketAddr, (SyncSender<Held>, Instant)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < end {
        let (n, from) = match front.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(io(e)),
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry(from) {
            let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
            let up = Arc::new(UdpSocket::bind(any).map_err(io)?);
            // Replies from `to`, back to this client after their delay.
            let back = pipe(front.clone(), from);
            let reader = up.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut last = Instant::now();
                while let Ok((n, _)) = reader.recv_from(&mut buf) {
                    if let Some(due) = delay(&mut last) {
                        // A full queue drops, as a router's does.
                        if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = back.try_send((due, buf[..n].to_vec())) {
                            return;
                        }
                    }
                }
            });
            slot.insert((pipe(up, to), Instant::now()));
        }
        let (tx, last) = clients.get_mut(&from).expect("just inserted");
        if let Some(due) = delay(last) {
            let _ = tx.try_send((due, buf[..n].to_vec()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a lab node reports as its link (and the dashboard shows).
    #[test]
    fn links_describe_themselves() {
        let fast = LinkSpec { rate: Some("1gbit".into()), rtt: Duration::from_micros(500), ..Default::default() };
        assert_eq!(fast.describe(), "lab: 1gbit, 0.5 ms RTT");
        let lossy = LinkSpec { rate: None, rtt: Duration::from_millis(40), jitter: Duration::from_millis(2), loss: 0.001 };
        assert_eq!(lossy.describe(), "lab: uncapped, 40 ms RTT ±2 ms, 0.1% loss");
    }

    #[test]
    fn rates_parse() {
        let link = |r: &str| LinkSpec { rate: Some(r.into()), ..Default::default() }.bits_per_sec();
        assert_eq!(link("100mbit"), Some(100e6));
        assert_eq!(link("1gbit"), Some(1e9));
        assert_eq!(link("50Mbit"), Some(50e6));
        assert_eq!(link("fast"), None);
    }

    /// Round trips through a relay of `rtt` to an echo server.
    fn round_trips(rtt: Duration) -> Vec<Duration> {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        // Bind first to learn a free port, then relay on it.
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let link = LinkSpec { rtt, ..Default::default() };
        std::thread::spawn(move || relay(port, to, link, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        (0..5)
            .map(|_| {
                let t = Instant::now();
                client.send_to(b"ping", port).unwrap();
                let (n, _) = client.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"ping");
                t.elapsed()
            })
            .collect()
    }

    /// The relay holds each datagram half the round trip each way, and adds
    /// little of its own (no timer tick: sub-millisecond links stay so).
    #[test]
    fn the_relay_adds_its_round_trip_and_little_else() {
        for rtt in round_trips(Duration::from_millis(40)) {
            assert!(rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(200), "{rtt:?}");
        }
        let mut fast = round_trips(Duration::ZERO);
        fast.sort();
        assert!(fast[2] < Duration::from_micros(800), "a relay of no delay takes {:?} (median)", fast[2]);
    }
}
