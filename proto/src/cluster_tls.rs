//! Mutual TLS on the internal links, an option besides the cluster secret: every gRPC server
//! (logic's service, each gateway's push service) presents the node's certificate and accepts
//! only clients whose certificate the cluster CA signed; every client presents the same kind of
//! certificate and verifies the server's against that CA (host name included). URLs of the
//! links then use `https://`.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// The node's certificate and key and the cluster CA, as PEM. Cheap to clone.
#[derive(Clone)]
pub struct ClusterTls {
    cert: std::sync::Arc<Vec<u8>>,
    key: std::sync::Arc<Vec<u8>>,
    ca: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls { .. }")
    }
}

impl ClusterTls {
    /// Reads the three PEM files; an error names the file that could not be read or holds no
    /// PEM block.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, String> {
        let read = |p: &Path| -> Result<Vec<u8>, String> {
            let pem = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!("{}: no PEM block in it", p.display()));
            }
            Ok(pem)
        };
        Ok(Self {
            cert: std::sync::Arc::new(read(cert)?),
            key: std::sync::Arc::new(read(key)?),
            ca: std::sync::Arc::new(read(ca)?),
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(self.cert.as_slice(), self.key.as_slice())
    }

    /// For a gRPC server: this node's certificate, clients must present one the CA signed.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity()).client_ca_root(Certificate::from_pem(self.ca.as_slice()))
    }

    /// For a gRPC client: the server's certificate verified against the CA; this node's
    /// certificate presented.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca.as_slice())).identity(self.identity())
    }
}

/// `url` with the scheme TLS needs (`http://` becomes `https://`).
pub fn https(url: &str) -> String {
    match url.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => url.to_owned(),
    }
}

/// The endpoint of an internal link to `url`: mutual TLS when `tls` is set (the URL then dialled
/// as `https://`), plain otherwise.
pub fn endpoint(url: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, String> {
    match tls {
        Some(t) => Endpoint::from_shared(https(url)).and_then(|e| e.tls_config(t.client())),
        None => Endpoint::from_shared(url.to_owned()),
    }
    .map_err(|e| e.to_string())
}

/// A gRPC server builder for an internal service: mutual TLS when `tls` is set.
pub fn server(tls: Option<&ClusterTls>) -> Result<Server, String> {
    match tls {
        Some(t) => Server::builder().tls_config(t.server()).map_err(|e| e.to_string()),
        None => Ok(Server::builder()),
    }
}

/// The scheme of this node's own link URLs.
pub fn scheme(tls: Option<&ClusterTls>) -> &'static str {
    if tls.is_some() {
        "https"
    } else {
        "http"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_switch_to_https_and_files_must_hold_pem() {
        assert_eq!(https("http://10.0.0.1:9100"), "https://10.0.0.1:9100");
        assert_eq!(https("https://a:1"), "https://a:1");
        let dir = std::env::temp_dir().join(format!("sb-ctls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, junk) = (dir.join("a.pem"), dir.join("junk"));
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&junk, "nope").unwrap();
        assert!(ClusterTls::from_files(&pem, &pem, &pem).is_ok());
        let err = ClusterTls::from_files(&pem, &junk, &pem).unwrap_err();
        assert!(err.contains("junk") && err.contains("no PEM"), "{err}");
        assert!(ClusterTls::from_files(&pem, &pem, &dir.join("missing")).unwrap_err().contains("missing"));
        std::fs::remove_dir_all(dir).ok();
    }
}
