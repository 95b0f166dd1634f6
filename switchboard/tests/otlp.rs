//! OpenTelemetry export: an all-in-one process with `SB_OTLP_ENDPOINT` sends its request spans
//! over OTLP/gRPC to a collector (the trace service's server, run by this test), under its
//! service name, with the request's op and rid and, for a stored message, its conv and seq; the
//! spans still batched when it is stopped with SIGTERM are flushed before it exits.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::all_in_one;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

/// A span as received: its name, attributes (as text) and its service's name.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    service: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                let attributes = span.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect();
                spans.push(Received { name: span.name.clone(), service: service.clone(), attributes });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The server process, killed however the test ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn request_spans_reach_an_otlp_collector() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let collector = Collector::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    let dir = temp_dir("otlp");
    let endpoint = format!("http://{addr}");
    // Batches are due only every minute: what arrives was flushed when the process stopped.
    let env = [("SB_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "60000")];
    let (child, http, ws) = all_in_one(&dir, &["--user-rate", "0"], &env, Stdio::null());
    let mut child = Reaped(child);
    let (mut a, mut b) = friends(http, ws, "olga", "otto");
    let sent = a.ok("send", json!({"to": "otto", "cmid": "o1", "type": "text", "body": "traced"}));
    let m = b.push("msg");
    assert_eq!(m["msg"]["body"], "traced");
    let conv = m["msg"]["conv"].as_str().unwrap().to_owned();
    let seq = sent["seq"].as_u64().unwrap().to_string();

    std::thread::sleep(Duration::from_millis(300));
    assert!(collector.spans.lock().unwrap().is_empty(), "nothing is due before the schedule delay");
    // SIGTERM: the process stops its roles, then flushes its spans before it exits.
    let term = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let send = loop {
        let spans = collector.spans.lock().unwrap().clone();
        if let Some(s) =
            spans.iter().find(|s| s.name == "request" && s.attributes.get("op").is_some_and(|o| o == "send"))
        {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "no send span exported; got {spans:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(send.service, "switchboard-all-in-one");
    assert_eq!(send.attributes.get("user").map(String::as_str), Some("olga"));
    assert_eq!(send.attributes.get("conv"), Some(&conv), "{send:?}");
    assert_eq!(send.attributes.get("seq"), Some(&seq), "{send:?}");
    assert!(send.attributes.contains_key("rid") && send.attributes.contains_key("conn"), "{send:?}");
    let spans = collector.spans.lock().unwrap().clone();
    assert!(
        spans.iter().any(|s| s.name == "request" && s.attributes.get("op").is_some_and(|o| o == "friend.request")),
        "every request has its span: {spans:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
