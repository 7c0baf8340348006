//! The Vault backend against real OpenBao, in the scenarios a dev server's KV cannot show, each
//! through a real node:
//!
//! - a **leased dynamic secret** (the database engine over a PostgreSQL the test starts): the
//!   node's lease appears in the server's own lease list, is renewed past half its life, and is
//!   revoked (the database role dropped) when the node shuts down;
//! - a leased secret **outliving the node's token** (AppRole): OpenBao revokes a token's leases
//!   when the token ends, so the node replaces the secret, with one its new token leases, before
//!   the old token ends;
//! - a **sealed** server: 503 `credential_unavailable`, then recovery after unsealing without
//!   restarting the node;
//! - a **restarted** server (killed, started again on the same storage, unsealed): the node
//!   recovers by itself, and logs in again (AppRole) when the server no longer takes its token.
//!
//! The sealed and restarted scenarios start an OpenBao server of their own from `BAO_BIN` (never
//! the shared one): raft storage in a temporary directory, a loopback listener without TLS,
//! initialised with one key share. The database scenarios use the shared server at `VAULT_ADDR`
//! (root token `VAULT_TOKEN`) and PostgreSQL from Debian's packages (`/usr/lib/postgresql/*/bin`).
//! `.ci/run` provides all of them; with `CI=true` a missing one is a failure, elsewhere the test
//! prints a `NOTE ... not run` line and passes.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_node::credentials::vault_contract::api;
use cellgate_node::credentials::{VaultAuth, VaultConfig};
use common::*;
use http_body_util::Empty;
use serde_json::json;

// ---- what the scenarios need, and saying so when it is missing ----

/// A prerequisite of `scenario` is missing: a failure in CI (`.ci/run` provides it), a NOTE
/// elsewhere.
fn missing(scenario: &str, what: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{scenario}: CI=true but {what}: .ci/run provides it"
    );
    // Written past the test harness's capture, so the run's log shows it did not run.
    let _ = writeln!(
        std::io::stderr(),
        "NOTE {scenario} not run: {what} (see docs/credentials.md)"
    );
}

/// The `bao` binary from `BAO_BIN`.
fn bao_bin(scenario: &str) -> Option<PathBuf> {
    match std::env::var_os("BAO_BIN").filter(|v| !v.is_empty()) {
        Some(p) if Path::new(&p).is_file() => Some(p.into()),
        Some(p) => {
            missing(
                scenario,
                &format!("BAO_BIN={} is not a file", p.to_string_lossy()),
            );
            None
        }
        None => {
            missing(scenario, "BAO_BIN is not set");
            None
        }
    }
}

/// The shared server: `VAULT_ADDR` and its root token `VAULT_TOKEN`.
fn shared_server(scenario: &str) -> Option<(String, String)> {
    match (std::env::var("VAULT_ADDR"), std::env::var("VAULT_TOKEN")) {
        (Ok(addr), Ok(token)) if !addr.is_empty() && !token.is_empty() => Some((addr, token)),
        _ => {
            missing(scenario, "VAULT_ADDR and VAULT_TOKEN are not set");
            None
        }
    }
}

/// A directory holding PostgreSQL's `initdb`, `postgres` and `psql`: Debian's
/// `/usr/lib/postgresql/<version>/bin` (the newest), else one on `PATH`.
fn postgres_bin(scenario: &str) -> Option<PathBuf> {
    let has_all = |d: &Path| {
        ["initdb", "postgres", "psql"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_all(d))
        .collect();
    debian.sort();
    let found = debian.pop().map(|(_, d)| d).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).find(|d| has_all(d))
    });
    if found.is_none() {
        missing(
            scenario,
            "PostgreSQL (initdb, postgres, psql) is not installed",
        );
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `api`, asserting a 2xx answer.
async fn ok(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let (status, answer) = api(addr, token, method, path, body).await;
    assert!(
        (200..300).contains(&status),
        "{method} {path}: HTTP {status} {answer}"
    );
    answer
}

/// The server's own list of the leases under `prefix` (`LIST /v1/sys/leases/lookup/<prefix>/`).
async fn leases(addr: &str, token: &str, prefix: &str) -> BTreeSet<String> {
    let (status, body) = api(
        addr,
        token,
        "LIST",
        &format!("sys/leases/lookup/{prefix}/"),
        None,
    )
    .await;
    match status {
        404 => BTreeSet::new(),
        200 => body["data"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect(),
        _ => panic!("LIST sys/leases/lookup/{prefix}/: HTTP {status} {body}"),
    }
}

/// Sets up AppRole as an operator would, with the root token: the auth method at `mount`, a
/// policy `policy` of `hcl`, a role `cellgate-node` holding it whose tokens live `token_ttl`;
/// writes its role id and a new secret id into files in `dir`, and returns the node's
/// configuration for them.
async fn approle(
    addr: &str,
    root: &str,
    mount: &str,
    policy: &str,
    hcl: &str,
    token_ttl: &str,
    dir: &Path,
) -> VaultConfig {
    ok(
        addr,
        root,
        "POST",
        &format!("sys/auth/{mount}"),
        Some(json!({"type": "approle"})),
    )
    .await;
    ok(
        addr,
        root,
        "PUT",
        &format!("sys/policies/acl/{policy}"),
        Some(json!({ "policy": hcl })),
    )
    .await;
    ok(
        addr,
        root,
        "POST",
        &format!("auth/{mount}/role/cellgate-node"),
        Some(json!({"token_policies": [policy], "token_ttl": token_ttl, "token_max_ttl": "24h"})),
    )
    .await;
    let role_id = ok(
        addr,
        root,
        "GET",
        &format!("auth/{mount}/role/cellgate-node/role-id"),
        None,
    )
    .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = ok(
        addr,
        root,
        "POST",
        &format!("auth/{mount}/role/cellgate-node/secret-id"),
        None,
    )
    .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (role_id_file, secret_id_file) = (dir.join("role-id"), dir.join("secret-id"));
    std::fs::write(&role_id_file, role_id).unwrap();
    std::fs::write(&secret_id_file, secret_id).unwrap();
    VaultConfig {
        addr: addr.to_string(),
        auth: VaultAuth::AppRole {
            role_id_file,
            secret_id_file,
            mount: mount.to_string(),
        },
    }
}

// ---- an OpenBao server of the test's own ----

/// A non-dev OpenBao server: raft storage in a temporary directory, one unseal key. Dropping it
/// kills the process.
struct OpenBao {
    // Declared first: the process is killed before its directory is removed.
    child: Option<tokio::process::Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    addr: String,
    root_token: String,
    unseal_key: String,
}

impl OpenBao {
    /// Starts, initialises and unseals a server, with KV v2 mounted at `secret/`.
    async fn start(bin: PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (port, cluster_port) = (free_port(), free_port());
        std::fs::create_dir(dir.path().join("data")).unwrap();
        // OpenBao 2.x has no `file` storage (it answers "unknown storage type file") and no
        // mlock to disable: single-node raft is its persistent storage.
        std::fs::write(
            dir.path().join("config.hcl"),
            format!(
                "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"cellgate-test\"\n}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable = 1\n}}\n\
                 api_addr = \"http://127.0.0.1:{port}\"\ncluster_addr = \"http://127.0.0.1:{cluster_port}\"\n",
                data = dir.path().join("data").display(),
            ),
        )
        .unwrap();
        let mut bao = Self {
            child: None,
            bin,
            dir,
            addr: format!("http://127.0.0.1:{port}"),
            root_token: String::new(),
            unseal_key: String::new(),
        };
        bao.spawn().await;
        let init = ok(
            &bao.addr,
            "",
            "PUT",
            "sys/init",
            Some(json!({"secret_shares": 1, "secret_threshold": 1})),
        )
        .await;
        bao.root_token = init["root_token"].as_str().unwrap().to_string();
        bao.unseal_key = init["keys"][0].as_str().unwrap().to_string();
        bao.unseal().await;
        bao.root(
            "POST",
            "sys/mounts/secret",
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await;
        bao
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("openbao.log")
    }

    /// Starts the process (sealed, on the same port and storage as before) and waits until it
    /// answers.
    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = tokio::process::Command::new(&self.bin)
            .arg("server")
            .arg(format!(
                "-config={}",
                self.dir.path().join("config.hcl").display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_health(|_| true, "answer").await;
    }

    /// `GET /v1/sys/health`'s status: 200 active, 503 sealed, 501 not initialised; `None` when
    /// nothing listens.
    async fn health(&self) -> Option<u16> {
        let port = self.addr.rsplit(':').next().unwrap();
        tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .ok()?;
        Some(api(&self.addr, "", "GET", "sys/health", None).await.0)
    }

    async fn wait_health(&self, want: impl Fn(u16) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.health().await {
                if want(s) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not {what} within 30s; its log:\n{}",
                tail(&self.log())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn unseal(&self) {
        let r = ok(
            &self.addr,
            "",
            "PUT",
            "sys/unseal",
            Some(json!({"key": self.unseal_key})),
        )
        .await;
        assert_eq!(r["sealed"], false, "{r}");
        self.wait_health(|s| s == 200, "become active after unsealing")
            .await;
    }

    async fn seal(&self) {
        self.root("PUT", "sys/seal", None).await;
        assert_eq!(self.health().await, Some(503), "sealed");
    }

    /// Kills the process (SIGKILL: no chance to tidy up) and waits for it to end.
    async fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().await.unwrap();
        assert_eq!(self.health().await, None, "nothing listens any more");
    }

    async fn root(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        ok(&self.addr, &self.root_token, method, path, body).await
    }

    /// Writes KV v2 `secret/<path>`; a KV mount just made may take a moment to take writes.
    async fn put_kv(&self, path: &str, data: serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = api(
                &self.addr,
                &self.root_token,
                "POST",
                &format!("secret/data/{path}"),
                Some(json!({ "data": data })),
            )
            .await;
            if (200..300).contains(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "writing secret/data/{path}: HTTP {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---- a PostgreSQL server of the test's own ----

/// A PostgreSQL cluster in a temporary directory on a loopback port, superuser `postgres` with a
/// password. PostgreSQL refuses to run as root: as root it runs as the `postgres` user.
struct Postgres {
    // Declared first: the process is killed (on drop) before its directory is removed.
    _child: tokio::process::Child,
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
}

/// The uid and gid of `name` in /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name) && f.len() > 3)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
}

impl Postgres {
    async fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let password = uuid::Uuid::new_v4().simple().to_string();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &password).unwrap();
        // Who we are, from /proc/self/status's Uid line (the real uid first).
        let as_root = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        let ids = if as_root {
            let ids = user_ids("postgres").expect(
                "running as root, PostgreSQL needs the postgres user (Debian's package makes it)",
            );
            for p in [dir.path(), &pwfile] {
                std::os::unix::fs::chown(p, Some(ids.0), Some(ids.1)).unwrap();
            }
            Some(ids)
        } else {
            None
        };
        let command = |program: &str| {
            let mut c = tokio::process::Command::new(bin.join(program));
            c.current_dir(dir.path())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            if let Some((uid, gid)) = ids {
                c.uid(uid).gid(gid);
            }
            c
        };
        let data = dir.path().join("data");
        let out = command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path().join("postgres.log"), Some(uid), Some(gid))
                .unwrap();
        }
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pg = Self {
            _child: child,
            bin: bin.to_path_buf(),
            dir,
            port,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg
            .try_sql("postgres", &pg.password, "select 1")
            .await
            .as_deref()
            != Ok("1")
        {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start within 30s; its log:\n{}",
                tail(&pg.dir.path().join("postgres.log"))
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pg
    }

    /// Runs `sql` as `user` over TCP with `password`: its rows, one a line, or psql's error.
    async fn try_sql(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let out = tokio::process::Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user])
            .args(["-d", "postgres", "-w", "-tAc", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    async fn sql(&self, sql: &str) -> String {
        self.try_sql("postgres", &self.password, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

// ---- a node, a cell, a request ----

/// A cell `name` whose capability `gh` injects `vault {path, field}` as a bearer token.
fn vault_cell(name: &str, port: u16, path: &str, field: &str) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: {name}, namespace: agents}}\nspec:\n  capabilities:\n    - name: gh\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{methods: [GET, POST], paths: [\"/v1/**\"]}}\n      credential:\n        vault: {{path: {path}, field: {field}}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n"
    )
}

/// A node using `vault`, with a 2 s backend timeout and a 1 s KV cache lifetime.
async fn node_with(vault: VaultConfig) -> Fixture {
    Fixture::start_with(move |c| {
        c.credentials.vault = Some(vault);
        c.credentials.timeout = Duration::from_secs(2);
        c.credentials.vault_kv_ttl = KV_TTL;
    })
    .await
}

const KV_TTL: Duration = Duration::from_secs(1);

fn token_auth(dir: &Path, addr: &str, token: &str) -> VaultConfig {
    let file = dir.join("vault-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    VaultConfig {
        addr: addr.to_string(),
        auth: VaultAuth::Token { file },
    }
}

async fn add_cell(f: &Fixture, name: &str, yaml: String) {
    std::fs::write(f.cells_dir.join(format!("{name}.yaml")), yaml).unwrap();
    for _ in 0..100 {
        if f.node()
            .shared
            .cells
            .get(&format!("local:agents:{name}"))
            .is_some()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cell {name} never loaded");
}

/// One request as `cell`, with the agent's own (made-up) Authorization header.
async fn call(f: &Fixture, cell: &str) -> Resp {
    let tls = f.tls("api.test", &f.token(cell), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/repos")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .header("authorization", "Bearer agent-made-this-up")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send_h1(tls, req).await
}

/// The Authorization header the upstream received last.
fn last_auth(f: &Fixture) -> Vec<String> {
    f.https
        .requests()
        .last()
        .unwrap()
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .collect()
}

/// The request is answered 503 `credential_unavailable`, not forwarded, and its audit record
/// says why with `why` (which the agent does not read).
async fn assert_unavailable(f: &Fixture, cell: &str, why: &str) {
    let forwarded = f.https.requests().len();
    let r = call(f, cell).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"], "cellgate_credential_unavailable", "{j}");
    assert_eq!(j["reason"], "credential_unavailable", "{j}");
    assert!(
        !r.body.contains(why),
        "the agent read the backend's error: {j}"
    );
    let rid = j["request_id"].as_str().unwrap().to_string();
    let rec = f
        .wait_audit(|r| r["request_id"] == rid.as_str() && r["reason"] == "credential_unavailable")
        .await;
    assert!(
        rec["reasons"].to_string().contains(why),
        "{rec} should say {why:?}"
    );
    assert_eq!(f.https.requests().len(), forwarded, "never forwarded");
}

/// Mounts the database engine on the shared server at a path of its own, connected to `pg`,
/// with a role `app` whose credentials are leased for `default_ttl` (renewable up to an hour).
/// Returns the mount.
async fn database_engine(addr: &str, root: &str, pg: &Postgres, default_ttl: &str) -> String {
    let mount = format!("cellgate-db-{}", uuid::Uuid::new_v4().simple());
    ok(
        addr,
        root,
        "POST",
        &format!("sys/mounts/{mount}"),
        Some(json!({"type": "database"})),
    )
    .await;
    ok(
        addr,
        root,
        "POST",
        &format!("{mount}/config/pg"),
        Some(json!({
            "plugin_name": "postgresql-database-plugin",
            "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable", pg.port),
            "username": "postgres",
            "password": pg.password,
            "allowed_roles": ["app"],
            "verify_connection": true,
        })),
    )
    .await;
    ok(
        addr,
        root,
        "POST",
        &format!("{mount}/roles/app"),
        Some(json!({
            "db_name": "pg",
            "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
            "default_ttl": default_ttl,
            "max_ttl": "1h",
        })),
    )
    .await;
    mount
}

/// The database roles the engine made (`v-...`), as PostgreSQL lists them.
async fn engine_roles(pg: &Postgres) -> BTreeSet<String> {
    pg.sql("select rolname from pg_roles where rolname like 'v-%'")
        .await
        .lines()
        .map(str::to_string)
        .collect()
}

// ---- a leased dynamic secret: renewed, and revoked at shutdown ----

/// PKI's `issue/<role>` cannot stand in here: it is write-only (`GET` answers 405 `unsupported
/// operation`) and needs a `common_name`, while the node reads a dynamic secret with
/// `GET /v1/<path>` and a capability's `vault` names no request body. The database engine's
/// `creds/<role>` is a read and its leases are renewable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openbao_database_lease_is_renewed_and_revoked_when_the_node_shuts_down() {
    const NAME: &str =
        "real_openbao_database_lease_is_renewed_and_revoked_when_the_node_shuts_down";
    let Some((addr, root)) = shared_server(NAME) else {
        return;
    };
    let Some(pg_bin) = postgres_bin(NAME) else {
        return;
    };
    let pg = Postgres::start(&pg_bin).await;
    let mount = database_engine(&addr, &root, &pg, "8s").await;
    let prefix = format!("{mount}/creds/app");

    let dir = tempfile::tempdir().unwrap();
    let mut f = node_with(token_auth(dir.path(), &addr, &root)).await;
    add_cell(
        &f,
        "db",
        vault_cell("db", f.https.addr.port(), &prefix, "password"),
    )
    .await;
    let r = call(&f, "db").await;
    let t0 = Instant::now();
    assert_eq!(r.status, 200, "{}", r.body);
    let injected = last_auth(&f);
    assert_eq!(injected.len(), 1);
    let password = injected[0].strip_prefix("Bearer ").unwrap().to_string();
    assert_ne!(password, "agent-made-this-up");

    // The node's lease, in the server's own list.
    let listed = leases(&addr, &root, &prefix).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let lease_id = format!("{prefix}/{}", listed.first().unwrap());
    let lookup = |lease_id: String| {
        let (addr, root) = (addr.clone(), root.clone());
        async move {
            api(
                &addr,
                &root,
                "PUT",
                "sys/leases/lookup",
                Some(json!({ "lease_id": lease_id })),
            )
            .await
        }
    };
    let (status, issued) = lookup(lease_id.clone()).await;
    assert_eq!(status, 200, "{issued}");
    assert_eq!(issued["data"]["renewable"], true, "{issued}");
    assert!(issued["data"]["last_renewal"].is_null(), "{issued}");

    // What was injected is a live database login, of the role the lease created.
    let user = pg
        .sql("select rolname from pg_roles where rolname like 'v-%'")
        .await;
    assert!(!user.is_empty() && !user.contains('\n'), "{user:?}");
    assert_eq!(
        pg.try_sql(&user, &password, "select current_user").await,
        Ok(user.clone())
    );

    // Past half its life, the next request renews it: same secret, same lease, later end.
    tokio::time::sleep(Duration::from_millis(4600).saturating_sub(t0.elapsed())).await;
    let r = call(&f, "db").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(last_auth(&f), injected, "the renewed lease's secret");
    let (status, renewed) = lookup(lease_id.clone()).await;
    assert_eq!(status, 200, "{renewed}");
    assert!(
        renewed["data"]["last_renewal"].is_string(),
        "renewed: {renewed}"
    );
    assert!(
        renewed["data"]["expire_time"].as_str() > issued["data"]["expire_time"].as_str(),
        "the renewal moved its end: {issued} then {renewed}"
    );
    assert_eq!(
        leases(&addr, &root, &prefix).await,
        listed,
        "renewed, not replaced"
    );
    let left = Duration::from_secs(renewed["data"]["ttl"].as_u64().unwrap());
    let looked = Instant::now();

    // The node shuts down: its lease is revoked, well before it would have ended.
    f.node.take().unwrap().shutdown().await;
    assert!(
        looked.elapsed() < left,
        "too slow to tell revocation from expiry"
    );
    assert_eq!(
        leases(&addr, &root, &prefix).await,
        BTreeSet::new(),
        "revoked"
    );
    let (status, gone) = lookup(lease_id.clone()).await;
    assert_eq!(status, 400, "{gone}");
    assert_eq!(
        pg.sql(&format!(
            "select count(*) from pg_roles where rolname = '{user}'"
        ))
        .await,
        "0",
        "the revocation dropped the database role"
    );
    ok(&addr, &root, "DELETE", &format!("sys/mounts/{mount}"), None).await;
}

/// With AppRole, the node's token has a lease of its own (6 s here, an hour for the secret), and
/// OpenBao revokes the leases a token created when the token ends. The node logs in again at two
/// thirds of its token's life; the secret the old token leased is replaced, by one the new token
/// leases, before the old token ends: what the upstream receives always logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openbao_database_secret_is_replaced_before_the_token_that_leased_it_ends() {
    const NAME: &str =
        "real_openbao_database_secret_is_replaced_before_the_token_that_leased_it_ends";
    let Some((addr, root)) = shared_server(NAME) else {
        return;
    };
    let Some(pg_bin) = postgres_bin(NAME) else {
        return;
    };
    let pg = Postgres::start(&pg_bin).await;
    let mount = database_engine(&addr, &root, &pg, "1h").await;
    let prefix = format!("{mount}/creds/app");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (auth_mount, policy) = (
        format!("cellgate-approle-{id}"),
        format!("cellgate-test-{id}"),
    );
    // The policy docs/credentials.md gives for dynamic secrets: read them, revoke their leases
    // (renewing them is in OpenBao's default policy).
    let hcl = format!(
        "path \"{prefix}\" {{ capabilities = [\"read\"] }}\npath \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}"
    );
    let dir = tempfile::tempdir().unwrap();
    let vault = approle(&addr, &root, &auth_mount, &policy, &hcl, "6s", dir.path()).await;
    let mut f = node_with(vault).await;
    add_cell(
        &f,
        "db",
        vault_cell("db", f.https.addr.port(), &prefix, "password"),
    )
    .await;
    let live = |injected: &[String]| {
        let password = injected[0].strip_prefix("Bearer ").unwrap().to_string();
        let pg = &pg;
        async move {
            for user in engine_roles(pg).await {
                if pg.try_sql(&user, &password, "select 1").await.is_ok() {
                    return Some(user);
                }
            }
            None
        }
    };

    assert_eq!(call(&f, "db").await.status, 200);
    // The first token was issued before this: it ends within 6 s of it.
    let t1 = Instant::now();
    let first = last_auth(&f);
    let first_user = live(&first).await.expect("the injected password logs in");
    let first_leases = leases(&addr, &root, &prefix).await;
    assert_eq!(first_leases.len(), 1, "{first_leases:?}");

    // Within a fifth of the token's life of its end: replaced.
    tokio::time::sleep(Duration::from_millis(5000).saturating_sub(t1.elapsed())).await;
    let t2 = Instant::now();
    assert_eq!(call(&f, "db").await.status, 200);
    let second = last_auth(&f);
    assert_ne!(second, first, "a new secret before the old token ends");
    let second_user = live(&second).await.expect("the new password logs in");
    assert_ne!(second_user, first_user);

    // The first token has ended: what it leased is gone (replaced and revoked by the node; the
    // server would have revoked it with its token), the new secret still logs in and is served.
    tokio::time::sleep(Duration::from_millis(6500).saturating_sub(t1.elapsed())).await;
    let now_leases = leases(&addr, &root, &prefix).await;
    assert_eq!(now_leases.len(), 1, "{now_leases:?}");
    assert!(now_leases.is_disjoint(&first_leases), "{now_leases:?}");
    assert!(!engine_roles(&pg).await.contains(&first_user));
    assert_eq!(call(&f, "db").await.status, 200);
    assert_eq!(last_auth(&f), second);
    assert_eq!(live(&second).await, Some(second_user.clone()));

    // The node shuts down and revokes the lease with its own token (the policy allows it),
    // before that token, issued after `t2`, could end and take the lease with it.
    f.node.take().unwrap().shutdown().await;
    assert!(t2.elapsed() < Duration::from_secs(6), "{:?}", t2.elapsed());
    assert_eq!(leases(&addr, &root, &prefix).await, BTreeSet::new());
    assert!(!engine_roles(&pg).await.contains(&second_user));

    ok(&addr, &root, "DELETE", &format!("sys/mounts/{mount}"), None).await;
    ok(
        &addr,
        &root,
        "DELETE",
        &format!("sys/auth/{auth_mount}"),
        None,
    )
    .await;
    ok(
        &addr,
        &root,
        "DELETE",
        &format!("sys/policies/acl/{policy}"),
        None,
    )
    .await;
}

// ---- sealed, then unsealed ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openbao_sealed_is_a_503_and_unsealing_recovers_without_a_node_restart() {
    let Some(bin) =
        bao_bin("real_openbao_sealed_is_a_503_and_unsealing_recovers_without_a_node_restart")
    else {
        return;
    };
    let bao = OpenBao::start(bin).await;
    bao.put_kv("cellgate-test/sealed", json!({"token": "before-seal"}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let f = node_with(token_auth(dir.path(), &bao.addr, &bao.root_token)).await;
    let port = f.https.addr.port();
    add_cell(
        &f,
        "s",
        vault_cell("s", port, "secret/data/cellgate-test/sealed", "token"),
    )
    .await;
    let r = call(&f, "s").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(last_auth(&f), vec!["Bearer before-seal".to_string()]);

    bao.seal().await;
    tokio::time::sleep(KV_TTL + Duration::from_millis(200)).await;
    // OpenBao answers 503 {"errors":["Vault is sealed"]}.
    assert_unavailable(&f, "s", "sealed").await;
    // A capability without a credential is unaffected.
    let r = f
        .https_get("api.test", "api.test", "/v1/models", "GET")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Unsealed: the same node, with nothing restarted, reads again.
    bao.unseal().await;
    bao.put_kv("cellgate-test/sealed", json!({"token": "after-unseal"}))
        .await;
    let r = call(&f, "s").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(last_auth(&f), vec!["Bearer after-unseal".to_string()]);
}

// ---- killed and restarted ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openbao_restarted_server_is_recovered_from_by_the_node_itself() {
    let Some(bin) = bao_bin("real_openbao_restarted_server_is_recovered_from_by_the_node_itself")
    else {
        return;
    };
    let mut bao = OpenBao::start(bin).await;
    bao.put_kv("cellgate-test/restart", json!({"token": "before-restart"}))
        .await;
    // AppRole at its default mount, as an operator sets it up.
    let dir = tempfile::tempdir().unwrap();
    let vault = approle(
        &bao.addr,
        &bao.root_token,
        "approle",
        "cellgate-node",
        "path \"secret/data/cellgate-test/*\" { capabilities = [\"read\"] }",
        "1h",
        dir.path(),
    )
    .await;
    let f = node_with(vault).await;
    add_cell(
        &f,
        "r",
        vault_cell(
            "r",
            f.https.addr.port(),
            "secret/data/cellgate-test/restart",
            "token",
        ),
    )
    .await;
    let r = call(&f, "r").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(last_auth(&f), vec!["Bearer before-restart".to_string()]);
    let (bao_addr, bao_root) = (bao.addr.clone(), bao.root_token.clone());
    let logins = || leases(&bao_addr, &bao_root, "auth/approle/login");
    let first = logins().await;
    assert_eq!(first.len(), 1, "one login: {first:?}");

    // Down: nothing listens.
    bao.kill().await;
    tokio::time::sleep(KV_TTL + Duration::from_millis(200)).await;
    assert_unavailable(&f, "r", "cannot reach vault").await;

    // Started again on the same storage: sealed until unsealed.
    bao.spawn().await;
    assert_unavailable(&f, "r", "sealed").await;
    bao.unseal().await;
    bao.put_kv("cellgate-test/restart", json!({"token": "after-restart"}))
        .await;
    let r = call(&f, "r").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(last_auth(&f), vec!["Bearer after-restart".to_string()]);
    assert_eq!(
        logins().await,
        first,
        "the token survived the restart in the server's storage: no new login was needed"
    );

    // The restarted server no longer takes the node's token: refused (403), the node logs in
    // again by itself.
    bao.root("PUT", "sys/leases/revoke-prefix/auth/approle/login", None)
        .await;
    assert_eq!(logins().await, BTreeSet::new());
    bao.put_kv("cellgate-test/restart", json!({"token": "after-relogin"}))
        .await;
    tokio::time::sleep(KV_TTL + Duration::from_millis(200)).await;
    let r = call(&f, "r").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(last_auth(&f), vec!["Bearer after-relogin".to_string()]);
    let second = logins().await;
    assert_eq!(second.len(), 1, "one new login: {second:?}");
    assert!(second.is_disjoint(&first), "{first:?} then {second:?}");
}
