//! Real services for tests: each runs as a child process on a free 127.0.0.1 port,
//! in its own temporary directory, and is killed when its handle drops (also when a
//! test panics). Binaries come from `scripts/setup`: Redis from the system, tansu from
//! `ALIGNX_TANSU`, moto's S3 server from `ALIGNX_MOTO` (both set by `scripts/env.sh`).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running service. Dropping it kills the process and removes its directory.
pub struct Service {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Service {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The service's working directory (data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join("service.log")
    }

    /// Stops the process (SIGTERM and wait when `graceful`, else SIGKILL) and starts it
    /// again with the same arguments, port and directory.
    pub fn restart(&mut self, graceful: bool) -> anyhow::Result<()> {
        self.stop(graceful);
        self.start_again()
    }

    /// Stops the process; [`Self::start_again`] brings it back.
    pub fn stop(&mut self, graceful: bool) {
        if graceful {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Starts a stopped service again with the same arguments, port and directory.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = launch(self.name, &self.program, &self.args, &self.env, self.dir.path())?;
        wait_until_listening(self, Duration::from_secs(20))
    }

    /// The service's combined output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(Self::log_path(self.dir())).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago. Another process could take it before the
/// service binds; `start` then fails with the service's own message.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

fn launch(
    name: &str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(Service::log_path(dir))?;
    Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {name} ({}); did scripts/setup run?", program.display()))
}

fn spawn(
    name: &'static str,
    program: &Path,
    args: &[String],
    port: u16,
    dir: tempfile::TempDir,
) -> anyhow::Result<Service> {
    spawn_with_env(name, program, args, &[], port, dir)
}

fn spawn_with_env(
    name: &'static str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    port: u16,
    dir: tempfile::TempDir,
) -> anyhow::Result<Service> {
    let child = launch(name, program, args, env, dir.path())?;
    let mut service = Service {
        name,
        program: program.to_owned(),
        args: args.to_vec(),
        env: env.to_vec(),
        child,
        port,
        dir,
    };
    wait_until_listening(&mut service, Duration::from_secs(20))?;
    Ok(service)
}

fn wait_until_listening(service: &mut Service, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = service.child.try_wait()? {
            bail!("{} exited ({status}) before listening:\n{}", service.name, service.log());
        }
        if TcpStream::connect_timeout(&service.addr(), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not listening on {} after {timeout:?}:\n{}",
                service.name,
                service.addr(),
                service.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Redis with persistence off, in a fresh directory.
pub fn start_redis() -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let args: Vec<String> =
        ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    spawn("redis-server", Path::new("redis-server"), &args, port, dir)
}

/// Redis that keeps its data across restarts: an append-only file synced on every write,
/// in the service's directory.
pub fn start_redis_persistent() -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    spawn("redis-server", Path::new("redis-server"), &args, port, dir)
}

/// The tansu broker with in-memory storage.
pub fn start_tansu() -> anyhow::Result<Service> {
    start_tansu_on(free_port()?, "memory://tansu/", &[])
}

/// The tansu broker storing its topics and offsets in a bucket of moto's S3 server, so
/// they survive a broker restart.
pub fn start_tansu_s3(s3: &Service) -> anyhow::Result<Service> {
    start_tansu_s3_on(s3, free_port()?)
}

/// [`start_tansu_s3`] on a given port (e.g. one a consumer is already trying).
pub fn start_tansu_s3_on(s3: &Service, port: u16) -> anyhow::Result<Service> {
    let bucket = "tansu";
    let (status, body) = http_request(s3.addr(), "PUT", &format!("/{bucket}"))?;
    anyhow::ensure!(status == 200, "create bucket {bucket}: HTTP {status} {body}");
    let env: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
        ("AWS_ENDPOINT", format!("http://{}", s3.addr())),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    start_tansu_on(port, &format!("s3://{bucket}/"), &env)
}

fn start_tansu_on(port: u16, storage: &str, env: &[(String, String)]) -> anyhow::Result<Service> {
    let program = std::env::var_os("ALIGNX_TANSU")
        .map(PathBuf::from)
        .context("ALIGNX_TANSU is not set: run tests through `make test` or `source scripts/env.sh`")?;
    let url = format!("tcp://127.0.0.1:{port}");
    let args: Vec<String> =
        ["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage]
            .iter()
            .map(|s| s.to_string())
            .collect();
    spawn_with_env("tansu", &program, &args, env, port, tempfile::tempdir()?)
}

/// moto's S3 server (in memory; it outlives the brokers that store in it).
pub fn start_moto() -> anyhow::Result<Service> {
    let packages = std::env::var("ALIGNX_MOTO")
        .context("ALIGNX_MOTO is not set: run tests through `make test` or `source scripts/env.sh`")?;
    let port = free_port()?;
    let args: Vec<String> = ["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let env = vec![("PYTHONPATH".to_owned(), packages)];
    spawn_with_env("moto", Path::new("python3"), &args, &env, port, tempfile::tempdir()?)
}

/// Prometheus scraping `target` (host:port) every second, with its own storage.
pub fn start_prometheus(target: SocketAddr) -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: alignx\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config)?;
    let args: Vec<String> = vec![
        "--config.file=prometheus.yml".into(),
        format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    let service = spawn("prometheus", Path::new("prometheus"), &args, port, dir)?;
    // It listens before its storage is open; queries work once /-/ready says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(service.addr(), "/-/ready").map(|(status, _)| status).ok() != Some(200) {
        if Instant::now() > deadline {
            bail!("prometheus not ready after 30s:\n{}", service.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(service)
}

/// A Prometheus Pushgateway (Debian's `prometheus-pushgateway`) on a free port, storing
/// in memory.
pub fn start_pushgateway() -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let args = vec![format!("--web.listen-address=127.0.0.1:{port}")];
    let service = spawn("pushgateway", Path::new("prometheus-pushgateway"), &args, port, dir)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(service.addr(), "/-/ready").map(|(status, _)| status).ok() != Some(200) {
        if Instant::now() > deadline {
            bail!("pushgateway not ready after 30s:\n{}", service.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(service)
}

/// `GET path` over plain HTTP/1.1; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// `METHOD path` with no body over plain HTTP/1.1; returns (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_owned()))
}
