//! `vlalign bench --suite serve`: requests/s and latency percentiles of `vlalign serve` under
//! 1, 8 and 32 concurrent clients, with batching across requests on and off. Each setting runs
//! its own server process (this binary, `serve --addr 127.0.0.1:0`) over loopback; clients
//! are plain threads speaking HTTP/1.1, one connection per request (as curl does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};

/// One measured setting.
#[derive(Clone, Debug, Serialize)]
pub struct ServeRow {
    /// `"text"` (one text per request) or `"image"` (one PNG per request).
    pub workload: &'static str,
    pub batching: bool,
    pub clients: usize,
    pub requests: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(exe: &Path, model: &Path, batching: bool) -> Result<Server> {
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if !batching {
        cmd.arg("--no-batching");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::input(format!("cannot start `vlalign serve`: {e}")))?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| Error::input(format!("`vlalign serve` said nothing: {e}")))?;
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .ok_or_else(|| Error::input(format!("`vlalign serve` printed {line:?}")))?
        .to_string();
    let server = Server { child, addr };
    let t0 = Instant::now();
    while post(&server.addr, "GET", "/health", "").map_or(true, |(s, _)| s != 200) {
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(Error::input("`vlalign serve` never became healthy"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// One request; (status, body).
fn post(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, raw))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Drives `server` with `clients` threads, `per_client` requests each, bodies from `body(i)`.
fn drive(
    addr: &str,
    clients: usize,
    per_client: usize,
    body: &(dyn Fn(usize) -> String + Sync),
) -> Result<(f64, Vec<f64>)> {
    let t0 = Instant::now();
    let lat: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(per_client);
                    for r in 0..per_client {
                        let b = body(c * per_client + r);
                        let t = Instant::now();
                        let (status, raw) = post(addr, "POST", "/embed", &b)
                            .map_err(|e| Error::input(format!("request failed: {e}")))?;
                        if status != 200 {
                            return Err(Error::input(format!(
                                "status {status}: {}",
                                raw.lines().last().unwrap_or("")
                            )));
                        }
                        out.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for l in lat {
        all.extend(l?);
    }
    all.sort_by(f64::total_cmp);
    Ok((wall, all))
}

/// Measures every setting over the model directory `model`; `image` is a PNG/JPEG to send.
pub fn run(model: &Path, image: &Path, requests: usize) -> Result<Vec<ServeRow>> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::input(format!("cannot find this binary: {e}")))?;
    let png = std::fs::read(image).map_err(|e| Error::io(image, e))?;
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png);
    let text = |i: usize| format!("{{\"texts\": [\"a photo of thing number {i}\"]}}");
    let img = |_: usize| format!("{{\"images\": [\"{b64}\"]}}");
    let mut rows = Vec::new();
    for batching in [true, false] {
        let server = start(&exe, model, batching)?;
        for (workload, body) in [
            ("text", &text as &(dyn Fn(usize) -> String + Sync)),
            ("image", &img),
        ] {
            // Warm-up: the allocator, the thread pools, the first forward passes.
            drive(&server.addr, 4, 4, body)?;
            for clients in [1, 8, 32] {
                let per_client = (requests / clients).max(1);
                let (wall, lat) = drive(&server.addr, clients, per_client, body)?;
                rows.push(ServeRow {
                    workload,
                    batching,
                    clients,
                    requests: lat.len(),
                    requests_per_s: lat.len() as f64 / wall,
                    p50_ms: percentile(&lat, 0.5),
                    p99_ms: percentile(&lat, 0.99),
                });
            }
        }
    }
    Ok(rows)
}
