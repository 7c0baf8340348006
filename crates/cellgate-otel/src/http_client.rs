//! The HTTP client of OTLP/HTTP: hyper with rustls (system roots, or the configured CA).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_http::{HttpClient, HttpError};

/// Largest response body read from a collector (its answers are a few bytes).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// An OTLP/HTTP client.
#[derive(Debug, Clone)]
pub struct OtlpHttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl OtlpHttpClient {
    /// A client trusting `ca_file` (PEM) if given, else the system roots.
    ///
    /// # Errors
    /// The CA file cannot be read or holds no certificate; no system root is usable.
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<Self, String> {
        let roots = crate::tls::roots(ca_file)?;
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(OtlpHttpClient {
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))??;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(body, MAX_RESPONSE_BYTES).collect(),
        )
        .await
        .map_err(|_| format!("response body not read within {:?}", self.timeout))?
        .map_err(|e| format!("response body: {e}"))?
        .to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}
