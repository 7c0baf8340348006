//! Where and how to export: the standard `OTEL_*` variables, overridden by flags.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (default port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (default port 4318).
    HttpProtobuf,
}

impl Protocol {
    /// Parses the values `OTEL_EXPORTER_OTLP_PROTOCOL` takes.
    ///
    /// # Errors
    /// A message for `http/json` (not supported) and anything else.
    pub fn parse(s: &str) -> Result<Protocol, String> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            "http/json" => Err("http/json is not supported: use grpc or http/protobuf".into()),
            other => Err(format!("{other:?} is not grpc or http/protobuf")),
        }
    }

    /// The value as `OTEL_EXPORTER_OTLP_PROTOCOL` spells it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Most records sent in one export request.
pub const DEFAULT_BATCH: usize = 512;
/// Records the export may fall behind the log before new requests are refused.
pub const DEFAULT_MAX_BACKLOG: u64 = 1_000_000;
/// How long the export may make no progress with records waiting before `/readyz` fails.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);
/// Time one export request may take (`OTEL_EXPORTER_OTLP_TIMEOUT`'s default, 10 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The export's settings. Built by [`OtlpConfig::resolve`]; `None` there means no export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Transport.
    pub protocol: Protocol,
    /// Where log records go: for gRPC the collector's address (`http://host:4317`), for
    /// HTTP the full URL (`http://host:4318/v1/logs`).
    pub logs_endpoint: String,
    /// Where spans go, as `logs_endpoint`; `None` sends no spans.
    pub traces_endpoint: Option<String>,
    /// Extra request headers (gRPC metadata), e.g. an API key.
    pub headers: Vec<(String, String)>,
    /// Time one export request may take.
    pub timeout: Duration,
    /// CA certificate(s) (PEM) for an `https` endpoint; without it the system roots are used.
    pub ca_file: Option<PathBuf>,
    /// Records the export may fall behind before new requests are refused (`audit_backlog`).
    pub max_backlog: u64,
    /// How long the export may make no progress with records waiting before it counts as
    /// stalled (`/readyz` fails).
    pub stall_after: Duration,
    /// Most records per export request.
    pub batch: usize,
    /// `service.name` of the resource (`OTEL_SERVICE_NAME`, else the component's name).
    pub service_name: String,
}

/// The flags that override the environment (each `None`: not given).
#[derive(Debug, Clone, Default)]
pub struct OtlpFlags {
    /// `--otlp-endpoint`: the collector's base URL (as `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// `--otlp-protocol`.
    pub protocol: Option<String>,
    /// `--otlp-max-backlog`.
    pub max_backlog: Option<u64>,
    /// `--otlp-stall-after`, a duration such as `60s`.
    pub stall_after: Option<Duration>,
    /// `--otlp-traces`: `false` sends log records only.
    pub traces: Option<bool>,
}

impl OtlpConfig {
    /// Resolves the flags and the standard variables (`env` is a map so tests never touch
    /// the process): `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` (and its `_LOGS_`
    /// form), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds),
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`, `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`.
    /// `Ok(None)` when no endpoint is configured: nothing is exported.
    ///
    /// # Errors
    /// A message naming the first invalid value.
    pub fn resolve(
        flags: &OtlpFlags,
        env: &HashMap<String, String>,
        component: &str,
    ) -> Result<Option<OtlpConfig>, String> {
        let get = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        if get("OTEL_SDK_DISABLED") == Some("true") && flags.endpoint.is_none() {
            return Ok(None);
        }
        let protocol = match flags
            .protocol
            .as_deref()
            .or_else(|| get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"))
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            Some(p) => Protocol::parse(p).map_err(|e| format!("OTLP protocol: {e}"))?,
            None => Protocol::Grpc,
        };
        let base = flags
            .endpoint
            .as_deref()
            .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let signal = |var: &str, path: &str| -> Result<Option<String>, String> {
            let url = match (get(var), base) {
                (Some(u), _) => u.to_owned(),
                (None, Some(b)) => match protocol {
                    Protocol::Grpc => b.to_owned(),
                    Protocol::HttpProtobuf => format!("{}/{path}", b.trim_end_matches('/')),
                },
                (None, None) => return Ok(None),
            };
            check_url(&url).map_err(|e| format!("{var}: {e}"))?;
            Ok(Some(url))
        };
        let Some(logs_endpoint) = signal("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "v1/logs")? else {
            return Ok(None);
        };
        let traces_endpoint = if flags.traces == Some(false) {
            None
        } else {
            signal("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "v1/traces")?
        };
        let headers = match get("OTEL_EXPORTER_OTLP_HEADERS") {
            Some(h) => parse_headers(h).map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {e}"))?,
            None => Vec::new(),
        };
        let timeout = match get("OTEL_EXPORTER_OTLP_TIMEOUT") {
            Some(ms) => {
                let ms: u64 = ms.parse().map_err(|_| {
                    format!("OTEL_EXPORTER_OTLP_TIMEOUT: {ms:?} is not a number of milliseconds")
                })?;
                if ms == 0 {
                    return Err("OTEL_EXPORTER_OTLP_TIMEOUT: must be above zero".into());
                }
                Duration::from_millis(ms)
            }
            None => DEFAULT_TIMEOUT,
        };
        let max_backlog = flags.max_backlog.unwrap_or(DEFAULT_MAX_BACKLOG);
        if max_backlog == 0 {
            return Err("--otlp-max-backlog: must be above zero".into());
        }
        let stall_after = flags.stall_after.unwrap_or(DEFAULT_STALL_AFTER);
        if stall_after.is_zero() {
            return Err("--otlp-stall-after: must be above zero".into());
        }
        Ok(Some(OtlpConfig {
            protocol,
            logs_endpoint,
            traces_endpoint,
            headers,
            timeout,
            ca_file: get("OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from),
            max_backlog,
            stall_after,
            batch: DEFAULT_BATCH,
            service_name: get("OTEL_SERVICE_NAME").unwrap_or(component).to_owned(),
        }))
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?}: the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?}: no host"));
    }
    Ok(())
}

/// Parses `key1=value1,key2=value2` (values percent-decoded, as the specification says).
fn parse_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let k = k.trim().to_ascii_lowercase();
        let v = percent_decode(v.trim())?;
        http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k:?}"))?;
        http::HeaderValue::from_str(&v).map_err(|_| format!("bad value for header {k:?}"))?;
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_endpoint_no_export() {
        let c = OtlpConfig::resolve(&OtlpFlags::default(), &env(&[]), "cellgate-node").unwrap();
        assert_eq!(c, None);
    }

    #[test]
    fn standard_variables_resolve_per_signal_urls() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,x-tenant=t1"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_SERVICE_NAME", "edge-nodes"),
        ]);
        let c = OtlpConfig::resolve(&OtlpFlags::default(), &e, "cellgate-node")
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.logs_endpoint, "http://collector:4318/v1/logs");
        assert_eq!(
            c.traces_endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            c.headers,
            vec![
                ("api-key".into(), "a b".into()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.service_name, "edge-nodes");
        // gRPC keeps the base address; a signal variable wins; a flag wins over both.
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces:4317"),
        ]);
        let flags = OtlpFlags {
            endpoint: Some("http://flag:4317".into()),
            ..OtlpFlags::default()
        };
        let c = OtlpConfig::resolve(&flags, &e, "cellgate-node")
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.logs_endpoint, "http://flag:4317");
        assert_eq!(c.traces_endpoint.as_deref(), Some("https://traces:4317"));
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        let bad = [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
                "scheme",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ],
                "http/json is not supported",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
                ],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
                ],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
        ];
        for (vars, needle) in bad {
            let err = OtlpConfig::resolve(&OtlpFlags::default(), &env(&vars), "n").unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        let flags = OtlpFlags {
            endpoint: Some("http://c:4317".into()),
            max_backlog: Some(0),
            ..OtlpFlags::default()
        };
        assert!(OtlpConfig::resolve(&flags, &env(&[]), "n")
            .unwrap_err()
            .contains("max-backlog"));
    }
}
