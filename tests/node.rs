//! The product the way users run it: `helm install` on a real node (kubelet, containerd,
//! kube-proxy, CoreDNS: tests/cluster/node), pods from the project's own image built
//! from its Dockerfile (`just image-local`), workloads calling the proxy's Service by
//! its DNS name with nothing but the token Secret in `envFrom`; then day-2 operations
//! under load. The fake upstream runs in this test, on the node's address, and records
//! what the proxies sent it.
//!
//! Needs root, the node's Debian packages (hack/setup.sh) and the image in buildah's
//! store (`just image-local`; or LLMPROXY_IMAGE names another one). The workload image
//! (the official openai SDK on Python, hack/workload-image.sh) is built if missing.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, EvictParams, GroupVersionKind, ListParams, LogParams, PostParams,
};
use kube::{Api, Client};
use llm_proxy::api::{Project, ProxyToken, TokenPhase};
use llm_proxy::fake_upstream::FakeUpstream;
use serde_json::{Value, json};

/// The chart's release, in the namespace the quickstart's key Secret lives in.
const RELEASE: &str = "llm-proxy";
const NS: &str = "llm-proxy";
const APPS: &str = "demo-apps";
/// Debian's busybox-static, packed by the node (tests/cluster/node/images.go).
const BUSYBOX: &str = "localhost/llmproxy/busybox:1.35";
const ANSWER: &str = "Hello from the fake upstream.";

fn image() -> String {
    std::env::var("LLMPROXY_IMAGE").unwrap_or_else(|_| "localhost/llm-proxy:dev".into())
}

/// Runs a command to success and returns its stdout.
fn run(program: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .env("KUBECONFIG", support::kubeconfig())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {}: {}{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn helm(args: &[&str]) -> String {
    run(&support::cache().join("bin/helm"), args)
}

fn kubectl(args: &[&str]) -> String {
    run(&support::kubectl(), args)
}

/// `helm install` or `helm upgrade` of the chart with this test's image, waiting for
/// every pod to be Ready through the chart's own probes.
fn helm_deploy(verb: &str, extra: &[&str]) {
    let image = image();
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let chart = support::repo().join("charts/llm-proxy");
    let mut args = vec![verb, RELEASE, chart.to_str().unwrap(), "--namespace", NS, "--wait", "--timeout", "180s"];
    let (repository, tag) = (format!("image.repository={repository}"), format!("image.tag={tag}"));
    args.extend(["--create-namespace", "--set", &repository, "--set", &tag]);
    // The fake upstream speaks plain HTTP on the node: the one value a real install
    // would not set (the chart's values.yaml says when to).
    args.extend(["--set", "upstreamPolicy.schemes={https,http}"]);
    args.extend(extra);
    helm(&args);
}

/// Pods of one chart component (`controller` or `proxy`), by name.
async fn component_pods(client: &Client, component: &str) -> Vec<Pod> {
    let selector = format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}");
    Api::<Pod>::namespaced(client.clone(), NS).list(&ListParams::default().labels(&selector)).await.unwrap().items
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && pod.metadata.deletion_timestamp.is_none()
}

/// Starts a pod running `command` in `image`, with the token Secret `secret` in `envFrom`.
async fn start_pod(client: &Client, namespace: &str, pod: &str, image: &str, secret: Option<&str>, command: &[&str]) {
    let mut spec = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": image, "imagePullPolicy": "Never", "command": command,
        }]},
    });
    if let Some(secret) = secret {
        spec["spec"]["containers"][0]["envFrom"] = json!([{"secretRef": {"name": secret}}]);
    }
    let pod: Pod = serde_json::from_value(spec).unwrap();
    Api::<Pod>::namespaced(client.clone(), namespace).create(&PostParams::default(), &pod).await.unwrap();
}

async fn pod_phase(client: &Client, namespace: &str, pod: &str) -> String {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace).get(pod).await.unwrap();
    pod.status.and_then(|s| s.phase).unwrap_or_default()
}

/// Waits for the pod to end and returns its output; it must have succeeded.
async fn pod_output(client: &Client, namespace: &str, pod: &str, timeout: Duration) -> String {
    let phase = support::eventually(timeout, || async {
        let phase = pod_phase(client, namespace, pod).await;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let logs = Api::<Pod>::namespaced(client.clone(), namespace).logs(pod, &LogParams::default()).await.unwrap();
    assert_eq!(phase, "Succeeded", "pod {namespace}/{pod} failed:\n{logs}");
    logs
}

/// The Pod's address of the node, where pods reach this test's fake upstream.
async fn node_address(client: &Client) -> String {
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    let addresses = nodes.items[0].status.as_ref().unwrap().addresses.clone().unwrap();
    addresses.into_iter().find(|a| a.type_ == "InternalIP").unwrap().address
}

/// Copies an image from buildah's store into the node's containerd (`kind load`).
fn load_image(image: &str) {
    let script = support::repo().join("tests/cluster/cluster.sh");
    let out = std::process::Command::new(&script).args(["load", image]).output().unwrap();
    assert!(
        out.status.success(),
        "loading {image} into the node failed (build it first: `just image-local`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates a ProxyToken for the quickstart's Project in the workloads' namespace and
/// waits until the controller has minted it.
async fn create_token(client: &Client, token: &str, max_requests: Option<i64>) {
    let token: ProxyToken = serde_json::from_value(json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "ProxyToken",
        "metadata": {"name": token, "namespace": APPS},
        "spec": {"projectRef": {"name": "demo"}, "duration": "1h", "maxRequests": max_requests},
    }))
    .unwrap();
    let name = token.metadata.name.clone().unwrap();
    let tokens: Api<ProxyToken> = Api::namespaced(client.clone(), APPS);
    tokens.create(&PostParams::default(), &token).await.unwrap();
    support::eventually(Duration::from_secs(30), || async {
        (tokens.get(&name).await.ok()?.status?.phase? == TokenPhase::Active).then_some(())
    })
    .await;
}

/// The stand-in for the quickstart workload's python:3.12-slim: Python with the
/// official openai SDK (hack/workload-image.sh builds it once).
fn workload_image() -> String {
    let script = support::repo().join("hack/workload-image.sh");
    let out = std::process::Command::new("bash").arg(&script).output().unwrap();
    assert!(out.status.success(), "hack/workload-image.sh: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn base64(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// Counts the lines of a client pod's output by their first word.
fn tally(output: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in output.lines() {
        *counts.entry(line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")).or_default() += 1;
    }
    counts
}

/// The distinct failures in a client pod's output, first seen first.
fn failures(output: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for line in output.lines().filter(|l| l.starts_with("FAIL")) {
        if !seen.iter().any(|s| s == line) {
            seen.push(line.to_string());
        }
    }
    seen
}

/// What a workload does with the Secret in its environment, in busybox's sh: one chat
/// request with the token, to the minted base URL. `$1`: extra wget options.
const REQUEST: &str = r#"req() { wget -q -O- --header "Authorization: Bearer $OPENAI_API_KEY" --header 'Content-Type: application/json' "$@" "$OPENAI_BASE_URL/chat/completions" 2>&1; }"#;

#[tokio::test]
async fn the_chart_on_a_real_node_serves_workloads_and_survives_day_two_operations() {
    let started = Instant::now();
    support::use_node_cluster();
    let client = support::client().await;
    println!("node ready after {:.1}s", started.elapsed().as_secs_f64());
    let python = workload_image();
    for image in [image().as_str(), python.as_str()] {
        load_image(image);
    }
    let listener = tokio::net::TcpListener::bind((node_address(&client).await, 0)).await.unwrap();
    let upstream = FakeUpstream::serve(listener, true);
    // The quickstart's namespaces first: the chart goes into its llm-proxy namespace.
    let examples = support::repo().join("examples/quickstart");
    kubectl(&["apply", "-f", examples.join("00-namespaces.yaml").to_str().unwrap()]);

    // helm install: both Deployments Ready through their probes, under the chart's
    // security contexts and RBAC.
    let installing = Instant::now();
    // With the Prometheus Operator's own ServiceMonitor CRD (hack/setup.sh fetches it),
    // so the chart's ServiceMonitors are checked against its schema and then followed.
    let crd = support::cache().join("crds/prometheus-operator/monitoring.coreos.com_servicemonitors.yaml");
    assert!(crd.exists(), "{} is missing: run hack/setup.sh", crd.display());
    kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    kubectl(&["wait", "--for", "condition=Established", "crd/servicemonitors.monitoring.coreos.com"]);
    helm_deploy("install", &["--set", "serviceMonitor.enabled=true"]);
    println!("helm install --wait: {:.1}s", installing.elapsed().as_secs_f64());
    for component in ["controller", "proxy"] {
        let pods = component_pods(&client, component).await;
        assert_eq!(pods.iter().filter(|p| is_ready(p)).count(), 2, "two Ready {component} pods");
        let spec = pods[0].spec.clone().unwrap();
        let container = &spec.containers[0];
        assert_eq!(container.image.as_deref(), Some(image().as_str()));
        assert!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true), "the kubelet checked the image's user");
    }
    quickstart(&client, &upstream, &python).await;
    logs_and_metrics(&client).await;
    upgrade_under_load(&client, &python).await;
    disruption_budget_and_network_policies(&client).await;
    leader_deleted(&client).await;
    proxy_deleted_mid_burst(&client, &upstream).await;
    uninstall(&client).await;
    println!("whole test: {:.1}s", started.elapsed().as_secs_f64());
}

/// The rest of the quickstart as users apply it (the Project's upstream pointed at the
/// fake one), then examples/quickstart/30-workload.yaml as it is but for its image (no
/// registry serves python:3.12-slim here): its command installs the openai SDK (found
/// installed) and lists the models through the proxy, configured by `envFrom` alone.
async fn quickstart(client: &Client, upstream: &FakeUpstream, python: &str) {
    let examples = support::repo().join("examples/quickstart");
    let project = std::fs::read_to_string(examples.join("10-project.yaml")).unwrap();
    assert!(project.contains("url: http://127.0.0.1:18080"));
    let project = project.replace("http://127.0.0.1:18080", &upstream.url);
    let path = support::repo().join("target/test-logs/node-10-project.yaml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, project).unwrap();
    kubectl(&["apply", "-f", path.to_str().unwrap()]);
    kubectl(&["apply", "-f", examples.join("20-proxytoken.yaml").to_str().unwrap()]);

    let tokens: Api<ProxyToken> = Api::namespaced(client.clone(), APPS);
    support::eventually(support::WAIT, || async {
        let token = tokens.get("chat-app").await.ok()?;
        (token.status?.phase? == TokenPhase::Active).then_some(())
    })
    .await;
    let secret = kubectl(&["get", "secret", "chat-app", "-n", APPS, "-o", "jsonpath={.data.OPENAI_BASE_URL}"]);
    assert_eq!(base64(&secret), "http://llm-proxy-proxy.llm-proxy.svc:8080/v1", "the Service's DNS name");

    let workload = std::fs::read_to_string(examples.join("30-workload.yaml")).unwrap();
    assert!(workload.contains("image: python:3.12-slim"));
    let path = support::repo().join("target/test-logs/node-30-workload.yaml");
    std::fs::write(&path, workload.replace("image: python:3.12-slim", &format!("image: {python}"))).unwrap();
    kubectl(&["apply", "-f", path.to_str().unwrap()]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), APPS);
    let output = support::eventually(Duration::from_secs(90), || async {
        let list = pods.list(&ListParams::default().labels("app=chat-app")).await.ok()?;
        let pod = name(list.items.first()?);
        let logs = pods.logs(&pod, &LogParams::default()).await.ok()?;
        logs.contains("Model(id='fake-model'").then_some(logs)
    })
    .await;
    assert!(output.contains("Requirement already satisfied: openai"), "{output}");
    let forwarded = upstream.last_request().expect("the upstream got the request");
    assert_eq!(forwarded.path, "/v1/models");
    assert_eq!(
        forwarded.header("authorization").as_deref(),
        Some("Bearer sk-demo-0123456789abcdefghijklmnopqrstuvwxyzDEMO"),
        "the proxy swapped in the project's key"
    );
    let count = support::eventually(support::WAIT, || async {
        let status = tokens.get("chat-app").await.ok()?.status?;
        status.request_count.filter(|c| *c >= 1)
    })
    .await;
    println!("workload answered through the Service; requestCount {count}");
}

/// `kubectl logs` shows one JSON object a line, access logs included; `/metrics`
/// answers through the Service (from a pod of the release's namespace, which the
/// chart's NetworkPolicy admits).
async fn logs_and_metrics(client: &Client) {
    let mut access_lines = 0;
    for pod in component_pods(client, "proxy").await {
        let logs = kubectl(&["logs", "--namespace", NS, &name(&pod)]);
        for line in logs.lines() {
            let entry: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            access_lines += usize::from(entry["target"] == "access");
        }
    }
    assert!(access_lines >= 1, "the workload's request is in an access log");
    for pod in component_pods(client, "controller").await {
        let logs = kubectl(&["logs", "--namespace", NS, &name(&pod)]);
        assert!(logs.lines().all(|line| serde_json::from_str::<Value>(line).is_ok()), "{logs}");
    }
    let script = format!("wget -q -O- http://{RELEASE}-proxy.{NS}.svc:9090/metrics");
    start_pod(client, NS, "scrape", BUSYBOX, None, &["sh", "-c", &script]).await;
    let metrics = pod_output(client, NS, "scrape", Duration::from_secs(60)).await;
    // Either replica may answer: each has the quickstart's token in its routing table.
    for family in ["llmproxy_upstream_latency_seconds", "llmproxy_connections_open"] {
        assert!(metrics.contains(&format!("# TYPE {family} ")), "{family} missing:\n{metrics}");
    }
    let tokens = metrics.lines().find_map(|line| line.strip_prefix("llmproxy_routing_table_tokens "));
    assert_eq!(tokens, Some("1"), "{metrics}");
    scraped_as_the_service_monitors_say(client).await;
}

/// What Prometheus would scrape, found as the Prometheus Operator finds it: each of the
/// chart's ServiceMonitors selects Services by label, its endpoint names one of their
/// ports, and the targets are the ready addresses of their EndpointSlices on that port.
/// Every replica of both components must be a target, and answer with its metrics.
async fn scraped_as_the_service_monitors_say(client: &Client) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    );
    let monitors: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut targets = Vec::new();
    for component in ["proxy", "controller"] {
        let monitor = monitors.get(&format!("{RELEASE}-{component}")).await.unwrap();
        let spec = &monitor.data["spec"];
        let selector = spec["selector"]["matchLabels"].as_object().unwrap();
        let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap())).collect();
        let (port, path) =
            (spec["endpoints"][0]["port"].as_str().unwrap(), spec["endpoints"][0]["path"].as_str().unwrap());
        let found = support::eventually(Duration::from_secs(60), || async {
            let selected = services.list(&ListParams::default().labels(&selector.join(","))).await.ok()?.items;
            let mut found = Vec::new();
            for service in &selected {
                let by_service = format!("kubernetes.io/service-name={}", service.metadata.name.as_deref().unwrap());
                for slice in slices.list(&ListParams::default().labels(&by_service)).await.ok()?.items {
                    let Some(number) = slice.ports.iter().flatten().find(|p| p.name.as_deref() == Some(port)) else {
                        continue;
                    };
                    for endpoint in
                        slice.endpoints.iter().filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                    {
                        found.push(format!("http://{}:{}{path}", endpoint.addresses[0], number.port.unwrap()));
                    }
                }
            }
            // Two replicas of each component, and nothing else selected.
            (selected.len() == 1 && found.len() == 2).then_some(found)
        })
        .await;
        targets.extend(found.into_iter().map(|url| (component, url)));
    }
    // One pod of the release's namespace (the NetworkPolicies admit it) scrapes them all.
    let script: String = targets.iter().map(|(_, url)| format!("echo '=== {url}'; wget -q -O- {url}; ")).collect();
    start_pod(client, NS, "scrape-targets", BUSYBOX, None, &["sh", "-c", &script]).await;
    let output = pod_output(client, NS, "scrape-targets", Duration::from_secs(60)).await;
    let mut reconciles = 0;
    for (component, url) in &targets {
        let text = output.split(&format!("=== {url}\n")).nth(1).unwrap().split("=== ").next().unwrap();
        assert!(text.ends_with("# EOF\n"), "{component} at {url} answered:\n{text}");
        // Each proxy replica routes the quickstart's token; of the controllers, the leader
        // has reconciled it (the other has nothing to count yet).
        if *component == "proxy" {
            assert!(text.contains("\nllmproxy_routing_table_tokens 1\n"), "proxy at {url}:\n{text}");
        }
        let open =
            text.lines().find_map(|line| line.strip_prefix("process_open_fds ")).map(|v| v.parse::<f64>().unwrap());
        assert!(open.is_some_and(|open| open > 0.0), "{component} at {url}:\n{text}");
        if *component == "controller" {
            reconciles += text.lines().filter(|line| line.starts_with("llmproxy_controller_reconciles_total{")).count();
        }
    }
    assert!(reconciles > 0, "the leader's reconciles are among the controller targets' metrics:\n{output}");
    println!("{} targets scraped as the ServiceMonitors select them", targets.len());
}

/// Two workloads keep requests and 2-second streams going through the Service while
/// `helm upgrade` rolls the proxy: busybox's wget (a new connection each time, no
/// retries) and the openai SDK (pooled keep-alive connections, its default retries).
/// No request fails and every stream completes.
async fn upgrade_under_load(client: &Client, python: &str) {
    let before: Vec<String> = component_pods(client, "proxy").await.iter().map(name).collect();
    create_token(client, "steady", None).await;
    let script = format!(
        r#"{REQUEST}
end=$(( $(date +%s) + 40 ))
chat() {{ while [ "$(date +%s)" -lt "$end" ]; do out=$(req --post-data '{{"model":"m","messages":[]}}'); case "$out" in *'{ANSWER}'*) echo "ok chat";; *) echo "FAIL chat $out";; esac; sleep 0.05; done; }}
stream() {{ while [ "$(date +%s)" -lt "$end" ]; do out=$(req --header 'x-fake-chunks: 20' --header 'x-fake-chunk-delay-ms: 100' --post-data '{{"model":"m","messages":[],"stream":true}}'); case "$out" in *chunk19*'[DONE]'*) echo "ok stream";; *) echo "FAIL stream $out";; esac; done; }}
chat & chat & stream & stream & wait"#
    );
    start_pod(client, APPS, "steady", BUSYBOX, Some("steady"), &["sh", "-c", &script]).await;
    let sdk_load = SDK_LOAD.replace("ANSWER", ANSWER);
    start_pod(client, APPS, "steady-sdk", python, Some("steady"), &["python3", "-c", &sdk_load]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), APPS);
    for (pod, wanted) in [("steady", ["ok chat", "ok stream"]), ("steady-sdk", ["ok sdk-chat", "ok sdk-stream"])] {
        support::eventually(Duration::from_secs(60), || async {
            let logs = pods.logs(pod, &LogParams::default()).await.ok()?;
            wanted.iter().all(|w| logs.contains(w)).then_some(())
        })
        .await;
    }

    let rolling = Instant::now();
    helm_deploy("upgrade", &["--reuse-values", "--set", "proxy.logLevel=debug"]);
    // The old pods are gone (their shutdown delay and drain over) while the load runs.
    support::eventually(Duration::from_secs(60), || async {
        let now: Vec<String> = component_pods(client, "proxy").await.iter().map(name).collect();
        (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
    })
    .await;
    let rolled = rolling.elapsed();
    for pod in ["steady", "steady-sdk"] {
        assert_eq!(pod_phase(client, APPS, pod).await, "Running", "the rollout ended before {pod}'s load did");
    }
    let mut output = pod_output(client, APPS, "steady", Duration::from_secs(90)).await;
    output += &pod_output(client, APPS, "steady-sdk", Duration::from_secs(90)).await;
    let counts = tally(&output);
    println!("rolled the proxy in {:.1}s under load: {counts:?}", rolled.as_secs_f64());
    assert_eq!(failures(&output), Vec::<String>::new(), "requests failed during the rollout: {counts:?}");
    for (what, least) in [("ok chat", 50), ("ok stream", 20), ("ok sdk-chat", 50), ("ok sdk-stream", 20)] {
        assert!(counts.get(what).copied().unwrap_or(0) >= least, "{counts:?}");
    }
}

/// The SDK's side of the load: two threads of chat completions, two of streams, for 40 s.
const SDK_LOAD: &str = r#"
import threading, time
import openai

client = openai.OpenAI()  # OPENAI_API_KEY and OPENAI_BASE_URL from envFrom
end = time.time() + 40
lock = threading.Lock()

def say(line):
    with lock:
        print(line, flush=True)

def chat():
    while time.time() < end:
        try:
            answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            text = answer.choices[0].message.content
            say("ok sdk-chat" if text == "ANSWER" else f"FAIL sdk-chat {text!r}")
        except Exception as e:
            say(f"FAIL sdk-chat {type(e).__name__}: {e}")
        time.sleep(0.05)

def stream():
    while time.time() < end:
        try:
            chunks = client.chat.completions.create(
                model="m", messages=[], stream=True,
                extra_headers={"x-fake-chunks": "20", "x-fake-chunk-delay-ms": "100"})
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            say("ok sdk-stream" if "chunk19" in text else f"FAIL sdk-stream {text!r}")
        except Exception as e:
            say(f"FAIL sdk-stream {type(e).__name__}: {e}")

threads = [threading.Thread(target=f) for f in (chat, chat, stream, stream)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"#;

/// The chart's PodDisruptionBudget is applied and enforced by the API server: of the
/// two proxy pods a drain may evict one, which leaves no disruption allowed until the
/// replacement is Ready. Its NetworkPolicies are applied too; the bridge CNI plugin
/// does not enforce them (the README says so), so nothing here claims they filter.
async fn disruption_budget_and_network_policies(client: &Client) {
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    support::eventually(Duration::from_secs(60), || async {
        let status = budgets.get(&format!("{RELEASE}-proxy")).await.ok()?.status?;
        (status.current_healthy == 2 && status.disruptions_allowed == 1).then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let proxies: Vec<String> = component_pods(client, "proxy").await.iter().map(name).collect();
    pods.evict(&proxies[0], &EvictParams::default()).await.expect("one proxy pod may be evicted");
    // That disruption is taken out of the budget (by the API server's eviction, then by
    // the disruption controller counting one healthy pod): none is left until the
    // replacement is Ready.
    let after = budgets.get(&format!("{RELEASE}-proxy")).await.unwrap().status.unwrap();
    assert_eq!(after.disruptions_allowed, 0, "{after:?}");
    support::eventually(Duration::from_secs(60), || async {
        let ready = component_pods(client, "proxy").await.iter().filter(|p| is_ready(p)).count();
        (ready == 2).then_some(())
    })
    .await;
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), NS).list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> = policies.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
    names.sort();
    assert_eq!(names, [format!("{RELEASE}-controller"), format!("{RELEASE}-proxy")]);
}

/// Deleting the leading controller pod: another takes the Lease and minting goes on.
async fn leader_deleted(client: &Client) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
    let leader = holder(leases.get("llm-proxy-controller").await.unwrap()).expect("a leader");
    let deleting = Instant::now();
    Api::<Pod>::namespaced(client.clone(), NS).delete(&leader, &DeleteParams::default()).await.unwrap();
    let next = support::eventually(Duration::from_secs(60), || async {
        holder(leases.get("llm-proxy-controller").await.ok()?).filter(|h| *h != leader)
    })
    .await;
    let took_over = deleting.elapsed();
    create_token(client, "after-failover", None).await;
    println!("leader {leader} deleted; {next} leads after {:.1}s and mints", took_over.as_secs_f64());
}

/// A proxy pod deleted while a burst runs on a capped token: the cap holds, and what
/// the upstream served is what the token counts.
async fn proxy_deleted_mid_burst(client: &Client, upstream: &FakeUpstream) {
    const CAP: i64 = 40;
    create_token(client, "capped", Some(CAP)).await;
    let tokens: Api<ProxyToken> = Api::namespaced(client.clone(), APPS);
    let forwarded_before = upstream.requests().iter().filter(|r| r.header("x-burst").is_some()).count();
    // 8 clients × 12 requests, each held 1 s by the upstream: 96 tries for 40, the
    // answered ones taking about 5 s, through the deleted pod's shutdown.
    let script = format!(
        r#"{REQUEST}
one() {{ i=0; while [ $i -lt 12 ]; do i=$((i+1)); out=$(req --header 'x-burst: 1' --header 'x-fake-delay-ms: 1000' --post-data '{{"model":"m","messages":[]}}'); case "$out" in *'{ANSWER}'*) echo "ok";; *' 429 '*) echo "refused";; *) echo "FAIL $out";; esac; done; }}
one & one & one & one & one & one & one & one & wait"#
    );
    start_pod(client, APPS, "burst", BUSYBOX, Some("capped"), &["sh", "-c", &script]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), APPS);
    support::eventually(Duration::from_secs(60), || async {
        let logs = pods.logs("burst", &LogParams::default()).await.ok()?;
        (logs.lines().filter(|l| *l == "ok").count() >= 8).then_some(())
    })
    .await;
    let victim = name(&component_pods(client, "proxy").await[0]);
    Api::<Pod>::namespaced(client.clone(), NS).delete(&victim, &DeleteParams::default()).await.unwrap();
    let output = pod_output(client, APPS, "burst", Duration::from_secs(120)).await;
    let counts = tally(&output);
    let served = counts.get("ok").copied().unwrap_or(0) as i64;
    assert_eq!(failures(&output), Vec::<String>::new(), "only answers and refusals: {counts:?}");
    assert!(served <= CAP, "the cap held across the deletion: {counts:?}");
    let forwarded = upstream.requests().iter().filter(|r| r.header("x-burst").is_some()).count() - forwarded_before;
    assert_eq!(forwarded as i64, served, "the upstream saw exactly the answered requests");
    let counted = support::eventually(Duration::from_secs(30), || async {
        tokens.get("capped").await.ok()?.status?.request_count.filter(|c| *c == served)
    })
    .await;
    println!("deleted {victim} mid-burst: {counts:?}, requestCount {counted} of {CAP}");
}

/// `helm uninstall` removes the operator and keeps the CRDs, Projects and ProxyTokens.
async fn uninstall(client: &Client) {
    helm(&["uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "120s"]);
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS).list(&ListParams::default()).await.unwrap();
    assert!(deployments.items.is_empty(), "the operator is gone");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ["projects.llmproxy.io", "proxytokens.llmproxy.io", "pricelists.llmproxy.io"] {
        assert!(crds.get(crd).await.is_ok(), "{crd} is kept");
    }
    assert!(Api::<Project>::all(client.clone()).get("demo").await.is_ok(), "the Project is kept");
    assert!(Api::<ProxyToken>::namespaced(client.clone(), APPS).get("chat-app").await.is_ok());
}
