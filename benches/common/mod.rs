//! Helpers shared by the `c2s` and `fanout` benchmarks (`mod common;` in each).
#![allow(dead_code)]

use memchr::memmem;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub type Result<T> = std::result::Result<T, String>;

/// Timeout for one setup step (connect, negotiate, one reply).
pub const STEP: Duration = Duration::from_secs(30);

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='grid.test' version='1.0'>";

// ---------------------------------------------------------------- process helpers

/// The 1, 5 and 15 minute load averages, for the record of a run.
pub fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Runs `run` for each server in turn and collects the reports. Ctrl-C or
/// SIGTERM drops the running future (which stops its server) and ends the
/// loop; a failed server is reported as `{tool}: {name}: {error}` and the
/// next one runs. Returns the reports and whether any server failed.
pub async fn each_server<'a, R, F, Fut>(tool: &str, servers: &'a [String], mut run: F) -> (Vec<R>, bool)
where
    F: FnMut(&'a str) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    let mut reps = Vec::new();
    let mut failed = false;
    for name in servers {
        let work = run(name);
        let r = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                r = work => r,
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
                _ = term.recv() => Err("terminated".into()),
            },
            Err(e) => Err(format!("cannot watch for SIGTERM: {e}")),
        };
        match r {
            Ok(rep) => reps.push(rep),
            Err(e) => {
                eprintln!("{tool}: {name}: {e}");
                failed = true;
                if e == "interrupted" || e == "terminated" {
                    break;
                }
            }
        }
    }
    (reps, failed)
}

pub fn raise_nofile() -> u64 {
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            return r.rlim_cur;
        }
    }
    0
}

/// Our own CPU time (user + system), seconds.
pub fn self_cpu() -> f64 {
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

/// CPU time (user + system) of a process, seconds.
pub fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

pub fn wait_port(port: u16, within: Duration, alive: impl Fn() -> bool) -> Result<()> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if !alive() {
            return Err(format!("server exited before opening port {port}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("port {port} not open after {within:?}"))
}

/// A fresh directory `$TMPDIR/xg-{bench}-{tag}-{pid}`.
pub fn temp_dir(bench: &str, tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("xg-{bench}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
    Ok(d)
}

/// Reads a peer state file (`KEY=value` lines written with printf %q).
pub fn parse_state(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut m = HashMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            // printf %q: backslash escapes.
            let mut s = String::new();
            let mut chars = v.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        s.push(n);
                    }
                } else {
                    s.push(c);
                }
            }
            m.insert(k.to_string(), s);
        }
    }
    Ok(m)
}

// ---------------------------------------------------------------- XMPP stream reader

/// An XML stream read as bytes: just enough to negotiate and wait for replies.
pub struct Xml<S> {
    pub io: S,
    pub buf: Vec<u8>,
}

pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    memmem::find(h, n)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Xml<S> {
    pub async fn send(&mut self, s: &str) -> Result<()> {
        self.io.write_all(s.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        self.io.flush().await.map_err(|e| format!("flush: {e}"))
    }

    pub async fn fill(&mut self, deadline: tokio::time::Instant, waiting: &str) -> Result<()> {
        let mut b = [0u8; 8192];
        match tokio::time::timeout_at(deadline, self.io.read(&mut b)).await {
            Err(_) => Err(format!("timeout waiting for {waiting}; got {:?}", String::from_utf8_lossy(&self.buf))),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Ok(Ok(0)) => Err(format!("closed waiting for {waiting}; got {:?}", String::from_utf8_lossy(&self.buf))),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&b[..n]);
                Ok(())
            }
        }
    }

    /// Reads until `end` appears after `start`; returns the text up to `end` inclusive
    /// and keeps the rest. A SASL failure or stream error ends the wait early.
    pub async fn until(&mut self, start: &str, end: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(i) = find(&self.buf, start.as_bytes())
                && let Some(j) = find(&self.buf[i..], end.as_bytes())
            {
                let rest = self.buf.split_off(i + j + end.len());
                let got = std::mem::replace(&mut self.buf, rest);
                return Ok(String::from_utf8_lossy(&got).into_owned());
            }
            if find(&self.buf, b"<failure").is_some() || find(&self.buf, b"stream:error").is_some() {
                return Err(format!("server said: {}", String::from_utf8_lossy(&self.buf)));
            }
            self.fill(deadline, start).await?;
        }
    }

    /// Sends an IQ with id `id` and returns the text of its reply (anything before it
    /// is dropped). An error reply is an error.
    pub async fn iq(&mut self, id: &str, stanza: &str) -> Result<String> {
        self.send(stanza).await?;
        let deadline = tokio::time::Instant::now() + STEP;
        let quoted = [format!("id='{id}'"), format!("id=\"{id}\"")];
        loop {
            let mut from = 0;
            while let Some(i) = find(&self.buf[from..], b"<iq").map(|i| i + from) {
                let Some(gt) = find(&self.buf[i..], b">").map(|g| i + g) else { break };
                let tag = &self.buf[i..=gt];
                if quoted.iter().any(|q| find(tag, q.as_bytes()).is_some()) {
                    let end = if tag.ends_with(b"/>") {
                        Some(gt + 1)
                    } else {
                        find(&self.buf[gt..], b"</iq>").map(|e| gt + e + 5)
                    };
                    let Some(end) = end else { break };
                    let rest = self.buf.split_off(end);
                    let got = String::from_utf8_lossy(&self.buf[i..]).into_owned();
                    self.buf = rest;
                    if got[..=gt - i].contains("'error'") || got[..=gt - i].contains("\"error\"") {
                        return Err(format!("error reply: {got}"));
                    }
                    return Ok(got);
                }
                from = gt;
            }
            if find(&self.buf, b"stream:error").is_some() {
                return Err(format!("server said: {}", String::from_utf8_lossy(&self.buf)));
            }
            self.fill(deadline, id).await?;
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}
