//! Logs and traces of a role. Logs go to stderr, filtered by `SB_LOG` (default `info`), as text
//! or, with `SB_LOG_FORMAT=json`, one JSON object per line. With `SB_OTLP_ENDPOINT` set (e.g.
//! `http://collector:4317`: plain gRPC, no TLS; cargo feature `otlp`), the roles (not `token`
//! or `config`) also export spans over OTLP/gRPC:
//! every request's span (`request`: op, rid, user, gateway, conn, and the conv and seq of a
//! stored message) under the service name `switchboard-<role>` (or `SB_OTLP_SERVICE`), filtered
//! by `SB_OTLP_FILTER` (default `info,switchboard_logic=debug`, which takes the request spans
//! without writing their debug logs). The batch exporter's settings are OpenTelemetry's own
//! `OTEL_BSP_*` variables.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes exported spans when dropped (at the end of `main`).
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("switchboard: flushing OTLP spans: {e}");
            }
        }
    }
}

/// Installs the log (and, for a role with `export`, trace) subscriber for `role`. Call inside
/// the Tokio runtime: the OTLP exporter's connection runs on it.
pub fn init(role: &str, export: bool) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("SB_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match std::env::var("SB_LOG_FORMAT").as_deref() {
        Ok("json") => fmt.json().with_current_span(true).with_filter(filter).boxed(),
        Ok("text") | Err(_) => fmt.with_filter(filter).boxed(),
        Ok(other) => anyhow::bail!("SB_LOG_FORMAT={other:?}: expected text or json"),
    };
    let endpoint = std::env::var("SB_OTLP_ENDPOINT").ok().filter(|e| export && !e.is_empty());
    let registry = tracing_subscriber::registry().with(logs);
    let Some(endpoint) = endpoint else {
        registry.init();
        return Ok(Telemetry {
            #[cfg(feature = "otlp")]
            provider: None,
        });
    };
    #[cfg(feature = "otlp")]
    {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| anyhow::anyhow!("SB_OTLP_ENDPOINT: {e}"))?;
        let service = std::env::var("SB_OTLP_SERVICE").unwrap_or_else(|_| format!("switchboard-{role}"));
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let spans = EnvFilter::try_from_env("SB_OTLP_FILTER").unwrap_or_else(|_| "info,switchboard_logic=debug".into());
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("switchboard")).with_filter(spans);
        registry.with(layer).init();
        Ok(Telemetry { provider: Some(provider) })
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = (registry, role, endpoint);
        anyhow::bail!("SB_OTLP_ENDPOINT: this binary was built without OpenTelemetry (cargo feature `otlp`)")
    }
}
