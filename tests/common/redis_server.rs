//! Real `redis-server` processes for tests: free loopback ports, a temp dir
//! each, no persistence, killed on drop. Plain, TLS (certificates made here
//! with rcgen), ACL and a 3-master cluster.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use activescale::{
    config::Config,
    store::{StoreError, redis::RedisStore},
};

/// A free loopback port (the listener is closed before the server binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
    /// Set for TLS servers: files and the URL scheme.
    pub tls: Option<TlsFiles>,
}

/// PEM files of a test CA, a server certificate and a client certificate.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl RedisServer {
    /// A plain server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A plain server with extra arguments (e.g. `--user` lines).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let mut s = Self::new(port, extra.iter().map(|s| s.to_string()).collect(), None);
        s.args
            .splice(0..0, ["--port".to_string(), port.to_string()]);
        s.launch();
        s
    }

    /// A plain server's port and directory, not started yet: [`RedisServer::restart`]
    /// starts it (to test a process that starts before Redis).
    pub fn reserve() -> Self {
        let port = free_port();
        Self::new(port, vec!["--port".into(), port.to_string()], None)
    }

    /// A TLS-only server; with `client_certs`, clients must present a
    /// certificate signed by the test CA.
    pub fn start_tls(client_certs: bool) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::generate(dir.path());
        let mut args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            files.server_cert.to_str().unwrap(),
            "--tls-key-file",
            files.server_key.to_str().unwrap(),
            "--tls-ca-cert-file",
            files.ca.to_str().unwrap(),
            "--tls-auth-clients",
            if client_certs { "yes" } else { "no" },
        ]
        .map(String::from)
        .to_vec();
        args.shrink_to_fit();
        let mut s = Self {
            port,
            dir,
            args,
            child: None,
            starts: 0,
            tls: Some(files),
        };
        s.launch();
        s
    }

    fn new(port: u16, args: Vec<String>, tls: Option<TlsFiles>) -> Self {
        Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            args,
            child: None,
            starts: 0,
            tls,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process and waits for "Ready to accept connections".
    fn launch(&mut self) {
        self.starts += 1;
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not installed? (apt-get install -y redis-server)");
        self.child = Some(child);
        wait_for_log(
            &log,
            "Ready to accept connections",
            self.child.as_mut().unwrap(),
        );
    }

    /// Kills the server; the port stays reserved for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port (empty: there is no persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// A config for `activescale` using this server.
    pub fn config(&self, mut base: Config) -> Config {
        base.store.redis_mut().url = self.url();
        base
    }

    /// A raw client for assertions on the server itself.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        let client = match &self.tls {
            Some(f) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: Some(redis::ClientTlsConfig {
                        client_cert: std::fs::read(&f.client_cert).unwrap(),
                        client_key: std::fs::read(&f.client_key).unwrap(),
                    }),
                    root_cert: Some(std::fs::read(&f.ca).unwrap()),
                },
            )
            .unwrap(),
            None => redis::Client::open(self.url()).unwrap(),
        };
        client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for_log(log: &Path, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(log).is_ok_and(|s| s.contains(what)) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "redis-server exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "redis-server not ready: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl TlsFiles {
    /// A CA, a server certificate for 127.0.0.1/localhost and a client
    /// certificate, all signed by the CA, written to `dir`.
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct subjects: OpenSSL takes a leaf whose subject equals its
        // issuer for self-signed and refuses it.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "activescale test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names.clone()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, names[0].as_str());
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (client_cert, client_key) = leaf(vec!["activescale-test-client".into()]);
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        Self {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

/// Three masters on loopback ports, slots spread, `cluster_state:ok`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let (port, bus) = (free_port(), free_port());
                let mut s = RedisServer::new(
                    port,
                    [
                        "--port",
                        &port.to_string(),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus.to_string(),
                        "--cluster-config-file",
                        "nodes.conf",
                    ]
                    .map(String::from)
                    .to_vec(),
                    None,
                );
                s.launch();
                s
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self { nodes }
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// The Redis store `config` (with `store: redis`) asks for, as `run` opens it.
pub async fn connect(config: &Config) -> Result<RedisStore, StoreError> {
    let redis = config.store.redis().expect("a config with store: redis");
    RedisStore::connect(redis, &config.engine).await
}
