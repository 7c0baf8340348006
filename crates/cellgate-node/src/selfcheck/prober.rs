//! `cellgate-node self-check-prober`: the privileged half of the self-check, in a container of
//! its own beside an unprivileged node (the chart's `node.selfCheck`).
//!
//! Entering a pod's network namespace needs CAP_SYS_ADMIN, and Kubernetes cannot give a
//! capability to a non-root container. Rather than make the node (which parses every byte the
//! cells send) root with CAP_SYS_ADMIN, a small process does only this: it serves a Unix socket
//! in a directory only the node pod's containers mount, takes one request per connection (a pod
//! address, a nonce, a timeout; one JSON line), runs [`super::probe::LocalProber::probe`] toward
//! the one destination it was started with, and answers the [`Outcome`] (one JSON line). It
//! cannot be asked to dial anything else or to send anything but a probe line, and it holds no
//! secret: the nonce is the node's, and only the node's intake can tell a probe it received.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::probe::{is_nonce, LocalProber, Outcome};
use crate::config::ProberConfig;

/// Largest request line (an address, a nonce, a number): anything longer is not from the node.
const REQUEST_MAX: u64 = 256;
/// Largest answer line the node reads (an outcome with an answer of at most
/// [`super::probe::ANSWER_MAX`] bytes, escaped).
const ANSWER_LINE_MAX: u64 = 4096;
/// How long a request may take to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest probe the prober runs, whatever it is asked.
pub const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Probes running at once; more wait (each is a thread of its own).
const CONCURRENT_PROBES: usize = 32;

/// One request: probe from the namespace holding `ip`, with `nonce`, within `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    ip: IpAddr,
    nonce: String,
    timeout_ms: u64,
}

/// Serves `config.socket` until `shutdown` completes.
///
/// # Errors
/// When the socket cannot be bound or opened to the node's user.
pub async fn serve(
    config: ProberConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket)?;
    // The node runs as another user; the directory is the access control (only the node pod's
    // containers mount it).
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o666))?;
    tracing::info!(
        socket = %config.socket.display(), target = %config.target,
        netns_dir = %config.netns_dir.display(), "self-check prober listening"
    );
    let prober = Arc::new(LocalProber::new(config.target, config.netns_dir.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_PROBES));
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => {
                let _ = std::fs::remove_file(&config.socket);
                return Ok(());
            }
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (prober, slots) = (prober.clone(), slots.clone());
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            if let Err(e) = handle(&prober, stream).await {
                tracing::warn!(error = %e, "self-check request refused");
            }
        });
    }
}

async fn handle(prober: &LocalProber, stream: UnixStream) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(REQUEST_MAX));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| "no request in time".to_string())?
        .map_err(|e| format!("reading the request: {e}"))?;
    let req: Request =
        serde_json::from_str(line.trim_end()).map_err(|e| format!("not a request: {e}"))?;
    if !is_nonce(&req.nonce) {
        return Err("the nonce is not 32 lowercase hex digits".into());
    }
    let timeout =
        Duration::from_millis(req.timeout_ms).clamp(Duration::from_millis(1), MAX_PROBE_TIMEOUT);
    let outcome = prober.probe(req.ip, &req.nonce, timeout).await;
    let mut out = serde_json::to_vec(&outcome).map_err(|e| e.to_string())?;
    out.push(b'\n');
    write
        .write_all(&out)
        .await
        .map_err(|e| format!("writing the answer: {e}"))
}

/// Asks the prober at `socket` for one probe. Every failure to ask is
/// [`Outcome::Unavailable`]: the probe did not run, which proves nothing either way.
pub async fn ask(socket: &Path, ip: IpAddr, nonce: &str, timeout: Duration) -> Outcome {
    let unavailable = |detail: String| Outcome::Unavailable { detail };
    let asked = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("the prober at {} cannot be reached: {e}", socket.display()))?;
        let (read, mut write) = stream.into_split();
        let req = Request {
            ip,
            nonce: nonce.to_string(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|e| format!("asking the prober: {e}"))?;
        let mut answer = String::new();
        BufReader::new(read.take(ANSWER_LINE_MAX))
            .read_line(&mut answer)
            .await
            .map_err(|e| format!("reading the prober's answer: {e}"))?;
        serde_json::from_str::<Outcome>(answer.trim_end())
            .map_err(|e| format!("the prober's answer is not an outcome: {e}"))
    };
    // The prober's own search and probe, and a margin for the socket.
    match tokio::time::timeout(timeout + Duration::from_secs(3), asked).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable(format!(
            "the prober at {} did not answer in time",
            socket.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_prober_answers_only_well_formed_requests() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("prober.sock");
        let netns = dir.path().join("netns");
        std::fs::create_dir(&netns).unwrap();
        let config = ProberConfig {
            socket: socket.clone(),
            target: crate::config::SELF_CHECK_TARGET,
            netns_dir: netns.clone(),
            log_json: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(config, async {
            let _ = stopped.await;
        }));
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // No namespace holds the address: the probe ran and found nothing.
        let n = super::super::probe::nonce().unwrap();
        let o = ask(
            &socket,
            "10.9.9.9".parse().unwrap(),
            &n,
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(
            o,
            Outcome::NoNamespace {
                dir: netns.display().to_string(),
                searched: 0
            }
        );
        // A request that is not one gets no answer, which the node takes as Unavailable.
        let o = ask(
            &socket,
            "10.9.9.9".parse().unwrap(),
            "not-a-nonce",
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(o, Outcome::Unavailable { .. }), "{o:?}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        assert!(!socket.exists());
        let o = ask(
            &socket,
            "10.9.9.9".parse().unwrap(),
            &n,
            Duration::from_millis(200),
        )
        .await;
        match o {
            Outcome::Unavailable { detail } => {
                assert!(detail.contains("cannot be reached"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }
}
