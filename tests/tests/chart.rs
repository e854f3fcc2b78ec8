//! The Helm chart `charts/alignx`, offline: linted and rendered by the Helm 4 Go SDK
//! (helm-python-sdk) for the default values and with every optional feature on, every
//! manifest validated against the Kubernetes schemas (kubernetes-validate, strict), bad
//! values refused; the alert rules through `promtool check rules` and `promtool test
//! rules`; and every metric the dashboard and the alerts query present in a real scrape
//! of a running consumer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alignx_tests::services::{http_get, start_redis, start_tansu};
use alignx_tests::stream::{ConsumerProcess, create_topics, produce, scenario, wait_until_done};
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/alignx")
}

/// Runs `charts/alignx/tests/check.py` into a temporary directory; returns it with the
/// parsed report.
fn check_chart() -> (tempfile::TempDir, Value) {
    let tools = std::env::var("ALIGNX_CHART_TOOLS")
        .expect("ALIGNX_CHART_TOOLS is unset: run through `make test` (scripts/env.sh sets it)");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("python3")
        .arg(chart().join("tests/check.py"))
        .arg(out.path())
        .env("PYTHONPATH", &tools)
        .output()
        .expect("python3");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let report: Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("check.py printed no report ({e}):\n{stderr}"));
    assert!(run.status.success(), "chart checks failed:\n{report:#}\n{stderr}");
    (out, report)
}

fn rendered(out: &Path, case: &str) -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(out.join(format!("{case}.json"))).unwrap()).unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"].as_str().unwrap().ends_with(name_suffix))
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix} rendered"))
}

#[test]
fn chart_lints_renders_valid_manifests_and_refuses_bad_values() {
    let (out, report) = check_chart();
    println!("{report:#}");
    for (case, r) in report["cases"].as_object().unwrap() {
        assert_eq!(r["problems"], Value::Array(vec![]), "{case}");
        for o in r["objects"].as_array().unwrap() {
            assert!(o["validated"].as_str().is_some(), "{case}: {o}");
        }
    }
    let refused: Vec<_> = report["bad_values"].as_array().unwrap().iter().collect();
    assert!(refused.len() >= 10, "bad-values.yaml has its cases");
    assert!(refused.iter().all(|c| c["refused"] == true), "{refused:#?}");

    // Defaults: a consumer, its metrics Service, a PDB, the CronJob, the model store; no
    // autoscaler, no operator objects.
    let default = rendered(out.path(), "default");
    let kinds: BTreeSet<&str> = default.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for kind in
        ["Deployment", "Service", "PodDisruptionBudget", "CronJob", "PersistentVolumeClaim", "ConfigMap"]
    {
        assert!(kinds.contains(kind), "default render lacks {kind}: {kinds:?}");
    }
    for kind in ["ScaledObject", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"] {
        assert!(!kinds.contains(kind), "{kind} is off by default");
    }
    let pdb = find(&default, "PodDisruptionBudget", "-consumer");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // Every feature on: GPU consumers scaled by KEDA, restricted pods, secrets as files.
    let full = rendered(out.path(), "gpu-keda");
    let deployment = find(&full, "Deployment", "-consumer");
    assert!(deployment["spec"].get("replicas").is_none(), "KEDA owns the replica count");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert!(container["args"].as_array().unwrap().iter().any(|a| a == "--device=cuda"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 60, "time to drain");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    // No secret value anywhere in the manifests: Secrets are referenced and mounted.
    let text = std::fs::read_to_string(out.path().join("gpu-keda.yaml")).unwrap();
    assert!(text.contains("secretName: kafka-credentials") && text.contains("secretName: redis-credentials"));
    let config = find(&full, "ConfigMap", "-config")["data"]["config.toml"].as_str().unwrap().to_owned();
    assert!(
        config.contains("\"sasl.password\" = \"/etc/alignx/kafka-secrets/0/value\""),
        "the SASL password comes from a mounted file:\n{config}"
    );
    let scaled = find(&full, "ScaledObject", "-consumer");
    assert_eq!(scaled["spec"]["maxReplicaCount"], 24);
    assert_eq!(scaled["spec"]["triggers"][0]["type"], "kafka");
    assert_eq!(scaled["spec"]["triggers"][0]["metadata"]["allowIdleConsumers"], "false");
    find(&full, "ServiceMonitor", "-consumer");
    find(&full, "PrometheusRule", "alignx");
    let dashboard = find(&full, "ConfigMap", "-dashboard");
    let json = dashboard["data"]["alignx-stream.json"].as_str().unwrap();
    serde_json::from_str::<Value>(json).expect("the dashboard ConfigMap holds valid JSON");
    let cron = find(&full, "CronJob", "-retrain");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    let job = &cron["spec"]["jobTemplate"]["spec"];
    assert!(job["activeDeadlineSeconds"].as_i64().is_some());
    let args: Vec<&str> = job["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "retrain");
    assert!(args.contains(&"--pushgateway=http://pushgateway.monitoring:9091"), "{args:?}");
    // The job reaches Kafka as the consumer does: the same config file (ALIGNX_CONFIG),
    // which the trainer reads — topics, settings, the Secret mounted as a file.
    let retrain = &job["template"]["spec"]["containers"][0];
    let env = retrain["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "ALIGNX_CONFIG" && e["value"] == "/etc/alignx/config/config.toml")
    );
    let mounts = retrain["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/etc/alignx/kafka-secrets/0"), "{mounts:?}");
    let config_file = out.path().join("gpu-keda-config.toml");
    std::fs::write(&config_file, &config).unwrap();
    let kafka = alignx_trainer::kafka::ServiceKafka::from_file(&config_file).unwrap();
    assert_eq!(kafka.settings_files["sasl.password"], Path::new("/etc/alignx/kafka-secrets/0/value"));
    assert_eq!(kafka.settings["security.protocol"], "SASL_SSL");
    assert_eq!(kafka.input_topic.as_deref(), Some(alignx_schemas::keys::SIGNALS_TOPIC));
    assert_eq!(kafka.log_topic.as_deref(), Some(alignx_schemas::keys::INFERENCE_LOG_TOPIC));

    // The HPA variant never renders a ScaledObject.
    let hpa = rendered(out.path(), "cpu-hpa");
    find(&hpa, "HorizontalPodAutoscaler", "-consumer");
    assert!(!hpa.iter().any(|o| o["kind"] == "ScaledObject" || o["kind"] == "CronJob"));
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out =
        Command::new("promtool").args(args).current_dir(dir).output().expect("promtool (scripts/setup)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let (out, _) = check_chart();
    std::fs::copy(chart().join("tests/alerts.test.yaml"), out.path().join("alerts.test.yaml")).unwrap();
    let check = promtool(&["check", "rules", "alerts.rules.yaml"], out.path());
    println!("{check}");
    assert!(check.contains("SUCCESS: 7 rules found"), "{check}");
    let test = promtool(&["test", "rules", "alerts.test.yaml"], out.path());
    println!("{test}");
    assert!(test.contains("SUCCESS"), "{test}");
}

/// `alignx_…` metric names in a text (PromQL in the dashboard and the alert rules).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("alignx_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// What `alignx-trainer retrain` pushes to the Pushgateway (the alerts' contract with the
/// trainer; not served by the consumer).
const TRAINER_METRICS: [&str; 2] =
    ["alignx_trainer_retrain_last_outcome", "alignx_trainer_retrain_last_success_timestamp_seconds"];

#[test]
fn every_metric_the_dashboard_and_alerts_query_is_in_a_real_consumer_scrape() {
    let dashboard = std::fs::read_to_string(chart().join("files/dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml")).unwrap();
    let mut wanted = metric_names(&dashboard);
    wanted.extend(metric_names(&rules));
    let trainer: BTreeSet<String> =
        wanted.iter().filter(|n| n.starts_with("alignx_trainer_")).cloned().collect();
    assert_eq!(trainer, TRAINER_METRICS.iter().map(|s| s.to_string()).collect());
    wanted.retain(|n| !n.starts_with("alignx_trainer_"));
    assert!(wanted.len() >= 10, "{wanted:?}");

    // A real consumer on a real broker and Redis, after a small stream with bad messages.
    let broker = start_tansu().unwrap();
    let redis = start_redis().unwrap();
    let brokers = broker.addr().to_string();
    let redis_url = format!("redis://{}/", redis.addr());
    create_topics(&brokers, 2).unwrap();
    let messages = scenario(20, 200, 50, 3);
    produce(&brokers, &messages).unwrap();
    let mut consumer = ConsumerProcess::start(&brokers, &redis_url, &[]).unwrap();
    wait_until_done(&redis_url, &messages, Duration::from_secs(60), || {
        anyhow::ensure!(consumer.is_running(), "the consumer exited:\n{}", consumer.log());
        Ok(())
    })
    .unwrap();
    // Lag series appear with librdkafka's first statistics report.
    let deadline = Instant::now() + Duration::from_secs(15);
    let scrape = loop {
        let (status, body) = http_get(consumer.metrics, "/metrics").unwrap();
        assert_eq!(status, 200);
        if body.contains("alignx_consumer_lag{") || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let served: BTreeSet<&str> =
        scrape.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let missing: Vec<&String> = wanted.iter().filter(|n| !served.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "queried but not served: {missing:?}\nserved: {served:?}");
    println!("{} metrics queried by the dashboard and alerts, all served: {wanted:?}", wanted.len());
}
