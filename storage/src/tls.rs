//! TLS to the cluster's engines: which certificate authorities a Redis,
//! PostgreSQL or Kafka connection trusts, and the rustls connector
//! PostgreSQL connections use.
//!
//! A URL asks for TLS itself: `rediss://` for Redis, `sslmode=require` for
//! PostgreSQL (`prefer`, the driver's default, connects in plain text), and
//! for Kafka the `security.protocol=ssl` option. Certificates are always
//! verified, host name included, against the web PKI roots plus the PEM
//! bundle given by [`BackendTls::with_ca_file`] (a private CA).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::{Result, StorageError};

/// The roots a backend connection trusts. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct BackendTls {
    /// A private CA bundle (PEM) trusted besides the web PKI roots.
    ca: Option<(PathBuf, Arc<Vec<u8>>)>,
}

impl BackendTls {
    /// Trusts the web PKI roots only.
    pub fn system() -> Self {
        Self::default()
    }

    /// Trusts the certificates of the PEM file at `path` too. Fails when the
    /// file cannot be read or holds no certificate.
    pub fn with_ca_file(path: &Path) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| StorageError::tls(format!("reading {}: {e}", path.display())))?;
        let certs = parse_certs(&pem).map_err(|e| StorageError::tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(StorageError::tls(format!("{}: no PEM certificate in it", path.display())));
        }
        Ok(Self { ca: Some((path.to_owned(), Arc::new(pem))) })
    }

    /// The private CA file, if one was given (Kafka's `ssl.ca.location`).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(p, _)| p.as_path())
    }

    /// A Redis client for `url`; a `rediss://` URL is verified against these roots.
    pub fn redis_client(&self, url: &str) -> Result<redis::Client> {
        match &self.ca {
            Some((_, pem)) if url.starts_with("rediss://") => {
                // The driver then trusts this bundle alone, not the system's roots.
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) };
                Ok(redis::Client::build_with_tls(url, certs)?)
            }
            _ => Ok(redis::Client::open(url)?),
        }
    }

    /// The rustls client configuration: web PKI roots plus the private CA.
    fn rustls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some((path, pem)) = &self.ca {
            for cert in parse_certs(pem).map_err(|e| StorageError::tls(format!("{}: {e}", path.display())))? {
                roots.add(cert).map_err(|e| StorageError::tls(format!("{}: {e}", path.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StorageError::tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The connector for a PostgreSQL connection with this configuration:
    /// TLS when its `sslmode` is `require`, plain text otherwise.
    pub(crate) fn postgres(&self, config: &tokio_postgres::Config) -> Result<PgTls> {
        match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Require => {
                Ok(PgTls(Some(tokio_rustls::TlsConnector::from(self.rustls_config()?))))
            }
            _ => Ok(PgTls(None)),
        }
    }
}

fn parse_certs(pem: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem).collect()
}

/// A PostgreSQL connector: rustls, or none (the URL did not ask for TLS).
#[derive(Clone)]
pub(crate) struct PgTls(Option<tokio_rustls::TlsConnector>);

impl PgTls {
    /// One connection of its own (outside the pool), its driver task spawned.
    pub(crate) async fn connect(&self, config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
        let (client, task): (_, Pin<Box<dyn Future<Output = _> + Send>>) = match &self.0 {
            Some(_) => {
                let (client, conn) = config.connect(self.clone()).await?;
                (client, Box::pin(conn))
            }
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                (client, Box::pin(conn))
            }
        };
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "postgres connection failed");
            }
        });
        Ok(client)
    }

    /// Whether connections through it use TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.0.is_some()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let connector = self.0.clone().ok_or_else(|| io::Error::other("TLS was not asked for"))?;
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("server name {domain}: {e}")))?;
        Ok(PgTlsConnect { connector, name })
    }
}

/// One TLS handshake towards a named PostgreSQL server.
pub(crate) struct PgTlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move { Ok(PgTlsStream(self.connector.connect(self.name, stream).await?)) })
    }
}

/// A TLS stream to PostgreSQL (no channel binding offered).
pub(crate) struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
