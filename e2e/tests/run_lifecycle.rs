//! `cellgate run` as a user meets it: exit codes, teardown on SIGTERM and Ctrl-C, a clear refusal
//! without root, and a credential injected at the boundary that the agent never sees.

use cellgate_e2e::bin;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellgate_e2e::require_root;

const CELL: &str = "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: lifecycle}\nspec:\n  capabilities:\n    - name: web\n      destinations: [{host: api.life, ports: [PORT]}]\n      http: {methods: [GET], paths: [\"/v1/**\"]}\n";

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn run_cmd(dir: &Path, cell: &str, extra: &[&str], command: &[&str]) -> Command {
    let cell_file = dir.join("cell.yaml");
    std::fs::write(&cell_file, cell).unwrap();
    let mut c = Command::new(bin("cellgate"));
    c.arg("run")
        .arg("-f")
        .arg(&cell_file)
        .arg("--audit")
        .arg(dir.join("audit.jsonl"));
    c.args(extra).arg("--").args(command).current_dir(dir);
    c
}

#[test]
fn the_commands_exit_code_is_returned() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = run_cmd(
        dir.path(),
        &CELL.replace("PORT", "443"),
        &[],
        &["sh", "-c", "exit 7"],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0 allowed, 0 denied"),
        "the summary: {stderr}"
    );
}

#[test]
fn sigterm_and_ctrl_c_tear_the_cell_down() {
    require_root();
    for sig in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let child = run_cmd(
            dir.path(),
            &CELL.replace("PORT", "443"),
            &[],
            &["sleep", "60"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let mut child = Kill(child);
        let name = format!("cgrun-{}", child.0.id());
        assert!(
            wait_until(Duration::from_secs(20), || netns_exists(&name)),
            "the cell {name} never appeared"
        );
        // Let the command start.
        std::thread::sleep(Duration::from_millis(500));
        Command::new("kill")
            .args([&format!("-{sig}"), &child.0.id().to_string()])
            .status()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "SIG{sig}: cellgate run did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            !status.success(),
            "SIG{sig}: the command was stopped, so the run is not a success"
        );
        assert!(
            !netns_exists(&name),
            "SIG{sig}: namespace {name} left behind"
        );
        assert!(
            !Path::new("/run/cellgate").join(&name).exists(),
            "SIG{sig}: state left behind"
        );
        assert!(
            !Path::new("/etc/netns").join(&name).exists(),
            "SIG{sig}: resolv.conf left behind"
        );
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err);
        assert!(err.contains(&format!("SIG{sig}")), "{err}");
    }
}

#[test]
fn without_root_it_says_what_it_needs() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cell.yaml"), CELL.replace("PORT", "443")).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(bin("cellgate"))
        .args(["run", "-f"])
        .arg(dir.path().join("cell.yaml"))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs root") && err.contains("network namespace"),
        "{err}"
    );
}

#[test]
fn a_credential_is_injected_at_the_boundary_and_never_seen_by_the_agent() {
    require_root();
    const SECRET: &str = "sk-cell-test-5f1e0c2a9b";
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut up = Command::new(bin("cellgate-demo-upstream"))
        .args([
            "--names",
            "api.life",
            "--listen",
            "127.0.0.1:0",
            "--log-header",
            "authorization",
            "--ca-out",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    let _up = Kill(up);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("api-key"), SECRET).unwrap();
    std::fs::set_permissions(
        &secrets,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let cell = CELL.replace("PORT", &port).replace(
        "      http:",
        "      credential:\n        file: {name: api-key}\n        inject: {header: Authorization, value: \"Bearer {{secret}}\"}\n      http:",
    );
    let script = format!(
        "curl -sS -H 'Authorization: Bearer agent-made-this-up' https://api.life:{port}/v1/chat; echo; env; cat {}/api-key; ls /run/cellgate/*/ 2>&1; true",
        secrets.display()
    );
    let out = run_cmd(
        dir.path(),
        &cell,
        &[
            "--secrets",
            secrets.to_str().unwrap(),
            "--upstream-ca",
            dir.path().join("upstream-ca.pem").to_str().unwrap(),
            "--resolve",
            &format!("api.life:{port}:127.0.0.1"),
        ],
        &["sh", "-c", &script],
    )
    .output()
    .unwrap();
    let agent = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{agent}");
    assert!(
        agent.contains("\"uri\":\"/v1/chat\""),
        "the request did not reach the upstream: {agent}"
    );
    assert!(
        !agent.contains(SECRET),
        "the agent saw the secret:\n{agent}"
    );
    let seen: Vec<String> = rx
        .recv_timeout(Duration::from_secs(5))
        .into_iter()
        .collect();
    assert_eq!(
        seen,
        vec![format!("seen GET /v1/chat authorization=Bearer {SECRET}")],
        "what the upstream received"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"capability\":\"web\"") && !audit.contains(SECRET));
}

#[test]
fn a_held_request_is_approved_and_a_lockdown_refuses_in_a_real_cell() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut up = Command::new(bin("cellgate-demo-upstream"))
        .args(["--names", "api.life", "--listen", "127.0.0.1:0", "--ca-out"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("listening on ").unwrap().to_string();
    let _up = Kill(up);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let admin = format!("127.0.0.1:{}", cellgate_e2e::free_port());
    let cell = CELL
        .replace("PORT", &port)
        .replace("spec:\n", "spec:\n  budget: {requests: 100}\n")
        + &format!("    - name: deploy\n      destinations: [{{host: api.life, ports: [{port}]}}]\n      http: {{methods: [POST], paths: [\"/v1/deploy\"]}}\n      approval: {{required: true, timeout: 30s}}\n");
    // Allowed; held until approved; then (after the lockdown below) refused, from the name on.
    let script = format!(
        "curl -sS https://api.life:{port}/v1/a; echo; curl -sS -X POST -d ship https://api.life:{port}/v1/deploy; echo; sleep 3; curl -sS https://api.life:{port}/v1/b || echo refused $?; echo"
    );
    let child = run_cmd(
        dir.path(),
        &cell,
        &[
            "--upstream-ca",
            dir.path().join("upstream-ca.pem").to_str().unwrap(),
            "--resolve",
            &format!("api.life:{port}:127.0.0.1"),
            "--admin",
            &admin,
        ],
        &["sh", "-c", &script],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = Kill(child);
    let cli = |args: &[&str]| {
        let out = Command::new(bin("cellgate"))
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The held request shows up; approve it, then lock everything down.
    let mut id = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (_, listed, _) = cli(&["approvals"]);
            match listed
                .lines()
                .nth(1)
                .and_then(|l| l.split_whitespace().next())
            {
                Some(found) if found.starts_with("ap-") => {
                    id = found.to_string();
                    true
                }
                _ => false,
            }
        }),
        "no request waited for approval"
    );
    let (code, said, err) = cli(&["approve", &id]);
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.contains(&format!("approved {id}")), "{said}");
    let (code, said, err) = cli(&["lockdown", "on", "--reason", "drill"]);
    assert_eq!(code, Some(0), "{said}{err}");
    let out = child.0.wait_with_output_ref();
    let agent = String::from_utf8_lossy(&out.0).into_owned();
    let log = String::from_utf8_lossy(&out.1).into_owned();
    let answers: Vec<&str> = agent.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(answers.len(), 3, "{agent}\n{log}");
    assert!(answers[0].contains("\"uri\":\"/v1/a\""), "{agent}");
    assert!(
        answers[1].contains("\"uri\":\"/v1/deploy\""),
        "the approved request: {agent}"
    );
    // Under lockdown the cell cannot even resolve the name (curl: 6, could not resolve host).
    assert_eq!(answers[2], "refused 6", "{agent}\n{log}");
    assert!(log.contains(&format!("waits for approval {id}")), "{log}");
    // The run's summary shows the budget: two requests counted (the lockdown refused the third
    // before it was even sent).
    assert!(log.contains("budget cell: requests 2/100"), "{log}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    for reason in [
        "approval_requested",
        "approval_granted",
        "lockdown_on",
        "lockdown: drill",
    ] {
        assert!(audit.contains(reason), "{reason} not audited:\n{audit}");
    }
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> (Vec<u8>, Vec<u8>);
}

impl WaitOutput for Child {
    /// Reads stdout and stderr to their end and reaps the child (bounded by the run itself).
    fn wait_with_output_ref(&mut self) -> (Vec<u8>, Vec<u8>) {
        use std::io::Read;
        let mut err = self.stderr.take().unwrap();
        let errs = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let mut out = Vec::new();
        let _ = self.stdout.take().unwrap().read_to_end(&mut out);
        let _ = self.wait();
        (out, errs.join().unwrap())
    }
}
