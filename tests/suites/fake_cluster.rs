//! The fake API server ([`lichen_tests::fakeapi`]): first that it keeps the real apiserver's
//! semantics (through kube, as any client sees them), then the real agent against it in the
//! situations a real cluster cannot easily produce: `410 Gone`, outages, injected errors, latency.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret, ServiceAccount};
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use lichen_tests::fakeapi::FakeApi;
use lichen_tests::{Agent, Scratch, fixture, is_running_ready, node_condition, wait_for, wait_for_async};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn status_of(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, data: Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).expect("configmap")
}

fn pod(name: &str, node: Option<&str>, image: &str, extra_spec: Value) -> Pod {
    let mut spec = json!({
        "automountServiceAccountToken": false,
        "containers": [{"name": "main", "image": image}],
    });
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(extra.clone());
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod")
}

fn wasm(name: &str) -> String {
    format!("file://{}", fixture(name).display())
}

fn rv_of(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version.as_deref().expect("resourceVersion").parse().expect("numeric resourceVersion")
}

// ---------------------------------------------------------------------------------------------
// The fake's semantics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_get_uids_and_growing_resource_versions_and_duplicates_conflict() {
    let api = FakeApi::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "any-namespace");
    let a = cms.create(&PostParams::default(), &cm("a", json!({"k": "v"}))).await.expect("create a");
    let b = cms.create(&PostParams::default(), &cm("b", json!({}))).await.expect("create b");
    assert!(rv_of(&b.metadata) > rv_of(&a.metadata));
    assert_eq!(a.metadata.uid.as_deref().map(str::len), Some(36));
    assert_ne!(a.metadata.uid, b.metadata.uid);
    assert_eq!(a.metadata.namespace.as_deref(), Some("any-namespace"));
    assert!(a.metadata.creation_timestamp.is_some());

    let dup =
        status_of(cms.create(&PostParams::default(), &cm("a", json!({}))).await.expect_err("duplicate"));
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(dup.message, "configmaps \"a\" already exists");
    let details = dup.details.expect("details");
    assert_eq!((details.name.as_str(), details.kind.as_str()), ("a", "configmaps"));

    let nameless: ConfigMap = serde_json::from_value(json!({"metadata": {}})).expect("cm");
    let invalid = status_of(cms.create(&PostParams::default(), &nameless).await.expect_err("no name"));
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(invalid.message.contains("metadata.name: Required value"), "{}", invalid.message);

    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).expect("cm");
    let g = cms.create(&PostParams::default(), &generated).await.expect("generateName");
    let gname = g.metadata.name.clone().expect("name");
    assert!(gname.starts_with("gen-") && gname.len() == 9, "{gname}");

    let missing = status_of(cms.get("nope").await.expect_err("missing"));
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "configmaps \"nope\" not found");

    let list = cms.list(&ListParams::default()).await.expect("list");
    let mut names: Vec<String> = list.items.into_iter().filter_map(|c| c.metadata.name).collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "b", gname.as_str(), "kube-root-ca.crt"],
        "and the namespace's CA, as in any cluster"
    );
    assert_eq!(rv_of_list(&list.metadata), api.resource_version());

    // A path that names nothing is a 404 Status too.
    let req = http_request("GET", "/api/v1/widgets", "", Vec::new());
    let s = status_of(api.client().request_text(req).await.expect_err("unknown resource"));
    assert_eq!(s.code, 404);
}

fn rv_of_list(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta) -> u64 {
    meta.resource_version.as_deref().expect("list resourceVersion").parse().expect("numeric")
}

fn http_request(
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> hyper::http::Request<Vec<u8>> {
    let mut b = hyper::http::Request::builder().method(method).uri(path);
    if !content_type.is_empty() {
        b = b.header("content-type", content_type);
    }
    b.body(body).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_merge_patch_with_null_and_refuse_stale_resource_versions() {
    let api = FakeApi::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let created =
        cms.create(&PostParams::default(), &cm("c", json!({"a": "1", "b": "2"}))).await.expect("create");
    let pp = PatchParams::default();
    let patched = cms
        .patch(
            "c",
            &pp,
            &Patch::Merge(json!({"data": {"a": null, "c": "3"}, "metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("merge patch");
    let data = patched.data.clone().expect("data");
    assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), ["b", "c"]);
    assert!(rv_of(&patched.metadata) > rv_of(&created.metadata));

    // A patch or update carrying an old resourceVersion is a conflict.
    let stale_rv = created.metadata.resource_version.clone().expect("rv");
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": stale_rv}, "data": {"d": "4"}}));
    let conflict = status_of(cms.patch("c", &pp, &stale).await.expect_err("stale patch"));
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert!(conflict.message.contains("the object has been modified"), "{}", conflict.message);
    let conflict =
        status_of(cms.replace("c", &PostParams::default(), &created).await.expect_err("stale put"));
    assert_eq!(conflict.code, 409);
    let mut fresh = patched.clone();
    fresh.data = Some([("only".to_owned(), "one".to_owned())].into());
    let replaced = cms.replace("c", &PostParams::default(), &fresh).await.expect("put with current rv");
    assert_eq!(replaced.data.expect("data").len(), 1);

    // A patch that changes nothing is not a write.
    let before = api.resource_version();
    let same = cms.patch("c", &pp, &Patch::Merge(json!({"data": {"only": "one"}}))).await.expect("no-op");
    assert_eq!((api.resource_version(), rv_of(&same.metadata)), (before, rv_of(&replaced.metadata)));

    // Strategic merge patch is taken as merge patch; JSON patch and apply are refused.
    cms.patch("c", &pp, &Patch::Strategic(json!({"data": {"s": "1"}}))).await.expect("strategic");
    let req = http_request(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/c",
        "application/json-patch+json",
        br#"[{"op":"add","path":"/data/j","value":"1"}]"#.to_vec(),
    );
    let s = status_of(api.client().request_text(req).await.expect_err("json patch"));
    assert_eq!((s.code, s.reason.as_str()), (415, "UnsupportedMediaType"));

    let gone = status_of(cms.patch("nope", &pp, &Patch::Merge(json!({}))).await.expect_err("missing"));
    assert_eq!(gone.code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_subresource_is_isolated_from_the_main_resource() {
    let api = FakeApi::start().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let created =
        pods.create(&PostParams::default(), &pod("p", Some("n1"), "i", json!({}))).await.expect("create");
    let status = created.status.clone().expect("status");
    assert_eq!(status.phase.as_deref(), Some("Pending"), "the registry resets a new pod's status");
    let spec = created.spec.clone().expect("spec");
    assert_eq!(spec.termination_grace_period_seconds, Some(30), "defaulted");
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));

    let pp = PatchParams::default();
    let main = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "1"}}, "status": {"phase": "Running"}})),
        )
        .await
        .expect("patch main");
    assert_eq!(main.labels().get("a").map(String::as_str), Some("1"));
    assert_eq!(
        main.status.and_then(|s| s.phase).as_deref(),
        Some("Pending"),
        "status ignored on the main resource"
    );

    let st = pods
        .patch_status(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "2"}}, "status": {"phase": "Running"}})),
        )
        .await
        .expect("patch status");
    assert_eq!(st.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    assert_eq!(
        st.metadata.labels.expect("labels").get("a").map(String::as_str),
        Some("1"),
        "only status changes"
    );

    // Status validation: a finished container of a Never pod stays finished, the QoS class stays,
    // host IPs agree.
    let never = pod("never", Some("n1"), "i", json!({"restartPolicy": "Never"}));
    pods.create(&PostParams::default(), &never).await.expect("create");
    let container = |state: Value| {
        json!({"status": {"containerStatuses": [
            {"name": "main", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": state}]}})
    };
    pods.patch_status("never", &pp, &Patch::Merge(container(json!({"terminated": {"exitCode": 0}}))))
        .await
        .expect("terminated");
    for (patch, needle) in [
        (container(json!({"running": {}})), "may not be transitioned to non-terminated state"),
        (json!({"status": {"qosClass": "Guaranteed"}}), "status.qosClass"),
        (
            json!({"status": {"hostIP": "127.0.0.1", "hostIPs": [{"ip": "10.0.0.1"}]}}),
            "must be equal to hostIP",
        ),
    ] {
        let s = status_of(pods.patch_status("never", &pp, &Patch::Merge(patch)).await.expect_err(needle));
        assert_eq!(s.code, 422);
        assert!(s.message.contains(needle), "{}", s.message);
    }

    // Malformed input is a 422, not a crash.
    let req = http_request(
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        br#"{"metadata":{"name":"odd"},"spec":{"containers":[{"name":"m","image":"i"}],"initContainers":["x"]}}"#
            .to_vec(),
    );
    let s = status_of(api.client().request_text(req).await.expect_err("bad init container"));
    assert_eq!(s.code, 422, "{}", s.message);

    // Pods are immutable but for a few fields.
    let s = status_of(
        pods.patch("p", &pp, &Patch::Merge(json!({"spec": {"nodeName": "elsewhere"}})))
            .await
            .expect_err("immutable"),
    );
    assert_eq!(s.code, 422);
    assert!(s.message.contains("pod updates may not change fields"), "{}", s.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_preconditions_guard_status_patches_and_deletes() {
    let api = FakeApi::start().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let p = pods.create(&PostParams::default(), &pod("p", None, "i", json!({}))).await.expect("create");
    let uid = p.metadata.uid.clone().expect("uid");
    let wrong = "00000000-0000-4000-8000-000000000000";
    let patch = Patch::Merge(json!({"metadata": {"uid": wrong}, "status": {"phase": "Running"}}));
    let s =
        status_of(pods.patch_status("p", &PatchParams::default(), &patch).await.expect_err("uid mismatch"));
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        format!(
            "Operation cannot be fulfilled on pods \"p\": the UID in the precondition ({wrong}) does not match the UID \
             in record ({uid}). The object might have been deleted and then recreated"
        )
    );
    let right = Patch::Merge(json!({"metadata": {"uid": uid}, "status": {"phase": "Running"}}));
    pods.patch_status("p", &PatchParams::default(), &right).await.expect("matching uid");

    let dp = |uid: Option<&str>, rv: Option<&str>| DeleteParams {
        preconditions: Some(Preconditions {
            uid: uid.map(str::to_owned),
            resource_version: rv.map(str::to_owned),
        }),
        ..Default::default()
    };
    let s = status_of(pods.delete("p", &dp(Some(wrong), None)).await.expect_err("delete uid mismatch"));
    assert_eq!(s.code, 409);
    assert!(s.message.contains("does not match the UID in record"), "{}", s.message);
    let s = status_of(pods.delete("p", &dp(None, Some("1"))).await.expect_err("delete rv mismatch"));
    assert_eq!(s.code, 409);
    pods.delete("p", &dp(Some(&uid), None)).await.expect("delete with the right uid");
    assert!(pods.get_opt("p").await.expect("get").is_none(), "an unbound pod goes at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pod_is_deleted_in_two_steps() {
    let api = FakeApi::start().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let p = pods
        .create(
            &PostParams::default(),
            &pod("p", Some("n1"), "i", json!({"terminationGracePeriodSeconds": 7})),
        )
        .await
        .expect("create");
    let mut events = pods
        .watch(
            &WatchParams::default().fields("metadata.name=p"),
            &p.metadata.resource_version.clone().expect("rv"),
        )
        .await
        .expect("watch")
        .boxed();
    pods.delete("p", &DeleteParams::default()).await.expect("graceful delete");
    let terminating = pods.get("p").await.expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(7), "the pod's own grace period");
    match next_change(&mut events).await {
        WatchEvent::Modified(m) => assert!(m.metadata.deletion_timestamp.is_some()),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    // Deleting again with a longer grace period changes nothing.
    let rv = api.resource_version();
    pods.delete("p", &DeleteParams { grace_period_seconds: Some(60), ..Default::default() })
        .await
        .expect("again");
    assert_eq!(api.resource_version(), rv);
    pods.delete("p", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("final");
    match next_change(&mut events).await {
        WatchEvent::Deleted(d) => assert_eq!(d.metadata.uid, p.metadata.uid),
        other => panic!("expected DELETED, got {other:?}"),
    }
    assert!(pods.get_opt("p").await.expect("get").is_none());
}

/// The next non-bookmark event of a watch.
async fn next_change<K: std::fmt::Debug>(
    events: &mut futures::stream::BoxStream<'_, kube::Result<WatchEvent<K>>>,
) -> WatchEvent<K> {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s")
            .expect("the stream is open")
            .expect("a decodable event");
        if !matches!(e, WatchEvent::Bookmark(_)) {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_filter_lists_and_watches_and_moves_are_added_or_deleted() {
    let api = FakeApi::start().await;
    let all: Api<Pod> = Api::all(api.client());
    for (ns, name, node, app) in [("a", "p1", "n1", "web"), ("b", "p2", "n1", "db"), ("a", "p3", "n2", "web")]
    {
        let mut p = pod(name, Some(node), "i", json!({}));
        p.metadata.labels = Some([("app".to_owned(), app.to_owned())].into());
        Api::<Pod>::namespaced(api.client(), ns).create(&PostParams::default(), &p).await.expect("create");
    }
    let names = |l: kube::core::ObjectList<Pod>| {
        let mut v: Vec<String> = l.items.into_iter().filter_map(|p| p.metadata.name).collect();
        v.sort();
        v
    };
    let lp = ListParams::default();
    assert_eq!(names(all.list(&lp.clone().fields("spec.nodeName=n1")).await.expect("list")), ["p1", "p2"]);
    assert_eq!(
        names(all.list(&lp.clone().fields("spec.nodeName!=n1,metadata.namespace==a")).await.expect("l")),
        ["p3"]
    );
    assert_eq!(names(all.list(&lp.clone().labels("app in (db, cache)")).await.expect("list")), ["p2"]);
    assert_eq!(
        names(all.list(&lp.clone().labels("app notin (db),!missing")).await.expect("list")),
        ["p1", "p3"]
    );
    assert_eq!(names(all.list(&lp.clone().labels("app!=web")).await.expect("list")), ["p2"]);
    assert_eq!(names(all.list(&lp.clone().labels("app")).await.expect("list")), ["p1", "p2", "p3"]);
    let ns_a: Api<Pod> = Api::namespaced(api.client(), "a");
    assert_eq!(names(ns_a.list(&lp).await.expect("list")), ["p1", "p3"]);
    let bad = status_of(all.list(&lp.clone().fields("spec.bogus=1")).await.expect_err("unsupported field"));
    assert_eq!(bad.code, 400);

    // From resourceVersion 0: the current matches as ADDED, then changes.
    let mut w = all.watch(&WatchParams::default().labels("app=web"), "0").await.expect("watch").boxed();
    let mut initial = vec![];
    for _ in 0..2 {
        match next_change(&mut w).await {
            WatchEvent::Added(p) => initial.push(p.metadata.name.expect("name")),
            other => panic!("expected ADDED, got {other:?}"),
        }
    }
    initial.sort();
    assert_eq!(initial, ["p1", "p3"]);
    let pp = PatchParams::default();
    ns_a.patch("p1", &pp, &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})))
        .await
        .expect("relabel");
    match next_change(&mut w).await {
        WatchEvent::Deleted(p) => assert_eq!(p.metadata.name.as_deref(), Some("p1"), "left the selector"),
        other => panic!("expected DELETED, got {other:?}"),
    }
    ns_a.patch("p1", &pp, &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})))
        .await
        .expect("relabel");
    match next_change(&mut w).await {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("p1"), "entered the selector"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    ns_a.patch("p3", &pp, &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})))
        .await
        .expect("annotate");
    match next_change(&mut w).await {
        WatchEvent::Modified(p) => assert_eq!(p.metadata.name.as_deref(), Some("p3")),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_resource_version_is_gone_and_kube_runtime_relists() {
    let api = FakeApi::start().await;
    // Bookmarks would move the watcher's resourceVersion past the compaction; keep them out of it.
    api.set_bookmark_interval(Duration::from_secs(3600));
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let first = cms.create(&PostParams::default(), &cm("first", json!({}))).await.expect("create");
    let old_rv = first.metadata.resource_version.clone().expect("rv");

    // A bounded history: a watch from before its oldest change is 410.
    api.set_history_limit(2);
    for i in 0..3 {
        cms.create(&PostParams::default(), &cm(&format!("x{i}"), json!({}))).await.expect("create");
    }
    let mut w = cms.watch(&WatchParams::default(), &old_rv).await.expect("watch").boxed();
    match next_change(&mut w).await {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(s.message.starts_with(&format!("too old resource version: {old_rv} (")), "{}", s.message);
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(w.next().await.is_none(), "the watch closes after the error");
    api.set_history_limit(1000);

    // kube-runtime's watcher: list, watch, then after compaction and a closed watch, 410 and re-list.
    let mut stream = watcher::watcher(cms.clone(), watcher::Config::default()).boxed();
    let mut seen_init_done = 0;
    while seen_init_done == 0 {
        if let watcher::Event::InitDone = stream.try_next().await.expect("watcher").expect("open") {
            seen_init_done += 1;
        }
    }
    cms.create(&PostParams::default(), &cm("meanwhile", json!({}))).await.expect("create");
    tokio::time::sleep(Duration::from_millis(200)).await; // let the watch deliver it
    cms.create(&PostParams::default(), &cm("unseen", json!({}))).await.expect("create");
    api.faults().compact();
    api.faults().close_watches();
    cms.create(&PostParams::default(), &cm("late", json!({}))).await.expect("create");
    let (gone, relisted) = tokio::time::timeout(T, async {
        let (mut gone, mut relisted): (Vec<String>, Vec<String>) = (vec![], vec![]);
        loop {
            match stream.try_next().await {
                Ok(Some(watcher::Event::Init)) => relisted.clear(),
                Ok(Some(watcher::Event::InitApply(c))) => relisted.push(c.metadata.name.expect("name")),
                Ok(Some(watcher::Event::InitDone)) => return (gone, relisted),
                Ok(_) => {}
                // The watcher reports the 410, then re-lists on the next poll.
                Err(e) => gone.push(e.to_string()),
            }
        }
    })
    .await
    .expect("a re-list within 20 s");
    assert!(matches!(gone.as_slice(), [e] if e.contains("too old resource version")), "{gone:?}");
    assert!(relisted.contains(&"late".to_owned()) && relisted.contains(&"unseen".to_owned()), "{relisted:?}");
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path_only().ends_with("/configmaps") && r.query("watch").is_none())
        .count();
    assert_eq!(lists, 2, "one initial list and one re-list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_with_bookmarks_get_them_periodically_and_timeouts_end_them() {
    let api = FakeApi::start().await;
    api.set_bookmark_interval(Duration::from_millis(200));
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let c = cms.create(&PostParams::default(), &cm("c", json!({}))).await.expect("create");
    let rv = c.metadata.resource_version.clone().expect("rv");
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "other"}})).expect("lease");
    leases.create(&PostParams::default(), &lease).await.expect("an unrelated write");
    let now = api.resource_version();
    let mut w = cms.watch(&WatchParams::default().timeout(2), &rv).await.expect("watch").boxed();
    let started = Instant::now();
    let mut bookmarks = vec![];
    while let Some(e) = w.next().await {
        match e.expect("event") {
            WatchEvent::Bookmark(b) => {
                bookmarks.push(b.metadata.resource_version.parse::<u64>().expect("rv"))
            }
            other => panic!("nothing changed, got {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "timeoutSeconds=2 ended it: {took:?}"
    );
    assert!(bookmarks.len() >= 5, "{bookmarks:?}");
    assert!(
        bookmarks.iter().all(|b| *b == now),
        "bookmarks carry the current resourceVersion: {bookmarks:?} vs {now}"
    );
    let plain = cms
        .watch(&WatchParams { bookmarks: false, ..WatchParams::default().timeout(1) }, &rv)
        .await
        .expect("watch");
    assert_eq!(plain.boxed().count().await, 0, "no bookmarks unless asked for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_what_the_node_authorizer_and_node_restriction_give_them() {
    let api = FakeApi::start().await;
    let node = api.node_client("n1").await;
    let nodes: Api<Node> = Api::all(node.clone());
    let with_label = |name: &str, label: &str| -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {label: "true"}}})).expect("node")
    };
    let s = status_of(
        nodes
            .create(&PostParams::default(), &with_label("n1", "node-role.kubernetes.io/worker"))
            .await
            .expect_err("role"),
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert!(
        s.message.contains("is not allowed to set the following labels: node-role.kubernetes.io/worker"),
        "{}",
        s.message
    );
    let s = status_of(
        nodes.create(&PostParams::default(), &with_label("n2", "a")).await.expect_err("other node"),
    );
    assert!(s.message.contains("node \"n1\" is not allowed to modify node \"n2\""), "{}", s.message);
    nodes
        .create(&PostParams::default(), &with_label("n1", "kubernetes.io/hostname"))
        .await
        .expect("own node");
    nodes.get("n1").await.expect("get own node");
    nodes.list(&ListParams::default()).await.expect("list nodes");
    let s = status_of(nodes.get_status("n1").await.expect_err("GET nodes/status"));
    assert_eq!(s.code, 403);
    assert_eq!(
        s.message,
        "nodes \"n1\" is forbidden: User \"system:node:n1\" cannot get resource \"nodes/status\" in API group \"\" at \
         the cluster scope"
    );
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}})))
        .await
        .expect("PATCH own nodes/status");
    let s = status_of(
        nodes
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"kubernetes.io/role": "x"}}})),
            )
            .await
            .expect_err("restricted label"),
    );
    assert!(s.message.contains("is not allowed to modify labels: kubernetes.io/role"), "{}", s.message);

    // Leases: its own only.
    let leases: Api<Lease> = Api::namespaced(node.clone(), "kube-node-lease");
    let lease =
        |name: &str| -> Lease { serde_json::from_value(json!({"metadata": {"name": name}})).expect("lease") };
    leases.create(&PostParams::default(), &lease("n1")).await.expect("own lease");
    Api::<Lease>::namespaced(api.client(), "kube-node-lease")
        .create(&PostParams::default(), &lease("n2"))
        .await
        .expect("admin creates another");
    let s = status_of(leases.get("n2").await.expect_err("other node's lease"));
    assert_eq!(s.code, 403);
    assert!(
        s.message.contains("can only access node lease with the same name as the requesting node"),
        "{}",
        s.message
    );
    assert_eq!(
        status_of(leases.create(&PostParams::default(), &lease("n3")).await.expect_err("create other")).code,
        403
    );

    // Secrets and configmaps: only what its pods reference.
    let admin_secrets: Api<Secret> = Api::namespaced(api.client(), "default");
    for name in ["used", "unused"] {
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}})).expect("s");
        admin_secrets.create(&PostParams::default(), &s).await.expect("secret");
    }
    let admin_pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let env = json!({"containers": [{"name": "main", "image": "i",
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "used", "key": "k"}}}],
        "envFrom": [{"configMapRef": {"name": "cfg"}}]}]});
    let mine =
        admin_pods.create(&PostParams::default(), &pod("mine", Some("n1"), "i", env)).await.expect("pod");
    admin_pods.create(&PostParams::default(), &pod("theirs", Some("n2"), "i", json!({}))).await.expect("pod");
    let secrets: Api<Secret> = Api::namespaced(node.clone(), "default");
    assert_eq!(secrets.get("used").await.expect("referenced secret").data.expect("data").len(), 1);
    let s = status_of(secrets.get("unused").await.expect_err("unreferenced secret"));
    assert_eq!(s.code, 403);
    assert!(s.message.ends_with("no relationship found between node 'n1' and this object"), "{}", s.message);
    let cms: Api<ConfigMap> = Api::namespaced(node.clone(), "default");
    assert_eq!(status_of(cms.get("cfg").await.expect_err("referenced, missing")).code, 404);
    assert_eq!(status_of(cms.get("other").await.expect_err("unreferenced")).code, 403);
    assert_eq!(status_of(secrets.list(&ListParams::default()).await.expect_err("list secrets")).code, 403);

    // Pods: its own, listed by spec.nodeName.
    let pods: Api<Pod> = Api::all(node.clone());
    let s = status_of(pods.list(&ListParams::default()).await.expect_err("list all pods"));
    assert_eq!(s.code, 403);
    let listed = pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.expect("own pods");
    assert_eq!(listed.items.len(), 1);
    let ns_pods: Api<Pod> = Api::namespaced(node.clone(), "default");
    assert_eq!(status_of(ns_pods.get("theirs").await.expect_err("another node's pod")).code, 403);
    let s = status_of(
        ns_pods
            .patch_status(
                "theirs",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Failed"}})),
            )
            .await
            .expect_err("another node's pod status"),
    );
    assert!(
        s.message.contains("can only update pod status for pods with spec.nodeName set to itself"),
        "{}",
        s.message
    );
    assert_eq!(
        status_of(ns_pods.delete("theirs", &DeleteParams::default()).await.expect_err("delete")).code,
        403
    );
    let s = status_of(
        ns_pods
            .patch(
                "mine",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .expect_err("x"),
    );
    assert_eq!(s.code, 403, "a node may not update a pod, only its status");

    // Events: create and patch anywhere, but not read.
    let events: Api<Event> = Api::namespaced(node.clone(), "default");
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"name": "mine.1"}, "involvedObject": {"kind": "Pod", "name": "mine", "namespace": "default"},
        "reason": "Started", "message": "started", "type": "Normal", "count": 1
    }))
    .expect("event");
    events.create(&PostParams::default(), &ev).await.expect("create event");
    events
        .patch("mine.1", &PatchParams::default(), &Patch::Merge(json!({"count": 2})))
        .await
        .expect("patch event");
    assert_eq!(status_of(events.list(&ListParams::default()).await.expect_err("list events")).code, 403);
    let misplaced: Event = serde_json::from_value(json!({
        "metadata": {"name": "n1.1"}, "involvedObject": {"kind": "Node", "name": "n1"}, "reason": "Starting"
    }))
    .expect("event");
    let s = status_of(
        Api::<Event>::namespaced(node.clone(), "kube-node-lease")
            .create(&PostParams::default(), &misplaced)
            .await
            .expect_err("a node's event outside default"),
    );
    assert!(s.message.contains("involvedObject.namespace") && s.code == 422, "{}", s.message);
    events.create(&PostParams::default(), &misplaced).await.expect("a node's event in default");
    let admin_events: Api<Event> = Api::namespaced(api.client(), "default");
    let listed =
        admin_events.list(&ListParams::default().fields("involvedObject.name=mine")).await.expect("list");
    assert_eq!(listed.items.iter().map(|e| e.count).collect::<Vec<_>>(), [Some(2)]);

    // Tokens: bound to one of its pods only.
    let sas: Api<ServiceAccount> = Api::namespaced(node.clone(), "default");
    let tr = |bound: Value| -> TokenRequest {
        serde_json::from_value(
            json!({"spec": {"audiences": ["api"], "expirationSeconds": 3600, "boundObjectRef": bound}}),
        )
        .expect("token request")
    };
    let s = status_of(
        sas.create_token_request("default", &PostParams::default(), &tr(Value::Null))
            .await
            .expect_err("unbound"),
    );
    assert_eq!(s.code, 403);
    let issued = sas
        .create_token_request(
            "default",
            &PostParams::default(),
            &tr(json!({"kind": "Pod", "apiVersion": "v1", "name": "mine", "uid": mine.metadata.uid})),
        )
        .await
        .expect("token for its own pod");
    let status = issued.status.expect("status");
    assert!(
        status.token.starts_with("ey") && status.token.split('.').count() == 3,
        "JWT-shaped: {}",
        status.token
    );
    let left = status.expiration_timestamp.0.duration_since(jiff::Timestamp::now()).as_secs();
    assert!((3590..=3600).contains(&left), "{left}");
    let theirs = sas
        .create_token_request(
            "default",
            &PostParams::default(),
            &tr(json!({"kind": "Pod", "name": "theirs"})),
        )
        .await;
    assert_eq!(status_of(theirs.expect_err("another node's pod")).code, 403);

    let log = api.requests();
    assert!(log.iter().any(|r| r.user == "system:node:n1" && r.code == 403));

    // No credentials, no access.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn =
        tokio::net::TcpStream::connect(api.url().trim_start_matches("http://")).await.expect("connect");
    conn.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut response = String::new();
    conn.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(response.contains(r#""reason":"Unauthorized""#), "{response}");
    assert_eq!(api.requests().last().map(|r| r.user.as_str()), Some("system:anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_delays_and_an_outage_on_the_same_port() {
    let api = FakeApi::start().await;
    let faults = api.faults();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    cms.create(&PostParams::default(), &cm("c", json!({}))).await.expect("create");

    faults.fail_next(2, 500, Some("/configmaps/c"));
    for _ in 0..2 {
        let s = status_of(cms.get("c").await.expect_err("injected"));
        assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"));
    }
    cms.get("c").await.expect("the third one works");
    // kube retries a 503 by itself.
    faults.fail_next(1, 503, None);
    cms.get("c").await.expect("retried after the 503");
    let codes: Vec<u16> =
        api.requests().iter().filter(|r| r.path_only().ends_with("/c")).map(|r| r.code).collect();
    assert_eq!(codes, [500, 500, 200, 503, 200]);

    faults.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    cms.get("c").await.expect("slow");
    assert!(t.elapsed() >= Duration::from_millis(300));
    faults.set_delay(Duration::ZERO);

    let url = api.url();
    let mut watch = cms.watch(&WatchParams::default(), "0").await.expect("watch").boxed();
    assert!(matches!(next_change(&mut watch).await, WatchEvent::Added(_)));
    faults.stop().await;
    assert!(!faults.is_up().await);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "open watches are dropped with the server");
    let addr = url.trim_start_matches("http://");
    let refused = tokio::net::TcpStream::connect(addr).await.expect_err("nothing listens");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(!matches!(cms.get("c").await.expect_err("down"), kube::Error::Api(_)));

    faults.start().await;
    assert_eq!(api.url(), url);
    let back = cms.get("c").await.expect("back, with its state");
    assert_eq!(back.metadata.name.as_deref(), Some("c"));
}

// ---------------------------------------------------------------------------------------------
// The agent against the fake
// ---------------------------------------------------------------------------------------------

/// Starts `lichen` as node `name` against the fake, as the cluster tier does against a real server.
async fn start_node(api: &FakeApi, name: &str) -> (Scratch, Agent) {
    start_node_with(api, name, "").await
}

/// [`start_node`] with extra `[modules]` settings.
async fn start_node_with(api: &FakeApi, name: &str, modules: &str) -> (Scratch, Agent) {
    api.delete_node(name).await;
    let s = Scratch::new("");
    let kc = api.node_kubeconfig(name, s.dir.path()).await;
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n{}{modules}",
        s.state.display().to_string(),
        kc.display().to_string(),
        s.modules_table()
    );
    std::fs::write(&s.config, config).expect("config");
    let agent = s.start();
    (s, agent)
}

/// A fake API server with an agent joined to it as `name` and Ready, and an admin view of the
/// `default` namespace's pods.
async fn joined(name: &str) -> (FakeApi, Scratch, Agent, Api<Pod>) {
    joined_with(name, "").await
}

/// [`joined`], with `extra` appended to the agent's config after its `[modules]` table (more
/// `modules` keys, or further tables).
async fn joined_with(name: &str, extra: &str) -> (FakeApi, Scratch, Agent, Api<Pod>) {
    let api = FakeApi::start().await;
    let (s, agent) = start_node_with(&api, name, extra).await;
    wait_ready(&api, name).await;
    let pods = Api::namespaced(api.client(), "default");
    (api, s, agent, pods)
}

/// Creates the pod `pod` bound to `node`, running the fixture `module`, and waits for it to be
/// Running and Ready.
async fn run_bound(pods: &Api<Pod>, pod_name: &str, node: &str, module: &str) -> Pod {
    pods.create(&PostParams::default(), &pod(pod_name, Some(node), &wasm(module), json!({})))
        .await
        .expect("pod");
    wait_pod(pods, pod_name, "Running", is_running_ready).await
}

async fn wait_ready(api: &FakeApi, name: &str) -> Node {
    let nodes: Api<Node> = Api::all(api.client());
    wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (node_condition(&n, "Ready")? == "True").then_some(n)
    })
    .await
}

async fn wait_pod(pods: &Api<Pod>, name: &str, what: &str, ok: impl Fn(&Pod) -> bool) -> Pod {
    wait_for_async(T, &format!("pod {name} {what}"), || async {
        let p = pods.get(name).await.ok()?;
        ok(&p).then_some(p)
    })
    .await
}

/// The first container's restart count and `running.startedAt`.
fn run_identity(p: &Pod) -> (i32, Option<String>) {
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .expect("a container");
    let started = c.state.as_ref().and_then(|s| s.running.as_ref()).and_then(|r| r.started_at.as_ref());
    (c.restart_count, started.map(|t| t.0.to_string()))
}

/// The agent never sent a request the server refused as wrong: forbidden, invalid, malformed.
/// (404 and 409 are the normal answers to racing a deletion, and the agent handles them.)
fn assert_never_refused(api: &FakeApi) {
    let refused: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.user.starts_with("system:node:") && matches!(r.code, 400 | 403 | 405 | 413 | 415 | 422))
        .map(|r| format!("{} {} -> {}: {}", r.method, r.path, r.code, r.body))
        .collect();
    assert!(refused.is_empty(), "the agent was refused: {refused:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registers_its_node_and_renews_its_lease() {
    let api = FakeApi::start().await;
    let name = "fake-register";
    let (_s, agent) = start_node(&api, name).await;
    let node = wait_ready(&api, name).await;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("kubernetes.io/hostname").map(String::as_str), Some(name));
    assert_eq!(labels.get("lichen.dev/runtime").map(String::as_str), Some("wasm"));
    let status = node.status.clone().expect("status");
    assert_eq!(status.allocatable.as_ref().and_then(|a| a.get("pods")).map(|q| q.0.as_str()), Some("110"));

    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let lease = wait_for_async(T, "the lease", || async { leases.get(name).await.ok() }).await;
    let owner = lease.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.uid.as_str()), node.metadata.uid.as_deref(), "owned by the Node");
    let first = lease.spec.and_then(|s| s.renew_time).expect("renewTime").0;
    wait_for_async(T, "the lease to be renewed", || async {
        let t = leases.get(name).await.ok()?.spec?.renew_time?.0;
        (t > first).then_some(())
    })
    .await;

    assert_never_refused(&api);
    let status_gets: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path_only().ends_with("/status"))
        .collect();
    assert!(status_gets.is_empty(), "a node may not GET nodes/status: {status_gets:?}");
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    let node = Api::<Node>::all(api.client()).get(name).await.expect("node");
    assert_eq!(node_condition(&node, "Ready").as_deref(), Some("False"), "NotReady on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_pods_run_and_a_finished_one_succeeds() {
    let name = "fake-pods";
    let (api, _s, agent, pods) = joined(name).await;
    pods.create(&PostParams::default(), &pod("sleeper", Some(name), &wasm("sleeper.wat"), json!({})))
        .await
        .expect("pod");
    let hello = pod("hello", Some(name), &wasm("hello.wat"), json!({"restartPolicy": "Never"}));
    pods.create(&PostParams::default(), &hello).await.expect("pod");
    let running = wait_pod(&pods, "sleeper", "Running and Ready", is_running_ready).await;
    let st = running.status.expect("status");
    assert_eq!(st.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(st.start_time.is_some());
    let done = wait_pod(&pods, "hello", "Succeeded", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
    })
    .await;
    let c = &done.status.expect("status").container_statuses.expect("containerStatuses")[0];
    let terminated = c.state.as_ref().and_then(|s| s.terminated.as_ref()).expect("terminated");
    assert_eq!(terminated.exit_code, 0);
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_410_the_agent_relists_and_keeps_its_running_pods() {
    let api = FakeApi::start().await;
    // No bookmarks: the agent's last resourceVersion then surely predates the compaction below.
    api.set_bookmark_interval(Duration::from_secs(3600));
    let name = "fake-relist";
    let (_s, agent) = start_node(&api, name).await;
    wait_ready(&api, name).await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("steady", Some(name), &wasm("sleeper.wat"), json!({})))
        .await
        .expect("pod");
    let before = run_identity(&wait_pod(&pods, "steady", "Running", is_running_ready).await);
    assert_eq!(before.0, 0);

    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    cms.create(&PostParams::default(), &cm("bump", json!({}))).await.expect("a write the agent does not see");
    let seen = api.requests().len();
    api.faults().compact();
    api.faults().close_watches();
    run_bound(&pods, "newcomer", name, "idle.wat").await;
    let relists = api.requests()[seen..]
        .iter()
        .filter(|r| r.method == "GET" && r.path_only() == "/api/v1/pods" && r.query("watch").is_none())
        .count();
    assert!(relists >= 1, "the agent re-listed after 410");
    let after = run_identity(&pods.get("steady").await.expect("pod"));
    assert_eq!(after, before, "the running pod was not restarted");
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_leaves_pods_running_and_heartbeats_resume() {
    let name = "fake-outage";
    let (api, _s, agent, pods) = joined(name).await;
    pods.create(&PostParams::default(), &pod("steady", Some(name), &wasm("sleeper.wat"), json!({})))
        .await
        .expect("pod");
    let before = run_identity(&wait_pod(&pods, "steady", "Running", is_running_ready).await);
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let renewed =
        leases.get(name).await.expect("lease").spec.and_then(|s| s.renew_time).expect("renewTime").0;

    api.faults().stop().await;
    tokio::time::sleep(Duration::from_secs(8)).await; // the outage itself, not an assertion
    assert!(alive(agent.pid()), "the agent is still running");
    api.faults().start().await;

    wait_for_async(Duration::from_secs(25), "the lease to be renewed after the outage", || async {
        let t = leases.get(name).await.ok()?.spec?.renew_time?.0;
        (t > renewed).then_some(())
    })
    .await;
    run_bound(&pods, "after", name, "idle.wat").await;
    assert_eq!(run_identity(&pods.get("steady").await.expect("pod")), before, "never restarted");
    assert_never_refused(&api);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_status_writes_are_retried() {
    let api = FakeApi::start().await;
    let name = "fake-retry";
    let (_s, agent) = start_node(&api, name).await;
    wait_ready(&api, name).await;
    api.faults().fail_next(3, 500, Some("/status"));
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    run_bound(&pods, "p", name, "sleeper.wat").await;
    let injected: Vec<String> =
        api.requests().into_iter().filter(|r| r.code == 500).map(|r| r.path_only().to_owned()).collect();
    assert_eq!(injected.len(), 3, "{injected:?}");
    assert!(injected.iter().any(|p| p == "/api/v1/namespaces/default/pods/p/status"), "{injected:?}");
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_server_still_gets_the_node_and_its_pods() {
    let api = FakeApi::start().await;
    api.faults().set_delay(Duration::from_millis(300));
    let name = "fake-slow";
    let (_s, agent) = start_node(&api, name).await;
    wait_ready(&api, name).await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    run_bound(&pods, "p", name, "sleeper.wat").await;
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_is_stopped_and_removed_with_grace_zero_and_its_uid() {
    let name = "fake-delete";
    let (api, s, agent, pods) = joined(name).await;
    let running = run_bound(&pods, "p", name, "sleeper.wat").await;
    let uid = running.metadata.uid.clone().expect("uid");
    pods.delete("p", &DeleteParams::default()).await.expect("delete");
    wait_for_async(T, "the pod object to disappear", || async {
        pods.get_opt("p").await.ok()?.is_none().then_some(())
    })
    .await;
    let node_user = format!("system:node:{name}");
    let deletes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "DELETE"
                && r.user == node_user
                && r.path_only() == "/api/v1/namespaces/default/pods/p"
        })
        .collect();
    // The one that removed it. A watch event still in flight can put the pod back on the agent's
    // list of deletions to finish, and a second DELETE then gets 404, which the agent takes as
    // done: an extra request, nothing a user sees.
    let last = deletes.iter().find(|r| r.code == 200).expect("the agent's DELETE removed the pod");
    assert!(deletes.iter().all(|r| r.code == 200 || r.code == 404), "{deletes:#?}");
    let body = last.json().expect("DeleteOptions body");
    let grace = body
        .get("gracePeriodSeconds")
        .and_then(Value::as_i64)
        .or_else(|| last.query("gracePeriodSeconds")?.parse().ok());
    assert_eq!(grace, Some(0), "{}", last.body);
    assert_eq!(
        body.pointer("/preconditions/uid").and_then(Value::as_str),
        Some(uid.as_str()),
        "{}",
        last.body
    );
    // And the node has forgotten it: its store no longer holds the pod.
    lichen_tests::wait_for(T, "the pod gone from `lichen status`", || {
        let report = s.status_json();
        (!report["pods"].as_array()?.iter().any(|p| p["key"] == "default/p")).then_some(())
    });
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_under_the_same_name_never_gets_the_old_status() {
    let name = "fake-recreate";
    let (api, _s, agent, pods) = joined(name).await;
    let old_image = wasm("sleeper.wat");
    let new_image = wasm("idle.wat");
    pods.create(&PostParams::default(), &pod("p", Some(name), &old_image, json!({}))).await.expect("pod");
    let old = wait_pod(&pods, "p", "Running", is_running_ready).await;
    let old_uid = old.metadata.uid.clone().expect("uid");

    // Graceful delete, then, while the agent stops it, a force delete and a new pod of the same name.
    pods.delete("p", &DeleteParams::default()).await.expect("delete");
    pods.delete("p", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("force");
    let created =
        pods.create(&PostParams::default(), &pod("p", Some(name), &new_image, json!({}))).await.expect("pod");
    let created_at = api.requests().len();
    let new_uid = created.metadata.uid.clone().expect("uid");
    let new = wait_pod(&pods, "p", "Running with the new pod", |p| {
        is_running_ready(p) && p.metadata.uid.as_deref() == Some(new_uid.as_str())
    })
    .await;
    let c = &new.status.clone().expect("status").container_statuses.expect("containerStatuses")[0];
    assert_eq!(c.image, new_image);
    assert_eq!(c.restart_count, 0);

    // Every status write after the recreation that landed was for the new pod.
    let node_user = format!("system:node:{name}");
    for r in api.requests()[created_at..]
        .iter()
        .filter(|r| r.user == node_user && r.path_only().ends_with("/pods/p/status"))
    {
        let body = r.json().expect("json patch body");
        let uid = body
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .expect("every status patch carries the uid");
        if r.code == 200 {
            assert_eq!(uid, new_uid, "{}", r.body);
        } else {
            assert_eq!((uid, r.code), (old_uid.as_str(), 409), "{}", r.body);
        }
    }
    let still = pods.get("p").await.expect("the new pod is not deleted");
    assert_eq!(still.metadata.uid.as_deref(), Some(new_uid.as_str()));
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

/// Creates the Secret `lagged`, has the fake's Node graph refuse its first `refusals` reads (as
/// the real Node authorizer does right after a binding), and binds `pod` to `node`: a sleeper
/// reading that Secret into its environment.
async fn lagged_secret_pod(api: &FakeApi, pods: &Api<Pod>, node: &str, pod_name: &str, refusals: usize) {
    let secrets: Api<Secret> = Api::namespaced(api.client(), "default");
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "lagged"}, "stringData": {"k": "v"}})).expect("s");
    secrets.create(&PostParams::default(), &secret).await.expect("secret");
    api.faults().lag_node_graph(refusals, "/secrets/lagged");
    let spec = json!({"containers": [{"name": "main", "image": wasm("sleeper.wat"),
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "lagged", "key": "k"}}}]}]});
    pods.create(&PostParams::default(), &pod(pod_name, Some(node), "", spec)).await.expect("pod");
}

/// Right after a binding the real Node authorizer refuses the pod's Secret (`403 … no relationship
/// found between node … and this object`) until its graph has the pod. The agent asks again at
/// once, as the kubelet does, so the pod starts within moments instead of at the next pass over
/// pods' inputs (every 5 s, once per refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_refused_while_the_node_authorizer_catches_up_is_fetched_again_at_once() {
    let name = "fake-graph-lag";
    let (api, _s, agent, pods) = joined_with(name, "").await;
    lagged_secret_pod(&api, &pods, name, "lagged", 3).await;
    wait_pod(&pods, "lagged", "Running", is_running_ready).await;

    let reads: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path_only().ends_with("/secrets/lagged"))
        .collect();
    let codes: Vec<u16> = reads.iter().map(|r| r.code).collect();
    assert_eq!(codes.get(..4), Some(&[403, 403, 403, 200][..]), "{codes:?}");
    let first_refusal_to_success = reads[3].at.duration_since(reads[0].at);
    assert!(
        first_refusal_to_success < lichen::cluster::inputs::RETRY,
        "read again at once, not at the next pass: {first_refusal_to_success:?}"
    );
    assert!(agent.stop().0.success());
}

/// `log.format = "json"`: every line the agent writes, through a lifecycle that logs much (a
/// Secret refused and fetched again, containers that exit with a code and trap with a message, a
/// pod deleted, the node stopping), at `debug`, is one JSON object in which no key appears twice.
/// A field named like the event's own text (`message`) once made `"message"` appear twice, and
/// log shippers keep one or the other; this is the guard against any such field coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_the_json_log_is_one_object_with_no_key_twice() {
    let name = "fake-json-log";
    let (api, _s, agent, pods) = joined_with(name, "[log]\nformat = \"json\"\nlevel = \"debug\"\n").await;
    lagged_secret_pod(&api, &pods, name, "sleeper", 2).await;
    let spec = json!({"restartPolicy": "Never", "containers": [
        {"name": "exits", "image": wasm("exit.wat")},
        {"name": "traps", "image": wasm("trap.wat")}]});
    pods.create(&PostParams::default(), &pod("ender", Some(name), "", spec)).await.expect("pod");
    wait_pod(&pods, "sleeper", "Running", is_running_ready).await;
    wait_pod(&pods, "ender", "Failed", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
    })
    .await;
    pods.delete("sleeper", &DeleteParams::default()).await.expect("delete");
    wait_for_async(T, "the deleted pod to be gone", || async {
        pods.get_opt("sleeper").await.ok().and_then(|p| p.is_none().then_some(()))
    })
    .await;
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));

    let mut ended = 0;
    for line in &log {
        let event = lichen_tests::strict_json::parse(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event.is_object() && event["fields"].is_object(), "one event object a line: {line}");
        if event["fields"]["message"] == "container ended" {
            ended += 1;
        }
    }
    assert!(
        ended >= 3 && log.len() > 50,
        "the lifecycle was logged ({ended} container ends, {} lines)",
        log.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_maps_secrets_and_the_service_account_token_reach_the_module_under_the_node_authorizer() {
    let name = "fake-config";
    // At `trace`, the most any operator turns on, so that no library's debugging output can carry
    // a credential into the log either.
    let (api, s, agent, pods) = joined_with(name, "[log]\nlevel = \"trace\"\n").await;
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let secrets: Api<Secret> = Api::namespaced(api.client(), "default");
    let env = json!({"name": "env", "image": wasm("hello.wat"),
        "env": [
            {"name": "GREETING_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
            {"name": "GREETING_SECRET", "valueFrom": {"secretKeyRef": {"name": "secret", "key": "password"}}}
        ],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "GREETING_FROM_"}]});
    let mount = json!([{"name": "cfg", "mountPath": "/cfg"}]);
    // The ServiceAccount admission plugin appends the token volume, so it is preopen 4.
    let spec = json!({
        "nodeName": name,
        "restartPolicy": "Never",
        "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
        "containers": [
            env,
            {"name": "files", "image": wasm("fsprobe.wat"), "args": ["read", "3", "app.toml"], "volumeMounts": mount},
            {"name": "token", "image": wasm("fsprobe.wat"), "args": ["read", "4", "token"], "volumeMounts": mount},
        ]
    });
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": "config"}, "spec": spec})).expect("pod");
    let created = pods.create(&PostParams::default(), &pod).await.expect("pod");

    // Before the ConfigMap exists the pod waits, saying why, as on a kubelet.
    let waiting = wait_for_async(T, "the pod to wait for its ConfigMap", || async {
        let st = pods.get("config").await.ok()?.status?;
        let w = st.container_statuses?.into_iter().find(|c| c.name == "env")?.state?.waiting?;
        (w.reason.as_deref() == Some("CreateContainerConfigError")).then_some(w.message.unwrap_or_default())
    })
    .await;
    assert!(waiting.contains("configmap \"cfg\" not found"), "{waiting}");
    let cm = cm("cfg", json!({"greeting": "hi from a configmap", "app.toml": "x = 1"}));
    cms.create(&PostParams::default(), &cm).await.expect("configmap");
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "secret"}, "stringData": {"password": "hunter2"}}),
    )
    .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("secret");
    let status = wait_for_async(T, "the pod to finish", || async {
        let st = pods.get("config").await.ok()?.status?;
        matches!(st.phase.as_deref(), Some("Succeeded" | "Failed")).then_some(st)
    })
    .await;
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{status:#?}");
    let out = s.pod_output("config", "env", 0);
    for want in [
        "GREETING_CM=hi from a configmap",
        "GREETING_SECRET=hunter2",
        "GREETING_FROM_greeting=hi from a configmap",
    ] {
        assert!(out.iter().any(|l| l == want), "{want} in {out:?}");
    }
    assert_eq!(s.pod_output("config", "files", 0), ["ok x = 1"]);
    let token = s.pod_output("config", "token", 0);
    assert!(token.first().is_some_and(|t| t.starts_with("ok ey")), "a JWT: {token:?}");

    // The token was asked for this pod, by UID, as the Node authorizer requires.
    let node_user = format!("system:node:{name}");
    let requests = api.requests();
    let token_request = requests
        .iter()
        .find(|r| {
            r.user == node_user && r.path_only().ends_with("/serviceaccounts/default/token") && r.code == 201
        })
        .expect("a TokenRequest");
    let bound = token_request.json().and_then(|b| b.pointer("/spec/boundObjectRef").cloned()).expect("bound");
    assert_eq!(
        (bound["kind"].as_str(), bound["uid"].as_str()),
        (Some("Pod"), created.metadata.uid.as_deref())
    );
    // Neither the secret's value, nor the node's bearer token, nor the pod's service account token
    // reaches the agent's log or any event it posted.
    let jwt = token[0].trim_start_matches("ok ").to_owned();
    let events: Api<Event> = Api::namespaced(api.client(), "default");
    let events = serde_json::to_string(&events.list(&ListParams::default()).await.expect("events").items)
        .expect("json");
    let kubeconfig = std::fs::read_to_string(s.dir.path().join("node.kubeconfig")).expect("kubeconfig");
    let node_token = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("token:"))
        .map(|t| t.trim().trim_matches('"').to_owned())
        .expect("the node's bearer token");
    let log = agent.log().join("\n");
    assert!(log.lines().count() > 100, "trace logging was on");
    for (what, value) in
        [("the secret", "hunter2".to_owned()), ("the node token", node_token), ("the pod token", jwt)]
    {
        assert!(!log.contains(&value), "{what} reached the agent's log");
        assert!(!events.contains(&value), "{what} reached an event");
    }
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_pods_mount_only_allowed_host_paths_and_never_the_state_dir() {
    let name = "fake-hostpath";
    // Relative to the config file, which lives in the scratch directory.
    let (api, s, agent, pods) = joined_with(name, "\n[runtime]\nallowed_host_paths = [\"shared\"]\n").await;
    let host_pod = |pod_name: &str, path: &std::path::Path| {
        let spec = json!({
            "restartPolicy": "Never",
            "volumes": [{"name": "host", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}],
            "containers": [{"name": "main", "image": wasm("fsprobe.wat"),
                "args": ["write", "3", "out.txt", "from-the-pod"],
                "volumeMounts": [{"name": "host", "mountPath": "/host"}]}],
        });
        pod(pod_name, Some(name), "", spec)
    };
    let allowed = s.dir.path().join("shared/data");
    let refused = [
        ("state", s.state.clone(), "state directory"),
        ("store", s.state.join("store"), "state directory"),
        ("holds-state", s.dir.path().to_owned(), "state directory"),
        ("elsewhere", s.dir.path().join("elsewhere"), "runtime.allowed_host_paths"),
    ];
    pods.create(&PostParams::default(), &host_pod("allowed", &allowed)).await.expect("pod");
    for (pod_name, path, _) in &refused {
        pods.create(&PostParams::default(), &host_pod(pod_name, path)).await.expect("pod");
    }

    let done = wait_pod(&pods, "allowed", "Succeeded", |p| {
        matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
    })
    .await;
    assert_eq!(done.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"), "{done:#?}");
    let written = std::fs::read_to_string(allowed.join("out.txt")).expect("the module wrote its hostPath");
    assert_eq!(written, "from-the-pod\n");

    for (pod_name, path, why) in &refused {
        let failed = wait_pod(&pods, pod_name, "Failed", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        })
        .await;
        let st = failed.status.expect("status");
        assert_eq!(st.reason.as_deref(), Some("UnsupportedPodSpec"), "{pod_name}: {st:#?}");
        let msg = st.message.unwrap_or_default();
        assert!(msg.contains("spec.volumes[0].hostPath.path") && msg.contains(why), "{pod_name}: {msg}");
        assert!(!path.join("out.txt").exists(), "{pod_name}: nothing ran");
    }
    assert!(!s.dir.path().join("elsewhere").exists(), "a refused hostPath is not created");
    assert_never_refused(&api);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_registers_again_and_its_lease_follows() {
    let api = FakeApi::start().await;
    let name = "fake-reregister";
    let (_s, agent) = start_node(&api, name).await;
    let old = wait_ready(&api, name).await.metadata.uid.expect("uid");
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    wait_for_async(T, "the lease", || async { leases.get(name).await.ok() }).await;
    api.delete_node(name).await;
    assert!(leases.get_opt(name).await.expect("get").is_none(), "the Lease goes with its Node");
    let nodes: Api<Node> = Api::all(api.client());
    let new = wait_for_async(T, "the node to come back", || async {
        let n = nodes.get(name).await.ok()?;
        (n.metadata.uid.as_deref() != Some(old.as_str()) && node_condition(&n, "Ready")? == "True")
            .then_some(n.metadata.uid)
    })
    .await
    .expect("uid");
    agent.wait_log(&["registering again"], T);
    wait_for_async(Duration::from_secs(25), "a Lease owned by the new Node", || async {
        let lease = leases.get(name).await.ok()?;
        let owner = lease.metadata.owner_references?.into_iter().next()?;
        (owner.uid == new).then_some(())
    })
    .await;
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_apiserver_restart_the_agent_relists_at_once() {
    let name = "fake-restart";
    let (api, _s, agent, pods) = joined(name).await;
    run_bound(&pods, "steady", name, "sleeper.wat").await;

    api.faults().stop().await;
    tokio::time::sleep(Duration::from_secs(8)).await; // the outage itself, not an assertion
    // Other writers moved the cluster on meanwhile, and a restarted apiserver rebuilds its watch
    // cache from etcd: the agent's resourceVersion is older than anything it still has. Without
    // the write, a bookmark may already have given the agent the newest resourceVersion, and a
    // watch from there is no 410.
    api.faults().write_elsewhere();
    let compacted = api.resource_version();
    api.faults().compact();
    let restarted = api.requests().len();
    api.faults().start().await;
    pods.create(&PostParams::default(), &pod("after", Some(name), &wasm("idle.wat"), json!({})))
        .await
        .expect("pod");

    // The watch that is told 410, then the re-list: the kubelet's reflector re-lists at once.
    let is_pods =
        |r: &lichen_tests::fakeapi::RequestRecord| r.method == "GET" && r.path_only() == "/api/v1/pods";
    let (gone, relist) =
        wait_for_async(Duration::from_secs(45), "a watch told 410 and a re-list", || async {
            let log = api.requests();
            let after = &log[restarted..];
            let gone = after.iter().position(|r| {
                is_pods(r)
                    && r.query("watch").is_some()
                    && r.query("resourceVersion")
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v < compacted)
            })?;
            let relist = after[gone..].iter().find(|r| is_pods(r) && r.query("watch").is_none())?;
            Some((after[gone].at, relist.at))
        })
        .await;
    let gap = relist.duration_since(gone);
    assert!(gap < Duration::from_secs(3), "re-listed {gap:?} after the 410");
    wait_pod(&pods, "after", "Running", is_running_ready).await;
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_pod_runs_again_after_a_kill_while_the_api_server_is_away() {
    let name = "fake-offline-restart";
    let (api, s, agent, pods) = joined(name).await;
    let before = run_bound(&pods, "keeper", name, "sleeper.wat").await;
    let done = pod("done-once", Some(name), &wasm("hello.wat"), json!({"restartPolicy": "Never"}));
    pods.create(&PostParams::default(), &done).await.expect("pod");
    wait_pod(&pods, "done-once", "Succeeded", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
    })
    .await;
    // startedAt has whole seconds: let the next run's differ.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    api.faults().stop().await;
    drop(agent); // SIGKILL, as a power cut would
    let agent = s.start();
    // No API server at all: the pod comes back from the store alone.
    agent.wait_log(&["resuming cluster pods from the store"], T);
    agent.wait_log(&["container started"], T);
    assert!(!api.faults().is_up().await);

    api.faults().start().await;
    agent.wait_log(&["listed pods bound to this node"], Duration::from_secs(40));
    let after = wait_pod(&pods, "keeper", "Running again after the restart", |p| {
        is_running_ready(p) && run_identity(p) != run_identity(&before)
    })
    .await;
    assert_eq!(after.metadata.uid, before.metadata.uid, "the same pod, not a recreated one");
    let log = agent.log();
    let starts = log.iter().filter(|l| l.contains("container started")).count();
    // One start: the keeper's. Reconnecting did not restart it, and the pod that had finished
    // was not run again.
    assert_eq!(starts, 1, "{}", log.join("\n"));
    assert!(!log.iter().any(|l| l.contains("stopping pod")), "{}", log.join("\n"));
    assert_never_refused(&api);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
}

fn waiting_reason(p: &Pod) -> Option<(String, String)> {
    let c = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let w = c.state.as_ref()?.waiting.as_ref()?;
    Some((w.reason.clone()?, w.message.clone().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_secrets_open_a_private_registry_and_pull_failures_show_as_the_kubelet_shows_them() {
    use lichen_tests::registry::{Registry, WASM_CONFIG_V0, WASM_LAYER};
    let name = "fake-pull";
    let api = FakeApi::start().await;
    let reg = Registry::start_with_auth("edge", "s3cret-pw");
    let module = wat::parse_file(fixture("hello.wat")).expect("fixture");
    reg.push_artifact("private/hello", "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &module)]);
    let (_s, agent) =
        start_node_with(&api, name, &format!("insecure_registries = [{:?}]\n", reg.host())).await;
    wait_ready(&api, name).await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let image = format!("{}/private/hello:1", reg.host());
    let never = json!({"restartPolicy": "Never"});

    // Without credentials the registry refuses: ErrImagePull, then ImagePullBackOff, naming why.
    pods.create(&PostParams::default(), &pod("anonymous", Some(name), &image, never.clone()))
        .await
        .expect("pod");
    let p = wait_pod(&pods, "anonymous", "a pull failure", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "ErrImagePull" || r == "ImagePullBackOff")
    })
    .await;
    let (_, message) = waiting_reason(&p).expect("waiting");
    assert!(message.contains("unauthorized"), "names the cause: {message}");
    assert_eq!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Pending"));
    wait_pod(&pods, "anonymous", "ImagePullBackOff", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "ImagePullBackOff")
    })
    .await;

    // A dockerconfigjson pull secret, read under the node authorizer, opens it.
    let auth = json!({"auths": {reg.host(): {"username": "edge", "password": "s3cret-pw"}}});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": auth.to_string()},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(api.client(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    let mut with_secret = never.clone();
    with_secret["imagePullSecrets"] = json!([{"name": "regcred"}]);
    pods.create(&PostParams::default(), &pod("private", Some(name), &image, with_secret)).await.expect("pod");
    let done = wait_pod(&pods, "private", "Succeeded", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
    })
    .await;
    let c = &done.status.expect("status").container_statuses.expect("statuses")[0];
    assert_eq!(c.image_id, sha256_hex(&module), "imageID is the module digest");

    // A missing image and `Never` each say so.
    let missing = format!("{}/private/absent:1", reg.host());
    let mut never_pull = with_secret_spec(&never);
    never_pull["containers"] = json!([{"name": "main", "image": missing, "imagePullPolicy": "Never"}]);
    pods.create(&PostParams::default(), &pod("never", Some(name), &missing, never_pull)).await.expect("pod");
    let p = wait_pod(&pods, "never", "ErrImageNeverPull", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "ErrImageNeverPull")
    })
    .await;
    assert!(waiting_reason(&p).expect("waiting").1.contains("pull policy of Never"));
    let events = Api::<Event>::namespaced(api.client(), "default");
    wait_for_async(T, "the Pulled event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Pulled")
                    && e.message.as_deref().is_some_and(|m| m.contains("Successfully pulled"))
            })
            .then_some(())
    })
    .await;
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

fn with_secret_spec(base: &Value) -> Value {
    let mut v = base.clone();
    v["imagePullSecrets"] = json!([{"name": "regcred"}]);
    v
}

fn sha256_hex(bytes: &[u8]) -> String {
    lichen_tests::registry::sha256_digest(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_recorded_while_away_survives_a_kill_and_never_goes_backwards() {
    let name = "fake-outbox";
    let (api, s, agent, pods) = joined(name).await;
    let before = run_bound(&pods, "keeper", name, "sleeper.wat").await;
    let mut timed = pod("timed", Some(name), &wasm("sleeper.wat"), json!({"restartPolicy": "Never"}));
    timed.metadata.annotations = Some([("lichen.dev/run-timeout-seconds".to_owned(), "2".to_owned())].into());
    pods.create(&PostParams::default(), &timed).await.expect("pod");
    wait_pod(&pods, "timed", "Running", is_running_ready).await;

    // Every phase the API server shows for the keeper from here on, in order.
    let phases = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = phases.clone();
    let watch_pods = pods.clone();
    let watcher = tokio::spawn(async move {
        let cfg = watcher::Config::default().fields("metadata.name=keeper");
        let mut stream = watcher::watcher(watch_pods, cfg).boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev
                && let Some(phase) = p.status.and_then(|s| s.phase)
            {
                seen.lock().expect("phases").push(phase);
            }
        }
    });

    api.faults().stop().await;
    // The timed pod ends while the API server is away; its Failed status can only go to the store.
    let report =
        lichen_tests::wait_for(T, "the timed pod Failed in the store, its status unreported", || {
            let report = s.status_json();
            let timed = report["pods"].as_array()?.iter().find(|p| p["key"] == "default/timed")?.clone();
            (timed["phase"] == "Failed" && timed["unreported"] == true).then_some(report)
        });
    assert_eq!(report["outbox"], 1, "the finished pod's status waits: {report}");
    assert!(report["contact"]["down_since"].is_string(), "offline is shown: {report}");
    drop(agent); // SIGKILL before it could report
    let agent = s.start();
    s.wait_running(T);
    // Running again, not the store's record from before the kill: the new run is a restart.
    let report = lichen_tests::wait_for(T, "the keeper's container running again", || {
        let report = s.status_json();
        let keeper = report["pods"].as_array()?.iter().find(|p| p["key"] == "default/keeper")?.clone();
        (keeper["restarts"] == 1 && keeper["containers"][0] == "main=running").then_some(report)
    });
    let keeper =
        report["pods"].as_array().expect("pods").iter().find(|p| p["key"] == "default/keeper").cloned();
    assert_eq!(keeper.as_ref().map(|k| k["phase"].clone()), Some(json!("Running")), "{report}");

    api.faults().start().await;
    let failed = wait_pod(&pods, "timed", "the status recorded before the kill", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
    })
    .await;
    let c = &failed.status.expect("status").container_statuses.expect("statuses")[0];
    let t = c.state.as_ref().and_then(|s| s.terminated.as_ref()).expect("terminated");
    assert_eq!(t.reason.as_deref(), Some("DeadlineExceeded"));
    let after = wait_pod(&pods, "keeper", "running again", |p| {
        is_running_ready(p) && run_identity(p) != run_identity(&before)
    })
    .await;
    let c = &after.status.expect("status").container_statuses.expect("statuses")[0];
    assert_eq!(c.restart_count, 1, "the run the kill ended counts as a restart");
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).expect("lastState");
    assert_eq!(last.reason.as_deref(), Some("AgentRestarted"));
    wait_for_async(T, "the outbox to drain", || async { (s.status_json()["outbox"] == 0).then_some(()) })
        .await;
    // The test's own watch reconnects after the outage on its own schedule (slow on a loaded
    // machine); what matters is that nothing it sees is other than Running.
    wait_for_async(T, "the test's watch to see the keeper's updates", || async {
        (seen_phases(&phases).len() >= 2).then_some(())
    })
    .await;
    watcher.abort();
    let phases = seen_phases(&phases);
    assert!(phases.iter().all(|p| p == "Running"), "the keeper never went back to Pending: {phases:?}");
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_offline_secs_cluster_pods_stop_and_they_come_back_with_the_api_server() {
    let name = "fake-max-offline";
    let (api, s, agent, pods) = joined_with(name, "\n[autonomy]\nmax_offline_secs = 3\n").await;
    run_bound(&pods, "bounded", name, "sleeper.wat").await;

    api.faults().stop().await;
    let warned = Instant::now();
    agent
        .wait_log(&["longer than autonomy.max_offline_secs; stopping cluster pods"], Duration::from_secs(40));
    agent.wait_log(&["pod removed", "default/bounded"], T);
    // Not before the limit: the heartbeat notices the outage within 10 s, then 3 s more.
    assert!(warned.elapsed() >= Duration::from_secs(3));
    let report = s.status_json();
    assert!(report["contact"]["offline_secs"].as_u64().is_some_and(|n| n >= 3), "{report}");
    assert_eq!(report["pods"].as_array().map(Vec::len), Some(0), "{report}");

    api.faults().start().await;
    agent.wait_log(&["the API server is reachable again"], Duration::from_secs(40));
    wait_pod(&pods, "bounded", "Running again", is_running_ready).await;
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_evicted_while_away_keeps_running_for_the_grace_then_its_deletion_is_confirmed() {
    let name = "fake-evicted";
    let (api, _s, agent, pods) = joined_with(name, "\n[autonomy]\nevicted_grace_secs = 4\n").await;
    run_bound(&pods, "evictee", name, "sleeper.wat").await;

    api.faults().stop().await;
    // The node-lifecycle controller gives up on the node and evicts the pod meanwhile.
    api.faults().evict("default", "evictee");
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.faults().start().await;
    agent.wait_log(&["deleted while the node was away", "default/evictee"], Duration::from_secs(40));
    let noticed = Instant::now();
    agent.wait_log(&["stopping pod", "default/evictee"], Duration::from_secs(30));
    let kept = noticed.elapsed();
    assert!(kept >= Duration::from_secs(3), "kept running for the grace, not {kept:?}");
    wait_for_async(T, "the final delete", || async {
        pods.get_opt("evictee").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_never_refused(&api);
    assert!(agent.stop().0.success());
}

/// libfaketime, which moves the wall clock of the process it is preloaded into.
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_jump_of_days_is_not_time_offline() {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: the clock-jump test needs libfaketime (CI installs it: apt-get install libfaketime)"
    );
    let name = "fake-clock-jump";
    let api = FakeApi::start().await;
    api.delete_node(name).await;
    let s = Scratch::new("");
    let kc = api.node_kubeconfig(name, s.dir.path()).await;
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n{}\n[autonomy]\nmax_offline_secs = 15\n",
        s.state.display().to_string(),
        kc.display().to_string(),
        s.modules_table()
    );
    std::fs::write(&s.config, config).expect("config");
    // The agent's wall clock reads this file on every call; its monotonic clock is left alone, as a
    // real jump (an RTC-less board syncing NTP) leaves it.
    let clock = s.dir.path().join("faketime");
    std::fs::write(&clock, "+0").expect("clock");
    let config_path = s.config.display().to_string();
    let clock_path = clock.display().to_string();
    let agent = Agent::start_with_env(
        &["run", "--config", &config_path],
        &s.state,
        &[
            ("LD_PRELOAD", FAKETIME_LIB),
            ("FAKETIME_TIMESTAMP_FILE", &clock_path),
            ("FAKETIME_NO_CACHE", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    wait_ready(&api, name).await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    run_bound(&pods, "steady", name, "sleeper.wat").await;

    api.faults().stop().await;
    agent.wait_log(&["heartbeat failed"], T);
    // Three days pass on the wall clock in an instant.
    std::fs::write(&clock, "+3d").expect("jump");
    // The agent's log timestamps are wall-clock: they show the jump really happened in there.
    let day = |l: &str| l.get(..10).and_then(|d| d.parse::<jiff::civil::Date>().ok());
    let first = day(&agent.log()[0]).expect("a dated log line");
    wait_for_async(T, "the agent to see the jump", || async {
        agent
            .log()
            .iter()
            .rev()
            .find_map(|l| day(l))
            .filter(|d| *d >= first.saturating_add(jiff::Span::new().days(2)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = s.status_json();
    let offline = report["contact"]["offline_secs"].as_u64().expect("offline_secs");
    assert!(offline < 15, "a clock jump is not time offline: {offline}s ({report})");
    assert!(!agent.log().iter().any(|l| l.contains("stopping cluster pods")), "{}", agent.log().join("\n"));
    // The limit itself still holds, on the monotonic clock.
    agent
        .wait_log(&["longer than autonomy.max_offline_secs; stopping cluster pods"], Duration::from_secs(30));
    drop(agent);
}

fn seen_phases(phases: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    phases.lock().expect("phases").clone()
}

// ---------------------------------------------------------------------------------------------
// Bootstrap-token join and certificate rotation (the fake in TLS mode, with a real CA)
// ---------------------------------------------------------------------------------------------

/// A board as flashed: a config with `[join]`, the cluster CA next to it, and the bootstrap token
/// in `<state_dir>/bootstrap-token` (where first boot puts it). Returns the token.
fn flash_board(api: &FakeApi, s: &Scratch, name: &str) -> String {
    let token = api.bootstrap_token();
    std::fs::write(s.dir.path().join("ca.crt"), api.ca_pem()).expect("ca");
    std::fs::create_dir_all(&s.state).expect("state dir");
    std::fs::write(s.state.join("bootstrap-token"), format!("{token}\n")).expect("token");
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\n{}\n[join]\nserver = {:?}\nca_cert = \"ca.crt\"\n",
        s.state.display().to_string(),
        s.modules_table(),
        api.url(),
    );
    std::fs::write(&s.config, config).expect("config");
    token
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn csrs(api: &FakeApi) -> Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest> {
    Api::all(api.client())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_joins_with_only_a_bootstrap_token_and_runs_as_its_node() {
    let api = FakeApi::start_tls().await;
    let name = "fake-join";
    let s = Scratch::new("");
    let token = flash_board(&api, &s, name);
    let agent = s.start();
    wait_ready(&api, name).await;

    // One CSR, asked by the bootstrap token's user, for exactly the node's identity and usages.
    let list = csrs(&api).list(&ListParams::default()).await.expect("csrs");
    assert_eq!(list.items.len(), 1);
    let csr = &list.items[0];
    let spec = &csr.spec;
    assert_eq!(spec.signer_name, "kubernetes.io/kube-apiserver-client-kubelet");
    assert_eq!(
        spec.usages.clone().unwrap_or_default(),
        ["digital signature", "key encipherment", "client auth"],
        "the usages Kubernetes 1.20's approver requires"
    );
    let token_id = token.split('.').next().expect("id");
    assert_eq!(spec.username.as_deref(), Some(format!("system:bootstrap:{token_id}").as_str()));
    assert!(csr.status.as_ref().and_then(|s| s.certificate.as_ref()).is_some(), "signed");

    // The token did nothing else; afterwards the node speaks as itself, by its certificate.
    let requests = api.requests();
    let by_token: Vec<_> = requests.iter().filter(|r| r.user.starts_with("system:bootstrap:")).collect();
    assert!(
        by_token
            .iter()
            .all(|r| r.path_only().starts_with("/apis/certificates.k8s.io/v1/certificatesigningrequests")),
        "{by_token:#?}"
    );
    // The Node can be Ready before its first heartbeat reaches the API server: wait for the Lease
    // request rather than expect it in the snapshot above.
    wait_for_async(T, "the node's Lease request, as the node", || async {
        api.requests()
            .iter()
            .any(|r| r.user == format!("system:node:{name}") && r.path.contains("/leases/"))
            .then_some(())
    })
    .await;
    assert_never_refused(&api);

    // What is left on the board: a private key that never left it, a kubeconfig without the
    // token, and no token at all.
    let kubeconfig = s.state.join("node.kubeconfig");
    assert_eq!(mode(&kubeconfig), 0o600);
    assert_eq!(mode(&s.state.join("pki")), 0o700);
    let text = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
    assert!(!text.contains(&token) && !text.contains("token:"), "{text}");
    let keys: Vec<_> = std::fs::read_dir(s.state.join("pki"))
        .expect("pki")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(mode(&keys[0]), 0o600);
    assert!(!s.state.join("bootstrap-token").exists(), "the token is deleted after the join");
    let secret = token.split('.').nth(1).expect("secret");
    assert!(!agent.log().iter().any(|l| l.contains(secret)), "the token secret is never logged");

    // It runs pods bound to it like any node.
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    run_bound(&pods, "joined-pod", name, "sleeper.wat").await;

    // A restart uses the credentials it has: no second CSR.
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    let agent = s.start();
    agent.wait_log(&["node registered"], T);
    assert_eq!(csrs(&api).list(&ListParams::default()).await.expect("csrs").items.len(), 1);
    assert_never_refused(&api);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_nobody_approves_times_out_and_says_what_to_do() {
    let api = FakeApi::start_tls().await;
    api.set_auto_approve(false);
    let s = Scratch::new("");
    flash_board(&api, &s, "fake-unapproved");
    let args = ["join", "--only", "--join-approval-timeout-secs", "2", "--config"];
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.push(s.config.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (exit, log) = Agent::start(&args, &s.state).wait(T);
    let log = log.join("\n");
    assert!(!exit.success(), "{log}");
    assert!(log.contains("was not approved and signed within 2s"), "{log}");
    assert!(log.contains("kubectl certificate approve node-csr-fake-unapproved-"), "{log}");
    assert!(!s.state.join("node.kubeconfig").exists());
    assert!(s.state.join("bootstrap-token").exists(), "the token is kept until a join succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_certificate_is_renewed_before_it_expires_and_pods_keep_running() {
    let api = FakeApi::start_tls().await;
    let lifetime = Duration::from_secs(24);
    api.set_cert_lifetime(lifetime);
    let name = "fake-rotate";
    let s = Scratch::new("");
    flash_board(&api, &s, name);
    let agent = s.start();
    wait_ready(&api, name).await;
    let joined_at = Instant::now();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let before = run_identity(&run_bound(&pods, "steady", name, "sleeper.wat").await);

    // A second CSR, this time from the node itself (a renewal), between 70% and 90% of the life.
    let renewal = wait_for_async(Duration::from_secs(40), "a renewal CSR", || async {
        let list = csrs(&api).list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|c| c.spec.username.as_deref() == Some(&format!("system:node:{name}")))
    })
    .await;
    let at = joined_at.elapsed();
    assert!(at >= lifetime * 6 / 10 && at <= lifetime, "renewed after {at:?} of {lifetime:?}");
    assert!(renewal.metadata.name.as_deref().is_some_and(|n| n.starts_with("node-csr-")));
    agent.wait_log(&["switched to the renewed node certificate"], T);

    // Past the first certificate's expiry, the node still heartbeats: it uses the new one.
    tokio::time::sleep(lifetime.saturating_sub(joined_at.elapsed()) + Duration::from_secs(2)).await;
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let first = leases.get(name).await.expect("lease").spec.and_then(|s| s.renew_time).expect("renewTime").0;
    wait_for_async(T, "a lease renewal after the first certificate expired", || async {
        let t = leases.get(name).await.ok()?.spec?.renew_time?.0;
        (t > first).then_some(())
    })
    .await;
    let unauthorized: Vec<_> = api.requests().into_iter().filter(|r| r.code == 401).collect();
    assert!(unauthorized.is_empty(), "no request went out with an expired certificate: {unauthorized:#?}");
    let after = run_identity(&pods.get("steady").await.expect("pod"));
    assert_eq!(before, after, "the pod was not restarted by the rotation");
    assert_never_refused(&api);
    agent.stop();
}

// ---------------------------------------------------------------------------------------------
// The kubelet API: kubectl logs through the API server, and callers refused directly
// ---------------------------------------------------------------------------------------------

/// `curl -k` to the node's kubelet API: (status code, body). The test does not verify the serving
/// certificate, as an API server without `--kubelet-certificate-authority` does not.
fn kubelet_call(port: u16, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let (code, _, body) = kubelet_call_typed(port, method, path, bearer);
    (code, body)
}

/// [`kubelet_call`] with the answer's content type: status code, content type, body.
fn kubelet_call_typed(port: u16, method: &str, path: &str, bearer: Option<&str>) -> (u16, String, String) {
    let mut c = std::process::Command::new("curl");
    c.args(["-sk", "-X", method, "-w", "\n%{content_type}\n%{http_code}", "--max-time", "10"]);
    if let Some(t) = bearer {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(format!("https://127.0.0.1:{port}{path}")).output().expect("curl (CI installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let (body, content_type) = rest.rsplit_once('\n').unwrap_or(("", ""));
    (code.trim().parse().unwrap_or(0), content_type.to_owned(), body.to_owned())
}

/// A TLS fake API server and a node `name` on it with node credentials and its kubelet API on a
/// free port, once Ready: the server, the scratch layout, the agent, the port and the Node.
async fn ready_kubelet_node(name: &str) -> (FakeApi, Scratch, lichen_tests::Agent, u16, Node) {
    let api = FakeApi::start_tls().await;
    api.delete_node(name).await;
    let s = Scratch::new("");
    let kc = api.node_kubeconfig(name, s.dir.path()).await;
    let port = lichen_tests::free_port();
    let agent = lichen_tests::start_kubelet_node(&s, name, &kc, port);
    let node = wait_ready(&api, name).await;
    (api, s, agent, port, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_go_through_the_api_server_to_the_kubelet_api_and_strangers_are_refused() {
    use kube::api::LogParams;
    let name = "fake-logs";
    let (api, _s, agent, port, node) = ready_kubelet_node(name).await;
    let endpoint = node
        .status
        .as_ref()
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref());
    assert_eq!(endpoint.map(|e| e.port), Some(i32::from(port)));
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    run_bound(&pods, "talker", name, "sleeper.wat").await;
    pods.create(
        &PostParams::default(),
        &pod("exiter", Some(name), &wasm("exit.wat"), json!({"restartPolicy": "Always"})),
    )
    .await
    .expect("pod");

    // Through the API server, as kubectl logs asks.
    let text = wait_for_async(T, "the log through the API server", || async {
        let t = pods.logs("talker", &LogParams::default()).await.ok()?;
        t.contains("tick 2").then_some(t)
    })
    .await;
    assert!(text.starts_with("started\n"), "{text}");
    let tail = pods
        .logs("talker", &LogParams { tail_lines: Some(1), timestamps: true, ..Default::default() })
        .await
        .expect("tail");
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(
        tail.split_once(' ').is_some_and(|(ts, rest)| ts.contains('T') && rest.starts_with("tick")),
        "{tail}"
    );
    {
        use futures::AsyncBufReadExt;
        let stream = pods
            .log_stream("talker", &LogParams { follow: true, tail_lines: Some(1), ..Default::default() })
            .await
            .expect("follow");
        let mut lines = stream.lines();
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(T, async {
            while let Some(Ok(line)) = lines.next().await {
                seen.push(line);
                if seen.len() >= 3 {
                    break;
                }
            }
        })
        .await;
        assert!(seen.len() >= 3 && seen.iter().all(|l| l.starts_with("tick")), "followed lines: {seen:?}");
    }
    // --previous: the run before the restart.
    wait_pod(&pods, "exiter", "restarted", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.restart_count >= 1)
    })
    .await;
    let previous =
        pods.logs("exiter", &LogParams { previous: true, ..Default::default() }).await.expect("previous");
    assert_eq!(previous, "exiting with 3\n", "the previous run's output");
    // No previous run: the node answers 404 (below, called directly), which the API server turns
    // into a NotFound Status of its own wording, as the real one's response checker does.
    let missing = pods
        .logs("talker", &LogParams { previous: true, ..Default::default() })
        .await
        .expect_err("no previous run");
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"
            && s.message == "the server could not find the requested resource ( pods/log talker)"),
        "{missing:?}"
    );

    // Directly: nobody anonymous, nobody the API server does not vouch for or allow.
    let path = "/containerLogs/default/talker/main";
    let (code, body) = kubelet_call(port, "GET", path, None);
    assert_eq!(code, 401, "anonymous: {body}");
    let (code, _) = kubelet_call(port, "GET", path, Some("not-a-token"));
    assert_eq!(code, 401, "an unknown token");
    api.add_user_token("t-viewer", "viewer", &["viewers"]);
    let (code, body) = kubelet_call(port, "GET", path, Some("t-viewer"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("user=viewer") && body.contains("subresource=proxy"), "{body}");
    api.add_user_token("t-ops", "ops", &["operators"]);
    api.grant("ops", "get", "nodes", Some("proxy"));
    api.grant("ops", "create", "nodes", Some("proxy"));
    let (code, body) = kubelet_call(port, "GET", &format!("{path}?tailLines=2"), Some("t-ops"));
    assert_eq!((code, body.lines().count()), (200, 2), "{body}");
    let (code, body) = kubelet_call(port, "GET", &format!("{path}?previous=true"), Some("t-ops"));
    assert_eq!(
        (code, body.as_str()),
        (404, "previous terminated container \"main\" in pod \"default/talker\" not found\n"),
        "the node's own answer when there is no previous run"
    );
    // exec, attach and port-forward: a metav1.Status kubectl can decode (it shows the message), not
    // the text/plain 501 that kubectl printed as an empty `Error from server: `.
    for (what, path) in [
        ("exec", "/exec/default/talker/main?command=sh&output=1"),
        ("attach", "/attach/default/talker/main?output=1"),
        ("port-forward", "/portForward/default/talker"),
    ] {
        let (code, content_type, body) = kubelet_call_typed(port, "POST", path, Some("t-ops"));
        assert_eq!(code, 405, "{what}: {body}");
        assert_eq!(content_type, "application/json", "{what}");
        let status: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(
            (&status["kind"], &status["apiVersion"], &status["status"], &status["reason"], &status["code"]),
            (&json!("Status"), &json!("v1"), &json!("Failure"), &json!("MethodNotAllowed"), &json!(405)),
            "{what}: {body}"
        );
        let message = status["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(&format!("kubectl {what} is not supported on this Lichen node"))
                && message.contains("WebAssembly (WASI) module")
                && message.contains("use kubectl logs"),
            "{what}: {message}"
        );
    }
    let (code, _) = kubelet_call(port, "GET", "/containerLogs/default/nobody/main", Some("t-ops"));
    assert_eq!(code, 404);

    assert_never_refused(&api);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    assert!(!log.iter().any(|l| l.contains("t-ops") || l.contains("t-viewer")), "tokens never logged");
}

/// The containers' CPU seconds of `pod` in a decoded scrape.
fn cpu_of(scrape: &lichen_tests::top::ResourceScrape, pod: &str) -> Option<f64> {
    scrape.pod("default", pod).first().map(|(_, p)| p.cpu_seconds)
}

/// What metrics-server reads for `kubectl top` and the autoscaler: `/metrics/resource` and
/// `/stats/summary` on the node's kubelet API, called directly with the tokens the API server
/// vouches for, as metrics-server calls every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_top_finds_cpu_and_memory_of_the_node_and_its_pods_in_the_kubelet_api() {
    use lichen_tests::top::decode;
    let name = "fake-top";
    let (api, _s, agent, port, _) = ready_kubelet_node(name).await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let spinner = run_bound(&pods, "spinner", name, "loop.wat").await;
    run_bound(&pods, "idler", name, "idle.wat").await;

    // Authorized as the kubelet authorizes: /metrics/* is nodes/metrics, /stats/* is nodes/stats,
    // and nodes/proxy (enough for logs) is not enough.
    let metrics = "/metrics/resource";
    let summary = "/stats/summary?only_cpu_and_memory=true";
    assert_eq!(kubelet_call(port, "GET", metrics, None).0, 401, "anonymous");
    assert_eq!(kubelet_call(port, "GET", summary, Some("not-a-token")).0, 401, "an unknown token");
    api.add_user_token("t-logs", "logs-reader", &["operators"]);
    api.grant("logs-reader", "get", "nodes", Some("proxy"));
    let (code, body) = kubelet_call(port, "GET", metrics, Some("t-logs"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("user=logs-reader") && body.contains("subresource=metrics"), "{body}");
    let (code, body) = kubelet_call(port, "GET", summary, Some("t-logs"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("subresource=stats"), "{body}");
    api.add_user_token("t-ms", "metrics-server", &["system:serviceaccounts"]);
    api.grant("metrics-server", "get", "nodes", Some("metrics"));
    api.grant("metrics-server", "get", "nodes", Some("stats"));
    let scrape = || {
        let (code, body) = kubelet_call(port, "GET", metrics, Some("t-ms"));
        assert_eq!(code, 200, "{body}");
        decode(&body)
    };

    // A busy pod's counter grows; an idle one's barely moves over the same time.
    let first = wait_for(T, "both pods in the resource metrics", || {
        let s = scrape();
        (cpu_of(&s, "spinner").is_some() && cpu_of(&s, "idler").is_some()).then_some(s)
    });
    assert_eq!(first.scrape_error, 0.0);
    let containers: Vec<&str> = first.pod("default", "spinner").iter().map(|(c, _)| *c).collect();
    assert_eq!(containers, vec!["main"]);
    let since = Instant::now();
    let later = wait_for(T, "the spinner's CPU counter to grow by half a second", || {
        let s = scrape();
        (cpu_of(&s, "spinner")? - cpu_of(&first, "spinner")? >= 0.5).then_some(s)
    });
    let wall = since.elapsed().as_secs_f64();
    let idle = cpu_of(&later, "idler").expect("idler") - cpu_of(&first, "idler").expect("idler");
    assert!(idle < 0.02 * wall.max(1.0), "the idle pod used {idle} s of CPU in {wall} s");
    assert!(later.node_cpu_seconds >= first.node_cpu_seconds + 0.5, "the host's CPU includes the spinner");
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let (_, point) = later.pod("default", "spinner")[0];
    assert!((now_ms - point.timestamp_ms).abs() < 10_000, "sampled now: {point:?}");
    assert!((now_ms - later.node_timestamp_ms).abs() < 10_000);
    assert!(point.memory_bytes >= 65536.0, "one page of linear memory and the instance: {point:?}");
    let started = point.start_time_seconds * 1000.0;
    assert!(started <= now_ms as f64 && now_ms as f64 - started < 120_000.0, "{point:?}");
    let pod_cpu = later.pod_cpu_seconds.get(&("default".to_owned(), "spinner".to_owned()));
    assert_eq!(pod_cpu, Some(&point.cpu_seconds), "a pod's CPU is its containers'");

    // The Summary: the same figures in the stats API's shape, with rates.
    let (code, body) = kubelet_call(port, "GET", summary, Some("t-ms"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["node"]["nodeName"], name);
    assert!(v["node"]["cpu"]["usageCoreNanoSeconds"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["node"]["memory"]["workingSetBytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    let listed = v["pods"].as_array().expect("pods");
    let pod = listed.iter().find(|p| p["podRef"]["name"] == "spinner").expect("the spinner");
    assert_eq!(pod["podRef"]["namespace"], "default");
    assert_eq!(pod["podRef"]["uid"].as_str(), spinner.metadata.uid.as_deref());
    assert!(pod["startTime"].as_str().is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()), "{pod}");
    let main = &pod["containers"][0];
    assert_eq!(main["name"], "main");
    assert!(main["cpu"]["usageCoreNanoSeconds"].as_u64().is_some_and(|n| n >= 500_000_000), "{main}");
    assert!(main["cpu"]["usageNanoCores"].as_u64().is_some_and(|n| n > 100_000_000), "busy: {main}");
    assert!(main["memory"]["workingSetBytes"].as_u64().is_some_and(|n| n >= 65536), "{main}");
    let idler = listed.iter().find(|p| p["podRef"]["name"] == "idler").expect("the idler");
    assert!(
        idler["containers"][0]["cpu"]["usageNanoCores"].as_u64().is_some_and(|n| n < 20_000_000),
        "{idler}"
    );

    // A deleted pod's series go with it.
    pods.delete("spinner", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("delete");
    let gone = wait_for(T, "the spinner's series to disappear", || {
        let s = scrape();
        cpu_of(&s, "spinner").is_none().then_some(s)
    });
    assert!(cpu_of(&gone, "idler").is_some(), "the idler stays");
    let (_, body) = kubelet_call(port, "GET", summary, Some("t-ms"));
    assert!(!body.contains("\"spinner\""), "{body}");

    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
}
