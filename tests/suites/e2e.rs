//! The cluster tier, against a real API server (`LICHEN_E2E_KUBECONFIG`): the agent joins with node
//! credentials under the Node authorizer and NodeRestriction, and what `kubectl` shows is checked.
//! Run: `cargo test -p lichen-tests --features e2e --test e2e` (CI starts a 1.20 control plane first).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use lichen_tests::cluster::Cluster;
use lichen_tests::{Agent, Scratch, wait_for, wait_for_async};

const T: Duration = Duration::from_secs(60);

fn condition(node: &Node, kind: &str) -> Option<(String, Option<String>)> {
    let c = node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == kind)?;
    Some((c.status.clone(), c.reason.clone()))
}

async fn start_node(cluster: &Cluster, name: &str, tables: &str) -> (Scratch, Agent) {
    start_node_modules(cluster, name, tables, "").await
}

/// [`start_node`] with extra `[modules]` settings.
async fn start_node_modules(cluster: &Cluster, name: &str, tables: &str, modules: &str) -> (Scratch, Agent) {
    cluster.delete_node(name).await;
    let s = Scratch::new("");
    let kc = cluster.node_kubeconfig(name, s.dir.path()).await;
    // Top-level keys first: anything after a [table] header would land inside that table. Disk
    // pressure is off: these scenarios are about scheduling, and a build machine's disk is not a board's.
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n{tables}\n{}{modules}",
        s.state.display().to_string(),
        kc.display().to_string(),
        s.modules_table()
    );
    std::fs::write(&s.config, config).expect("config");
    let agent = s.start();
    (s, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_registers_with_what_the_scheduler_needs_and_heartbeats() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-register";
    let (_s, agent) = start_node(&cluster, name, "[node_labels]\n\"acme.io/site\" = \"barn-3\"\n").await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node = wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (condition(&n, "Ready")?.0 == "True").then_some(n)
    })
    .await;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("lichen.dev/runtime").map(String::as_str), Some("wasm"));
    assert_eq!(labels.get("kubernetes.io/hostname").map(String::as_str), Some(name));
    assert_eq!(labels.get("acme.io/site").map(String::as_str), Some("barn-3"));
    let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    assert!(taints.iter().any(|t| t.key == "lichen.dev/runtime" && t.effect == "NoSchedule"), "{taints:?}");
    let status = node.status.clone().expect("status");
    assert_eq!(status.allocatable.as_ref().and_then(|a| a.get("pods")).map(|q| q.0.as_str()), Some("110"));
    let info = status.node_info.expect("nodeInfo");
    assert!(info.container_runtime_version.starts_with("wasmtime://"), "{info:?}");
    assert_eq!(info.operating_system, "linux");
    let addrs = status.addresses.unwrap_or_default();
    assert!(addrs.iter().any(|a| a.type_ == "InternalIP" && a.address == "127.0.0.1"), "{addrs:?}");
    for kind in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert!(condition(&node, kind).is_some(), "{kind} reported");
    }

    // The heartbeat creates the Lease beside the status writer, so it may come a moment after Ready
    // (it did in CI): wait for it rather than read it once.
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), "kube-node-lease");
    let lease = wait_for_async(T, "the node's Lease", || async { leases.get(name).await.ok() }).await;
    let spec = lease.spec.clone().expect("lease spec");
    assert_eq!((spec.holder_identity.as_deref(), spec.lease_duration_seconds), (Some(name), Some(40)));
    let owner = lease.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.uid.as_str()), node.metadata.uid.as_deref(), "owned by the Node");
    let first = spec.renew_time.expect("renewTime").0;
    let renewed = wait_for_async(Duration::from_secs(25), "the lease to be renewed", || async {
        let t = leases.get(name).await.ok()?.spec?.renew_time?.0;
        (t > first).then_some(t)
    })
    .await;
    let gap = renewed.duration_since(first).as_secs_f64();
    assert!((8.0..=15.0).contains(&gap), "renewed every ~10 s, saw {gap}s");
    assert!(
        !agent.log().iter().any(|l| l.contains("WARN") || l.contains("ERROR")),
        "{}",
        agent.log().join("\n")
    );
    let (status, _) = agent.stop();
    assert!(status.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_makes_the_node_not_ready_and_starting_makes_it_ready_again() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-restart";
    let (s, agent) = start_node(&cluster, name, "").await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let ready = |want: &'static str| {
        let nodes = nodes.clone();
        async move {
            wait_for_async(T, &format!("Ready={want}"), || async {
                let n = nodes.get(name).await.ok()?;
                let c = condition(&n, "Ready")?;
                (c.0 == want).then_some(c)
            })
            .await
        }
    };
    ready("True").await;
    let (status, _) = agent.stop();
    assert!(status.success());
    let (_, reason) = ready("False").await;
    assert_eq!(reason.as_deref(), Some("KubeletNotReady"));

    // An admin's taint survives re-registration; Lichen's labels come back if removed.
    let admin_taint = serde_json::json!({"spec": {"taints": [
        {"key": "lichen.dev/runtime", "value": "wasm", "effect": "NoSchedule"},
        {"key": "acme.io/maintenance", "effect": "NoSchedule"}]}});
    nodes
        .patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&admin_taint))
        .await
        .expect("admin taints the node");
    let agent = s.start();
    ready("True").await;
    let node = nodes.get(name).await.expect("node");
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(taints.iter().any(|t| t.key == "acme.io/maintenance"), "admin taint kept: {taints:?}");
    assert!(agent.log().iter().any(|l| l.contains("node registered")));
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_places_tolerating_pods_and_keeps_others_away() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-sched";
    let (_s, agent) = ready_node(&cluster, name).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod = |pod_name: &str, tolerate: bool| -> Pod {
        let tolerations = if tolerate {
            serde_json::json!([{"key": "lichen.dev/runtime", "operator": "Equal", "value": "wasm", "effect": "NoSchedule"}])
        } else {
            serde_json::json!([])
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": pod_name},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": name},
                "tolerations": tolerations,
                "automountServiceAccountToken": false,
                "containers": [{"name": "m", "image": "file:///opt/modules/hello.wasm"}]
            }
        }))
        .expect("pod")
    };
    for (p, tol) in [("lichen-e2e-wasm", true), ("lichen-e2e-plain", false)] {
        create_fresh(&pods, &pod(p, tol)).await;
    }
    let bound = wait_for_async(T, "the tolerating pod to be bound", || async {
        pods.get("lichen-e2e-wasm").await.ok()?.spec?.node_name
    })
    .await;
    assert_eq!(bound, name);
    // Not "unbound after a while", which a slow scheduler would pass too: the scheduler's own
    // verdict on the pod, PodScheduled=False with reason Unschedulable and the taint in its message.
    let message = wait_for_async(T, "the scheduler to find the ordinary pod unschedulable", || async {
        let status = pods.get("lichen-e2e-plain").await.ok()?.status?;
        let c = status.conditions?.into_iter().find(|c| c.type_ == "PodScheduled")?;
        (c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
            .then(|| c.message.unwrap_or_default())
    })
    .await;
    assert!(message.contains("didn't tolerate"), "the taint is the reason: {message}");
    let plain = pods.get("lichen-e2e-plain").await.expect("pod");
    assert_eq!(plain.spec.and_then(|s| s.node_name), None, "the taint keeps ordinary pods off the node");
    for p in ["lichen-e2e-wasm", "lichen-e2e-plain"] {
        let _ = pods.delete(p, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    }
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

async fn ready_node(cluster: &Cluster, name: &str) -> (Scratch, Agent) {
    let (s, agent) = start_node(cluster, name, "").await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (condition(&n, "Ready")?.0 == "True").then_some(())
    })
    .await;
    (s, agent)
}

/// Creates `pod`, first removing one of the same name left by an earlier run.
async fn create_fresh(pods: &Api<Pod>, pod: &Pod) {
    let name = pod.metadata.name.clone().expect("pod name");
    let _ = pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    wait_for_async(T, "the old pod to go", || async {
        pods.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await;
    pods.create(&PostParams::default(), pod).await.expect("create pod");
}

fn wasm_pod_template(node: &str, image: &str, extra_container: serde_json::Value) -> serde_json::Value {
    let mut container = serde_json::json!({"name": "main", "image": image});
    if let (Some(c), Some(extra)) = (container.as_object_mut(), extra_container.as_object()) {
        c.extend(extra.clone());
    }
    serde_json::json!({
        "nodeSelector": {"kubernetes.io/hostname": node, "lichen.dev/runtime": "wasm"},
        "tolerations": [{"key": "lichen.dev/runtime", "operator": "Equal", "value": "wasm", "effect": "NoSchedule"}],
        "automountServiceAccountToken": false,
        "containers": [container]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_runs_on_the_node_and_scales_to_zero_gracefully() {
    use k8s_openapi::api::apps::v1::Deployment;
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-deploy";
    let (_s, agent) = ready_node(&cluster, name).await;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let _ = deployments.delete(name, &DeleteParams::default()).await;
    let image = format!("file://{}", lichen_tests::fixture("sleeper.wat").display());
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": wasm_pod_template(name, &image, serde_json::json!({}))}
        }
    }))
    .expect("deployment");
    deployments.create(&PostParams::default(), &deployment).await.expect("create deployment");
    let lp = kube::api::ListParams::default().labels(&format!("app={name}"));
    let running = wait_for_async(T, "both replicas Running and Ready", || async {
        let list = pods.list(&lp).await.ok()?;
        let ready = list.items.iter().filter(|p| {
            let st = p.status.as_ref();
            st.and_then(|s| s.phase.as_deref()) == Some("Running")
                && st
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        (ready.count() == 2).then_some(list.items)
    })
    .await;
    for p in &running {
        assert_eq!(p.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(name));
        let st = p.status.clone().expect("status");
        assert_eq!(st.host_ip.as_deref(), Some("127.0.0.1"));
        let c = &st.container_statuses.expect("containerStatuses")[0];
        assert!(c.ready && c.image_id.starts_with("sha256:"), "{c:?}");
        assert!(c.state.as_ref().and_then(|s| s.running.as_ref()).is_some(), "{c:?}");
        assert!(st.start_time.is_some());
    }

    let scale = serde_json::json!({"spec": {"replicas": 0}});
    deployments
        .patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&scale))
        .await
        .expect("scale");
    wait_for_async(T, "the pods to be gone", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    let log = agent.log();
    assert_eq!(log.iter().filter(|l| l.contains("pod deleted")).count(), 2, "{}", log.join("\n"));
    let _ = deployments.delete(name, &DeleteParams::default()).await;
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_lichen_cannot_run_fails_with_a_readable_reason() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-refuse";
    let (_s, agent) = ready_node(&cluster, name).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod_name = "lichen-e2e-ports";
    let image = format!("file://{}", lichen_tests::fixture("hello.wat").display());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pod_name},
        "spec": wasm_pod_template(name, &image, serde_json::json!({"ports": [{"containerPort": 8080}]}))
    }))
    .expect("pod");
    create_fresh(&pods, &pod).await;
    let status = wait_for_async(T, "the pod to fail", || async {
        let st = pods.get(pod_name).await.ok()?.status?;
        (st.phase.as_deref() == Some("Failed")).then_some(st)
    })
    .await;
    assert_eq!(status.reason.as_deref(), Some("UnsupportedPodSpec"));
    let msg = status.message.unwrap_or_default();
    assert!(msg.contains("spec.containers[0].ports") && msg.contains("cannot listen"), "{msg}");
    let _ =
        pods.delete(pod_name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_registers_again() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-reregister";
    let (_s, agent) = ready_node(&cluster, name).await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let old = nodes.get(name).await.expect("node").metadata.uid;
    cluster.delete_node(name).await;
    let new = wait_for_async(T, "the node to come back", || async {
        let n = nodes.get(name).await.ok()?;
        (n.metadata.uid != old && condition(&n, "Ready")?.0 == "True").then_some(n.metadata.uid)
    })
    .await;
    assert!(new.is_some());
    agent.wait_log(&["registering again"], T);
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_maps_secrets_and_the_service_account_token_reach_the_module() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-config";
    let (s, agent) = ready_node(&cluster, name).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), "default");
    let (cm_name, secret_name, pod_name) = ("lichen-e2e-cfg", "lichen-e2e-secret", "lichen-e2e-config");
    let _ = cms.delete(cm_name, &DeleteParams::default()).await;
    let _ = secrets.delete(secret_name, &DeleteParams::default()).await;
    let hello = format!("file://{}", lichen_tests::fixture("hello.wat").display());
    let probe = format!("file://{}", lichen_tests::fixture("fsprobe.wat").display());
    let mut spec = wasm_pod_template(
        name,
        &hello,
        serde_json::json!({
            "name": "env",
            "env": [
                {"name": "GREETING_CM", "valueFrom": {"configMapKeyRef": {"name": cm_name, "key": "greeting"}}},
                {"name": "GREETING_SECRET", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "password"}}}
            ],
            "envFrom": [{"configMapRef": {"name": cm_name}, "prefix": "GREETING_FROM_"}]
        }),
    );
    // The service account admission plugin mounts the token into every container after these
    // mounts, so the config volume is preopen 3 and the token's volume preopen 4.
    spec["automountServiceAccountToken"] = serde_json::json!(true);
    spec["restartPolicy"] = serde_json::json!("Never");
    spec["volumes"] = serde_json::json!([{"name": "cfg", "configMap": {"name": cm_name}}]);
    let mount = serde_json::json!([{"name": "cfg", "mountPath": "/cfg"}]);
    spec["containers"].as_array_mut().expect("containers").extend([
        serde_json::json!({"name": "files", "image": probe, "args": ["read", "3", "app.toml"], "volumeMounts": mount}),
        serde_json::json!({"name": "token", "image": probe, "args": ["read", "4", "token"], "volumeMounts": mount}),
    ]);
    let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": pod_name}, "spec": spec}))
        .expect("pod");
    create_fresh(&pods, &pod).await;

    // Before the ConfigMap exists the pod waits, saying why, as on a kubelet. (The Node authorizer
    // learns of a pod's references from its own informer, a moment after the bind: a first fetch
    // may be refused with "no relationship found", and the retry then finds the object missing.)
    let not_found = format!("configmap \"{cm_name}\" not found");
    wait_for_async(T, "the pod to wait for its ConfigMap", || async {
        let st = pods.get(pod_name).await.ok()?.status?;
        let c = st.container_statuses?.into_iter().find(|c| c.name == "env")?;
        let w = c.state?.waiting?;
        (w.reason.as_deref() == Some("CreateContainerConfigError")
            && w.message.as_deref().is_some_and(|m| m.contains(&not_found)))
        .then_some(())
    })
    .await;
    assert_eq!(
        pods.get(pod_name).await.expect("pod").status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );

    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": cm_name},
        "data": {"greeting": "hi from a configmap", "app.toml": "x = 1"}
    }))
    .expect("configmap");
    cms.create(&PostParams::default(), &cm).await.expect("create configmap");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": secret_name},
        "stringData": {"password": "hunter2"}
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("create secret");
    let status = wait_for_async(T, "the pod to succeed", || async {
        let st = pods.get(pod_name).await.ok()?.status?;
        matches!(st.phase.as_deref(), Some("Succeeded" | "Failed")).then_some(st)
    })
    .await;
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{status:#?}\n{}", agent.log().join("\n"));

    let env = s.pod_output(pod_name, "env", 0);
    for want in [
        "GREETING_CM=hi from a configmap",
        "GREETING_SECRET=hunter2",
        "GREETING_FROM_greeting=hi from a configmap",
    ] {
        assert!(env.iter().any(|l| l == want), "{want} in {env:?}");
    }
    assert_eq!(s.pod_output(pod_name, "files", 0), ["ok x = 1"]);
    let token = s.pod_output(pod_name, "token", 0);
    assert!(token.first().is_some_and(|t| t.starts_with("ok ey")), "a JWT: {token:?}");
    assert!(!agent.log().iter().any(|l| l.contains("hunter2")), "secret values never reach the agent's log");

    let _ =
        pods.delete(pod_name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    let _ = cms.delete(cm_name, &DeleteParams::default()).await;
    let _ = secrets.delete(secret_name, &DeleteParams::default()).await;
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

/// `reason: message` of every event about the object (a pod, a node) `name` with `uid`, as
/// `kubectl describe` lists them.
async fn events_about(cluster: &Cluster, name: &str, uid: &str) -> Vec<(String, String, i32)> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    let lp = kube::api::ListParams::default()
        .fields(&format!("involvedObject.name={name},involvedObject.uid={uid}"));
    events
        .list(&lp)
        .await
        .map(|l| {
            l.items
                .into_iter()
                .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default(), e.count.unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_the_events_of_a_pods_life() {
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-events";
    let (_s, agent) = ready_node(&cluster, name).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let module = |f: &str| format!("file://{}", lichen_tests::fixture(f).display());
    let mut spin = wasm_pod_template(name, &module("loop.wat"), serde_json::json!({}));
    spin["restartPolicy"] = serde_json::json!("OnFailure");
    let spin: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lichen-e2e-spin", "annotations": {"lichen.dev/fuel": "100000"}},
        "spec": spin
    }))
    .expect("pod");
    let sleeper: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lichen-e2e-sleeper"},
        "spec": wasm_pod_template(name, &module("sleeper.wat"), serde_json::json!({}))
    }))
    .expect("pod");
    create_fresh(&pods, &spin).await;
    create_fresh(&pods, &sleeper).await;
    let uid = |p: Pod| p.metadata.uid.unwrap_or_default();
    let spin_uid = uid(pods.get("lichen-e2e-spin").await.expect("spin"));
    let sleeper_uid = uid(pods.get("lichen-e2e-sleeper").await.expect("sleeper"));

    let spin_events = wait_for_async(T, "OutOfFuel and BackOff events", || async {
        let ev = events_about(&cluster, "lichen-e2e-spin", &spin_uid).await;
        let has = |r: &str| ev.iter().any(|(reason, _, _)| reason == r);
        (has("OutOfFuel") && has("BackOff")).then_some(ev)
    })
    .await;
    for reason in ["Pulled", "Created", "Started"] {
        assert!(spin_events.iter().any(|(r, _, _)| r == reason), "{reason} in {spin_events:?}");
    }
    let fuel = spin_events.iter().find(|(r, _, _)| r == "OutOfFuel").expect("OutOfFuel");
    assert!(fuel.1.contains("fuel budget of 100000"), "{fuel:?}");

    wait_for_async(T, "the sleeper to run", || async {
        let st = pods.get("lichen-e2e-sleeper").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    pods.delete("lichen-e2e-sleeper", &DeleteParams::default()).await.expect("delete");
    let killing = wait_for_async(T, "a Killing event", || async {
        let ev = events_about(&cluster, "lichen-e2e-sleeper", &sleeper_uid).await;
        ev.into_iter().find(|(r, _, _)| r == "Killing")
    })
    .await;
    assert_eq!(killing.1, "Stopping container main");

    let _ = pods
        .delete("lichen-e2e-spin", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await;
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_pulls_its_module_from_a_private_registry_with_a_pull_secret() {
    use k8s_openapi::api::apps::v1::Deployment;
    use lichen_tests::registry::{Registry, WASM_CONFIG_V0, WASM_LAYER, sha256_digest};
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-pull";
    let reg = Registry::start_with_auth("edge", "s3cret-pw");
    let module = wat::parse_file(lichen_tests::fixture("sleeper.wat")).expect("fixture");
    reg.push_artifact("acme/sleeper", "1.0", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &module)]);
    let modules = format!("insecure_registries = [{:?}]\n", reg.host());
    let (s, agent) = start_node_modules(&cluster, name, "", &modules).await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (condition(&n, "Ready")?.0 == "True").then_some(())
    })
    .await;

    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), "default");
    let secret_name = "lichen-e2e-regcred";
    let _ = secrets.delete(secret_name, &DeleteParams::default()).await;
    let auth = serde_json::json!({"auths": {reg.host(): {"username": "edge", "password": "s3cret-pw"}}});
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": secret_name},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": auth.to_string()},
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("secret");

    let image = format!("{}/acme/sleeper:1.0", reg.host());
    let mut spec = wasm_pod_template(name, &image, serde_json::json!({}));
    spec["imagePullSecrets"] = serde_json::json!([{"name": secret_name}]);
    // A label of this run's own, so a pod left by an earlier run (on a node of the same name) is
    // never mistaken for this one's.
    let run = format!("r{:08x}", fastrand::u32(..));
    let deploy: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lichen-e2e-private"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "lichen-e2e-private", "run": run}},
            "template": {"metadata": {"labels": {"app": "lichen-e2e-private", "run": run}}, "spec": spec}
        }
    }))
    .expect("deployment");
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), "default");
    let _ = deploys.delete("lichen-e2e-private", &DeleteParams::default()).await;
    wait_for_async(T, "an old deployment to go", || async {
        deploys.get_opt("lichen-e2e-private").await.ok()?.is_none().then_some(())
    })
    .await;
    deploys.create(&PostParams::default(), &deploy).await.expect("deployment");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let lp = kube::api::ListParams::default().labels(&format!("app=lichen-e2e-private,run={run}"));
    let running = wait_for_async(Duration::from_secs(60), "the private pod Running", || async {
        let list = pods.list(&lp).await.ok()?;
        list.items.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .is_some_and(|c| c.ready && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
    })
    .await;
    let c = &running.status.as_ref().and_then(|s| s.container_statuses.clone()).expect("statuses")[0];
    assert_eq!(c.image_id, sha256_digest(&module), "imageID is the module digest");
    let pod_name = running.metadata.name.clone().expect("name");
    wait_for(T, "ticks from the pulled module", || {
        s.pod_output(&pod_name, "main", 0).iter().any(|l| l.starts_with("tick")).then_some(())
    });
    let uid = running.metadata.uid.clone().expect("uid");
    let events = events_about(&cluster, &pod_name, &uid).await;
    assert!(
        events
            .iter()
            .any(|(reason, message, _)| reason == "Pulled" && message.contains("Successfully pulled")),
        "{events:?}"
    );
    let _ = deploys.delete("lichen-e2e-private", &DeleteParams::default()).await;
    let _ = secrets.delete(secret_name, &DeleteParams::default()).await;
    assert!(agent.stop().0.success());
    cluster.delete_node(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_joins_with_the_bootstrap_token_and_its_csr_is_auto_approved() {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    use kube::api::{ListParams, Patch, PatchParams};
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-join";
    cluster.delete_node(name).await;
    let s = Scratch::new("");
    let (server, ca) = cluster.server_and_ca();
    std::fs::write(s.dir.path().join("ca.crt"), ca).expect("ca");
    std::fs::create_dir_all(&s.state).expect("state");
    std::fs::write(s.state.join("bootstrap-token"), cluster.bootstrap_token()).expect("token");
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\n[join]\nserver = {server:?}\nca_cert = \"ca.crt\"\n",
        s.state.display().to_string(),
    );
    std::fs::write(&s.config, config).expect("config");
    let agent = s.start();
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_for_async(T, "the joined node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (condition(&n, "Ready")?.0 == "True").then_some(n)
    })
    .await;

    // The controller-manager approved the CSR by itself: 1.20's approver took the usages.
    let csrs: Api<CertificateSigningRequest> = Api::all(cluster.client.clone());
    let prefix = format!("node-csr-{name}-");
    let ours: Vec<CertificateSigningRequest> = csrs
        .list(&ListParams::default())
        .await
        .expect("csrs")
        .items
        .into_iter()
        .filter(|c| c.metadata.name.as_deref().is_some_and(|n| n.starts_with(&prefix)))
        .collect();
    let newest = ours.iter().max_by_key(|c| c.metadata.creation_timestamp.clone()).expect("the node's CSR");
    let status = newest.status.clone().expect("status");
    let approved = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Approved");
    assert_eq!(approved.and_then(|c| c.reason).as_deref(), Some("AutoApproved"), "{newest:?}");
    assert!(status.certificate.is_some());
    assert!(newest.spec.username.as_deref().is_some_and(|u| u.starts_with("system:bootstrap:")));

    // Its kubeconfig works as the node, and only as the node.
    let node_client =
        lichen::cluster::client::connect(&s.state.join("node.kubeconfig")).await.expect("node kubeconfig");
    let as_node: Api<Node> = Api::all(node_client);
    as_node.get(name).await.expect("a node reads its own Node");
    let other = "lichen-e2e-join-other";
    let _ = nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": other}})).expect("node"),
        )
        .await;
    let refused = as_node
        .patch(
            other,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect_err("patching another node");
    assert!(matches!(&refused, kube::Error::Api(s) if s.code == 403), "{refused:?}");
    assert!(!s.state.join("bootstrap-token").exists(), "the token is deleted after the join");

    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    assert!(
        !log.iter().any(|l| l.contains(cluster.bootstrap_token().split('.').nth(1).unwrap_or("-"))),
        "token logged"
    );
    let _ = nodes.delete(other, &DeleteParams::default()).await;
    cluster.delete_node(name).await;
}

/// A fresh node `name` with node credentials and its kubelet API on a free port, once Ready: its
/// scratch layout, the agent, the port and the Node as the API server has it.
async fn ready_kubelet_node(cluster: &Cluster, name: &str) -> (Scratch, lichen_tests::Agent, u16, Node) {
    cluster.delete_node(name).await;
    let s = Scratch::new("");
    let kc = cluster.node_kubeconfig(name, s.dir.path()).await;
    let port = lichen_tests::free_port();
    let agent = lichen_tests::start_kubelet_node(&s, name, &kc, port);
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node = wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (condition(&n, "Ready")?.0 == "True").then_some(n)
    })
    .await;
    (s, agent, port, node)
}

/// `kubectl logs` through the real API server: it dials the node's Hostname address and kubelet
/// port with its kubelet client certificate; Lichen authenticates it against the cluster CA and has
/// the API server authorize it (SubjectAccessReview) before streaming the log. `exec` is refused
/// with a message, and a kubelet-serving CSR approved by the operator replaces the self-signed
/// certificate without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reaches_the_node_through_the_api_server() {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    use kube::api::{ListParams, LogParams};
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-logs";
    let (s, agent, port, node) = ready_kubelet_node(&cluster, name).await;
    let endpoint = node
        .status
        .as_ref()
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref());
    assert_eq!(endpoint.map(|e| e.port), Some(i32::from(port)), "the kubelet port is reported");

    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let image = format!("file://{}", lichen_tests::fixture("sleeper.wat").display());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": wasm_pod_template(name, &image, serde_json::json!({}))
    }))
    .expect("pod");
    create_fresh(&pods, &pod).await;
    wait_for_async(T, "the pod to run", || async {
        lichen_tests::is_running_ready(&pods.get(name).await.ok()?).then_some(())
    })
    .await;
    let text = wait_for_async(T, "kubectl logs to show ticks", || async {
        let t = pods.logs(name, &LogParams::default()).await.ok()?;
        t.contains("tick 2").then_some(t)
    })
    .await;
    assert!(text.starts_with("started\n"), "{text}");
    let tail = pods
        .logs(name, &LogParams { tail_lines: Some(1), timestamps: true, ..Default::default() })
        .await
        .expect("tail");
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(
        tail.split_once(' ').is_some_and(|(ts, rest)| ts.contains('T') && rest.starts_with("tick")),
        "{tail}"
    );

    // Follow: new lines arrive on the open stream.
    {
        use futures::AsyncBufReadExt;
        let stream = pods
            .log_stream(name, &LogParams { follow: true, tail_lines: Some(1), ..Default::default() })
            .await
            .expect("follow");
        let mut lines = stream.lines();
        let mut seen = Vec::new();
        let got = tokio::time::timeout(T, async {
            while let Some(Ok(line)) = futures::StreamExt::next(&mut lines).await {
                seen.push(line);
                if seen.len() >= 3 {
                    break;
                }
            }
        })
        .await;
        assert!(got.is_ok() && seen.len() >= 3, "streamed lines: {seen:?}");
    }

    // exec, attach and port-forward: kubectl shows the node's reason, on its WebSocket path (the
    // default, which falls back to SPDY when the upgrade is refused) and on SPDY alone.
    for transport in ["websocket", "spdy"] {
        for (what, args) in [
            ("exec", vec!["exec", name, "--", "ls"]),
            ("attach", vec!["attach", name]),
            ("port-forward", vec!["port-forward", name, "0:8080"]),
        ] {
            let mut kubectl = std::process::Command::new("timeout");
            kubectl.args(["60", "kubectl", "--kubeconfig"]).arg(cluster.kubeconfig()).args(&args);
            if transport == "spdy" {
                kubectl
                    .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
                    .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
            } else {
                kubectl
                    .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "true")
                    .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "true");
            }
            let out = kubectl.stdin(std::process::Stdio::null()).output().expect("kubectl (CI installs it)");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{transport} {what}: {stderr}");
            assert!(
                stderr.contains(&format!("kubectl {what} is not supported on this Lichen node"))
                    && stderr.contains("WebAssembly (WASI) module")
                    && stderr.contains("use kubectl logs"),
                "{transport} {what}: kubectl printed {stderr:?}"
            );
        }
    }

    // The node asked for a serving certificate; an operator approves it (1.20 does not on its own).
    let csrs: Api<CertificateSigningRequest> = Api::all(cluster.client.clone());
    let prefix = format!("kubelet-serving-{name}-");
    let csr = wait_for_async(T, "the node's kubelet-serving CSR", || async {
        csrs.list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            // Pending only: an interrupted earlier run may have left one of its own behind.
            .find(|c| {
                c.metadata.name.as_deref().is_some_and(|n| n.starts_with(&prefix))
                    && c.status.as_ref().and_then(|s| s.conditions.as_ref()).is_none_or(Vec::is_empty)
            })
    })
    .await;
    assert_eq!(csr.spec.signer_name, "kubernetes.io/kubelet-serving");
    let csr_name = csr.metadata.name.clone().expect("name");
    let mut approved = csr.clone();
    approved.status = Some(k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus {
        conditions: Some(vec![k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("E2EApproved".into()),
            message: Some("approved by the e2e test".into()),
            ..Default::default()
        }]),
        ..Default::default()
    });
    csrs.replace_subresource("approval", &csr_name, &PostParams::default(), &approved)
        .await
        .expect("approve");
    agent.wait_log(&["kubelet API now serves the certificate the cluster signed"], T);
    assert!(s.state.join("pki/kubelet-serving.crt").exists());
    let again = pods
        .logs(name, &LogParams { tail_lines: Some(1), ..Default::default() })
        .await
        .expect("logs after the swap");
    assert!(again.starts_with("tick"), "{again}");

    let _ = pods.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    let _ = csrs.delete(&csr_name, &DeleteParams::default()).await;
    cluster.delete_node(name).await;
}

/// `kubectl get --raw` through the admin kubeconfig: the body, or what kubectl said.
fn kubectl_raw(path: &str) -> Result<String, String> {
    let kubeconfig = std::env::var("LICHEN_E2E_KUBECONFIG").unwrap_or_default();
    let out = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "get", "--raw", path])
        .output()
        .expect("kubectl (CI installs it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The containers' CPU seconds of `pod` in a decoded scrape.
fn cpu_of(scrape: &lichen_tests::top::ResourceScrape, pod: &str) -> Option<f64> {
    scrape.pod("default", pod).first().map(|(_, p)| p.cpu_seconds)
}

/// What metrics-server scrapes for `kubectl top` and the autoscaler, fetched as `kubectl get --raw`
/// fetches it through the real API server's node proxy (which dials the kubelet API with its
/// kubelet client certificate, authorized for `nodes/metrics` and `nodes/stats`), and decoded as
/// metrics-server decodes it: a busy pod's CPU grows, an idle one's barely moves, a deleted pod's
/// series disappear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_top_sources_reach_the_node_through_the_api_servers_node_proxy() {
    use lichen_tests::top::decode;
    let cluster = Cluster::from_env().await;
    let name = "lichen-e2e-top";
    let (_s, agent, _, _) = ready_kubelet_node(&cluster, name).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let (busy, idle) = ("lichen-e2e-top-spin", "lichen-e2e-top-idle");
    for (pod, module) in [(busy, "loop.wat"), (idle, "idle.wat")] {
        let image = format!("file://{}", lichen_tests::fixture(module).display());
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": pod},
            "spec": wasm_pod_template(name, &image, serde_json::json!({}))
        }))
        .expect("pod");
        create_fresh(&pods, &p).await;
    }
    let busy_uid = wait_for_async(T, "both pods to run", || async {
        let b = pods.get(busy).await.ok()?;
        let i = pods.get(idle).await.ok()?;
        (lichen_tests::is_running_ready(&b) && lichen_tests::is_running_ready(&i)).then_some(b.metadata.uid?)
    })
    .await;

    let metrics = format!("/api/v1/nodes/{name}/proxy/metrics/resource");
    let scrape = || kubectl_raw(&metrics).map(|body| decode(&body));
    let first = wait_for(T, "both pods in the resource metrics", || {
        let s = scrape().ok()?;
        (cpu_of(&s, busy).is_some() && cpu_of(&s, idle).is_some()).then_some(s)
    });
    assert_eq!(first.scrape_error, 0.0);
    let since = std::time::Instant::now();
    let later = wait_for(T, "the busy pod's CPU counter to grow by half a second", || {
        let s = scrape().ok()?;
        (cpu_of(&s, busy)? - cpu_of(&first, busy)? >= 0.5).then_some(s)
    });
    let wall = since.elapsed().as_secs_f64();
    let idled = cpu_of(&later, idle).expect("idle pod") - cpu_of(&first, idle).expect("idle pod");
    assert!(idled < 0.02 * wall.max(1.0), "the idle pod used {idled} s of CPU in {wall} s");
    let (container, point) = later.pod("default", busy)[0];
    assert_eq!(container, "main");
    assert!(point.memory_bytes >= 65536.0, "{point:?}");
    let now_ms = jiff::Timestamp::now().as_millisecond();
    assert!((now_ms - point.timestamp_ms).abs() < 10_000, "sampled now: {point:?}");

    let body = kubectl_raw(&format!("/api/v1/nodes/{name}/proxy/stats/summary")).expect("the summary");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["node"]["nodeName"], name);
    assert!(v["node"]["cpu"]["usageCoreNanoSeconds"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["node"]["memory"]["workingSetBytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    let listed = v["pods"].as_array().expect("pods");
    let pod = listed.iter().find(|p| p["podRef"]["name"] == busy).expect("the busy pod");
    assert_eq!(pod["podRef"]["uid"].as_str(), Some(busy_uid.as_str()));
    let main = &pod["containers"][0];
    assert!(main["cpu"]["usageCoreNanoSeconds"].as_u64().is_some_and(|n| n >= 500_000_000), "{main}");
    assert!(main["memory"]["workingSetBytes"].as_u64().is_some_and(|n| n >= 65536), "{main}");

    pods.delete(busy, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("delete");
    let gone = wait_for(T, "the deleted pod's series to disappear", || {
        let s = scrape().ok()?;
        cpu_of(&s, busy).is_none().then_some(s)
    });
    assert!(cpu_of(&gone, idle).is_some(), "the idle pod stays");

    let _ = pods.delete(idle, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    cluster.delete_node(name).await;
}

/// Fleet upgrades on the real control plane. Agents joined with node credentials (so under the Node
/// authorizer and NodeRestriction) report what runs (`lichen.dev/agent-version`), the outcome
/// (`lichen.dev/agent-upgrade`), `nodeInfo.kubeletVersion` and the upgrade Events themselves, with
/// nothing refused; and `lichen fleet upgrade`, run with the admin kubeconfig as an operator runs it,
/// rolls a signed image over three nodes in two waves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_upgrade_rolls_a_signed_image_over_three_nodes_in_two_waves_with_node_credentials() {
    use lichen::upgrade::{IMAGE_ANNOTATION, Phase, UPGRADE_ANNOTATION, UpgradeReport, VERSION_ANNOTATION};
    use lichen_tests::agent_image::{fleet_upgrade, p256_key, push_agent, stamped_copy};
    use lichen_tests::registry::Registry;
    let cluster = Cluster::from_env().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let reg = Registry::start();
    let names = ["lichen-e2e-fleet-a", "lichen-e2e-fleet-b", "lichen-e2e-fleet-c"];
    // A selector of this run's own: nodes of another test or run never match it.
    let run = format!("r{:08x}", fastrand::u32(..));
    let tables = format!(
        "[node_labels]\n\"lichen.dev/fleet\" = {run:?}\n[upgrade]\ntrusted_keys = [{:?}]\n",
        public.display().to_string()
    );
    let modules = format!("insecure_registries = [{:?}]\n", reg.host());
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let mut agents = Vec::new();
    for name in names {
        agents.push(start_node_modules(&cluster, name, &tables, &modules).await);
    }
    let annotation = |n: &Node, key: &str| n.metadata.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    for name in names {
        let running = wait_for_async(T, "the node Ready, reporting its version", || async {
            let n = nodes.get(name).await.ok()?;
            (condition(&n, "Ready")?.0 == "True").then(|| annotation(&n, VERSION_ANNOTATION))?
        })
        .await;
        assert!(running.starts_with(&format!("{} sha256:", lichen::version::version())), "{name}: {running}");
    }
    let (v2, version) = stamped_copy(&lichen_tests::lichen_bin(), dir.path(), "test.20");
    let image = push_agent(&agents[0].0.config, &v2, &format!("{}/fleet/lichen:e2e", reg.host()), Some(&key));

    let started = std::time::Instant::now();
    let fleet = fleet_upgrade(cluster.kubeconfig(), &format!("lichen.dev/fleet={run}"), &image, 2).await;
    let took = started.elapsed();
    assert!(fleet.status.success(), "{}{}", fleet.stdout, fleet.stderr);
    for name in names {
        assert_eq!(fleet.row(name)[..3], [name, "Succeeded", version.as_str()], "{}", fleet.stdout);
    }
    let (a, b, c) = (names[0], names[1], names[2]);
    assert!(fleet.line_index(&format!("wave 1/2: {a}, {b}")) < fleet.line_index(&format!("wave 2/2: {c}")));
    let c_annotated = fleet.line_index(&format!("{c}: annotated"));
    for first in [a, b] {
        assert!(
            fleet.line_index(&format!("{first}: Succeeded")) < c_annotated,
            "{c} annotated only after {first} reported:\n{}",
            fleet.stdout
        );
    }

    for (name, (_, agent)) in names.iter().zip(&agents) {
        let node = nodes.get(name).await.expect("node");
        assert_eq!(annotation(&node, IMAGE_ANNOTATION).as_deref(), Some(image.as_str()));
        let report: UpgradeReport =
            serde_json::from_str(&annotation(&node, UPGRADE_ANNOTATION).unwrap_or_default())
                .expect("the report");
        assert_eq!((report.phase, report.version.as_deref()), (Phase::Succeeded, Some(version.as_str())));
        let running = annotation(&node, VERSION_ANNOTATION).unwrap_or_default();
        assert!(running.starts_with(&format!("{version} sha256:")), "{name}: {running}");
        let kubelet =
            node.status.as_ref().and_then(|s| s.node_info.as_ref()).map(|i| i.kubelet_version.clone());
        assert!(kubelet.as_deref().is_some_and(|k| k.ends_with("-lichen+test.20")), "{name}: {kubelet:?}");
        let uid = node.metadata.uid.clone().unwrap_or_default();
        let events = events_about(&cluster, name, &uid).await;
        let position = |reason: &str| events.iter().position(|(r, _, _)| r == reason);
        let (start, done) = (position("UpgradeStarted"), position("UpgradeSucceeded"));
        assert!(start.is_some() && done.is_some() && start < done, "{name}: {events:?}");
        let log = agent.log();
        assert!(
            !log.iter().any(|l| l.contains("Forbidden") || l.contains("forbidden")),
            "{}",
            log.join("\n")
        );
    }
    eprintln!(
        "figures: lichen fleet upgrade, 3 nodes in two waves (--max-unavailable 2), real 1.20 control plane, \
         loopback registry, debug build: {:.1}s from start to table",
        took.as_secs_f64()
    );
    for (name, (_, agent)) in names.iter().zip(agents) {
        let (exit, log) = agent.stop();
        assert!(exit.success(), "{}", log.join("\n"));
        cluster.delete_node(name).await;
    }
}
