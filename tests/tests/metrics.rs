//! The consumer's metrics: valid Prometheus text (promtool), served with health checks,
//! and scraped by a real Prometheus server.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use alignx_consumer::metrics::{Metrics, Readiness, serve};
use alignx_tests::services::{http_get, start_prometheus};

#[test]
fn exposition_passes_promtool_check_metrics() {
    let m = Metrics::new();
    m.signals.with_label_values(&["pair", "accepted"]).inc_by(3);
    m.update_latency.observe(0.7);
    m.model_info.with_label_values(&["tiny-1", "cpu"]).set(1);
    let text = m.render();
    for name in [
        "alignx_signals_total",
        "alignx_dlq_total",
        "alignx_updates_total",
        "alignx_update_latency_seconds",
        "alignx_engine_batch_size",
        "alignx_engine_seconds",
        "alignx_generated_tokens_total",
        "alignx_prompt_tokens_total",
        "alignx_pending_signals",
        "alignx_inflight_updates",
        "alignx_redis_errors_total",
        "alignx_model_info",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    assert!(text.contains(r#"alignx_dlq_total{reason="key_mismatch"} 0"#), "labelled series start at zero");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_and_scraped_by_prometheus() {
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), readiness.clone(), async {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let check = tokio::task::spawn_blocking(move || {
        assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
        assert_eq!(http_get(addr, "/readyz").unwrap().0, 503);
        readiness.set(true);
        assert_eq!(http_get(addr, "/readyz").unwrap().0, 200);
        metrics.signals.with_label_values(&["ugc", "accepted"]).inc_by(5);
        let prometheus = start_prometheus(addr).unwrap();
        let query = "/api/v1/query?query=sum(alignx_signals_total)";
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = http_get(prometheus.addr(), query).unwrap();
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
            if value == Some(5.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never saw alignx_signals_total = 5: {body}\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    check.await.unwrap();
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
