//! Agent images in a real registry (Debian's `docker-registry` on loopback), as an operator and a
//! node use them: `lichen push --agent` and `lichen sign` run as the real binary, then the node's
//! side from library code (`lichen::upgrade::registry`): resolving the pinned image for this
//! platform, checking its signature against trusted keys, and downloading the binary, resuming a
//! cut download with a range request.

use std::path::{Path, PathBuf};

use lichen::config::ModulesConfig;
use lichen::upgrade::artifact::Platform;
use lichen::upgrade::registry::{AgentRegistry, UpgradeFetchError, parse_reference};
use lichen::upgrade::signature::TrustedKeys;
use lichen_tests::agent_image::{field, p256_key, stamped_copy};
use lichen_tests::registry::{FaultMode, FaultProxy, Registry, WASM_CONFIG_V0, WASM_LAYER, sha256_digest};
use lichen_tests::{Scratch, lichen_err, lichen_ok};

/// The agent binary under test as an ELF file (not a runner script around it).
fn agent_elf() -> PathBuf {
    match std::env::var_os("LICHEN_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            exe.parent().and_then(Path::parent).map(|d| d.join("lichen")).expect("target dir")
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn modules_config(reg: &Registry) -> ModulesConfig {
    ModulesConfig { insecure_registries: vec![reg.host()], ..ModulesConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_image_pushed_signed_resolved_verified_and_downloaded() {
    let reg = Registry::start();
    let s = Scratch::new(&format!("[modules]\ninsecure_registries = [{:?}]\n", reg.host()));
    let dir = s.dir.path();
    let own = agent_elf();
    let own_bytes = std::fs::read(&own).expect("read the agent binary");
    let platform = Platform::of_elf(&own_bytes).expect("the test build is a published platform");
    let version = lichen::version::read_version(&own_bytes).expect("a lichen binary");

    // A second build of the same platform: a version-stamped copy.
    let (stamped, _) = stamped_copy(&own, dir, "ci.2");
    let image = format!("{}/fleet/lichen-agent:{version}", reg.host());

    // Refused before anything is pushed: two binaries for one platform, a script, a non-Lichen ELF.
    let e = lichen_err(s.lichen(&["push", "--agent", path(&own), path(&stamped), &image], ""));
    assert!(
        e.contains(&format!("two binaries for {platform}; an agent image holds one per platform")),
        "{e}"
    );
    let script = dir.join("lichen.sh");
    std::fs::write(&script, "#!/bin/sh\nexec lichen \"$@\"\n").expect("script");
    let e = lichen_err(s.lichen(&["push", "--agent", path(&script), &image], ""));
    assert!(e.contains("lichen.sh: not an ELF executable"), "{e}");
    let e = lichen_err(s.lichen(&["push", "--agent", "/bin/true", &image], ""));
    assert!(e.contains("/bin/true: not a Lichen agent binary"), "{e}");
    let e = lichen_err(s.lichen(&["push", path(&own), path(&stamped), &image], ""));
    assert!(e.contains("a module push takes one .wasm file; to publish agent binaries add --agent"), "{e}");

    // The test build, and a second platform's binary beside it: a copy whose ELF header names the
    // other 64-bit machine (aarch64, or x86-64 on an aarch64 host). Pushing reads only the header
    // and the version field, and nothing here runs it. (A cross-built binary lying in the target
    // dir is not used: it may be older than this build, without the version field.)
    let mut binaries = vec![own.clone()];
    let (other, other_machine) =
        if platform == Platform::Arm64 { (Platform::Amd64, 62u16) } else { (Platform::Arm64, 183u16) };
    let mut other_bytes = own_bytes.clone();
    other_bytes[18..20].copy_from_slice(&other_machine.to_le_bytes());
    let other_binary = dir.join("lichen-other-platform");
    std::fs::write(&other_binary, &other_bytes).expect("write the other platform's binary");
    assert_eq!(Platform::of_elf(&other_bytes).expect("an ELF header"), other);
    binaries.push(other_binary.clone());
    let mut args = vec!["push", "--agent"];
    args.extend(binaries.iter().map(|b| path(b)));
    args.push(&image);
    let out = lichen_ok(s.lichen(&args, ""));
    let pinned = field(&out, "image").to_owned();
    let index_digest = pinned.rsplit_once('@').expect("pinned").1.to_owned();
    assert!(out.contains(&format!("pushed {image} (index {index_digest})")), "{out}");
    assert!(out.contains(&format!("lichen.dev/agent-image={pinned}")), "{out}");
    assert!(out.contains(&format!("lichen {version}  binary {}", sha256_digest(&own_bytes))), "{out}");
    // What the registry holds is the index the digest names.
    let served = reg.request(
        "GET",
        &format!("/v2/fleet/lichen-agent/manifests/{version}"),
        &[("Accept", "application/vnd.oci.image.index.v1+json")],
        &[],
    );
    assert_eq!(sha256_digest(&served.body), index_digest);
    let index: serde_json::Value = serde_json::from_slice(&served.body).expect("index json");
    assert_eq!(index["artifactType"], "application/vnd.lichen.agent.v1");
    assert_eq!(index["manifests"].as_array().expect("manifests").len(), binaries.len());

    // The node's side.
    let registry = AgentRegistry::new(&modules_config(&reg)).expect("registry client");
    let pinned_ref = parse_reference(&pinned).expect("pinned reference");
    let resolved = registry.resolve(&pinned_ref, platform, None).await.expect("resolve");
    assert_eq!(resolved.version, version);
    assert_eq!(resolved.binary_digest, sha256_digest(&own_bytes));
    assert_eq!(resolved.binary_size, own_bytes.len() as u64);
    assert_eq!(resolved.index_digest, index_digest);
    let r = registry.resolve(&pinned_ref, other, None).await.expect("resolve the other platform");
    assert_eq!(r.binary_digest, sha256_digest(&other_bytes));
    let e = registry.resolve(&pinned_ref, Platform::ArmV7, None).await.unwrap_err();
    assert!(e.to_string().contains("has no linux/arm/v7 binary (it has: "), "{e}");
    assert!(!e.is_retryable());
    // A module pinned by digest is not an agent image.
    let module = reg.push_artifact(
        "fleet/lichen-agent",
        "a-module",
        WASM_CONFIG_V0,
        b"{}",
        &[(WASM_LAYER, b"\0asm\x01\0\0\0")],
    );
    let module = parse_reference(&format!("{}/fleet/lichen-agent@{module}", reg.host())).expect("module ref");
    let e = registry.resolve(&module, platform, None).await.unwrap_err();
    assert!(e.to_string().contains("not a Lichen agent image: expected an OCI image index"), "{e}");
    let by_tag = parse_reference(&image).expect("tag");
    let e = registry.resolve(&by_tag, platform, None).await.unwrap_err();
    assert!(matches!(e, UpgradeFetchError::NotPinned(_)), "{e}");

    // Signatures: none yet, then one by the trusted key; another key does not verify it.
    let (key, key_pub) = p256_key(dir, "release");
    let (other, other_pub) = p256_key(dir, "other");
    let trusted = TrustedKeys::load(std::slice::from_ref(&key_pub)).expect("trusted key");
    let untrusted = TrustedKeys::load(std::slice::from_ref(&other_pub)).expect("other key");
    let e = registry.verify_signature(&pinned_ref, &trusted, None).await.unwrap_err();
    assert!(
        e.to_string().contains("unsigned: no application/vnd.dev.cosign.simplesigning.v1+json layer"),
        "{e}"
    );
    assert!(!e.is_retryable());
    let out = lichen_ok(s.lichen(&["sign", "--key", path(&key), &pinned], ""));
    let sig_tag = format!("sha256-{}.sig", &index_digest[7..]);
    assert!(out.contains(&sig_tag), "{out}");
    registry.verify_signature(&pinned_ref, &trusted, None).await.expect("signed by the trusted key");
    let e = registry.verify_signature(&pinned_ref, &untrusted, None).await.unwrap_err();
    assert!(e.to_string().contains("bad signature: none of the 1 signature(s)"), "{e}");
    // A second signer appends; both keys then verify, and the first signature is still there.
    lichen_ok(s.lichen(&["sign", "--key", path(&other), &pinned], ""));
    registry.verify_signature(&pinned_ref, &untrusted, None).await.expect("second signer");
    registry.verify_signature(&pinned_ref, &trusted, None).await.expect("first signer kept");
    let sig = reg.request(
        "GET",
        &format!("/v2/fleet/lichen-agent/manifests/{sig_tag}"),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        &[],
    );
    let sig: serde_json::Value = serde_json::from_slice(&sig.body).expect("signature manifest");
    assert_eq!(sig["layers"].as_array().expect("layers").len(), 2, "{sig}");
    // Signing by tag is refused (a tag can move).
    let e = lichen_err(s.lichen(&["sign", "--key", path(&key), &image], ""));
    assert!(e.contains("is not pinned by digest"), "{e}");

    // Push and sign in one go: the stamped build under another tag.
    let image2 = format!("{}/fleet/lichen-agent:ci.2", reg.host());
    let out =
        lichen_ok(s.lichen(&["push", "--agent", path(&stamped), &image2, "--sign-key", path(&key)], ""));
    let pinned2 = parse_reference(field(&out, "image")).expect("pinned");
    registry.verify_signature(&pinned2, &trusted, None).await.expect("signed at push");
    let r2 = registry.resolve(&pinned2, platform, None).await.expect("resolve ci.2");
    assert_eq!(r2.version, format!("{version}+ci.2"));
    // A signature of one image does not vouch for another: the first image's signature layer
    // copied under the second's tag names the first digest.
    let first_sig = reg.request(
        "GET",
        &format!("/v2/fleet/lichen-agent/manifests/{sig_tag}"),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        &[],
    );
    let second_tag = format!("sha256-{}.sig", &pinned2.digest().expect("digest")[7..]);
    reg.push_manifest(
        "fleet/lichen-agent",
        &second_tag,
        "application/vnd.oci.image.manifest.v1+json",
        &first_sig.body,
    );
    let e = registry.verify_signature(&pinned2, &trusted, None).await.unwrap_err();
    assert!(e.to_string().contains("signature is for another image"), "{e}");

    // Download: whole, checked, renamed from .part to the digest's hex.
    let hex = &resolved.binary_digest[7..];
    let fresh = tempfile::tempdir().expect("tempdir");
    let got = registry.download(&resolved, fresh.path(), 1 << 30, None).await.expect("download");
    assert_eq!(got, fresh.path().join(hex));
    assert_eq!(sha256_digest(&std::fs::read(&got).expect("downloaded")), resolved.binary_digest);
    assert!(!fresh.path().join(format!("{hex}.part")).exists());
    let e =
        registry.download(&resolved, tempfile::tempdir().expect("t").path(), 1000, None).await.unwrap_err();
    assert!(
        e.to_string().contains(&format!("is {} bytes, over the limit of 1000 bytes", own_bytes.len())),
        "{e}"
    );

    // Resumed: the first half is there from a cut download; only the rest is asked for.
    let resume = tempfile::tempdir().expect("tempdir");
    let part = resume.path().join(format!("{hex}.part"));
    let half = own_bytes.len() / 2;
    std::fs::write(&part, &own_bytes[..half]).expect("half a part");
    let before = reg.log().len();
    let got = registry.download(&resolved, resume.path(), 1 << 30, None).await.expect("resumed download");
    assert_eq!(sha256_digest(&std::fs::read(&got).expect("downloaded")), resolved.binary_digest);
    let blob_gets: Vec<String> = reg.log()[before..]
        .iter()
        .filter(|l| l.contains(&format!("/blobs/{}", resolved.binary_digest)) && l.contains("\"GET "))
        .cloned()
        .collect();
    let rest = own_bytes.len() - half;
    assert!(
        blob_gets.iter().any(|l| l.contains(&format!("\" 206 {rest} "))),
        "a range request answered 206 with the {rest} remaining bytes; the blob GETs:\n{}",
        blob_gets.join("\n")
    );

    // A download cut by the network keeps its part, is worth retrying, and the retry asks only for
    // the rest.
    let proxy = FaultProxy::start(&reg);
    let mut config = modules_config(&reg);
    config.insecure_registries.push(proxy.host());
    let via_proxy = AgentRegistry::new(&config).expect("registry client");
    let mut through = resolved.clone();
    through.reference = parse_reference(&pinned.replace(&reg.host(), &proxy.host())).expect("proxied ref");
    let cut = tempfile::tempdir().expect("tempdir");
    let part = cut.path().join(format!("{hex}.part"));
    proxy.set_mode(FaultMode::CutAfter(1_000_000));
    let e = via_proxy.download(&through, cut.path(), 1 << 30, None).await.unwrap_err();
    assert!(matches!(e, UpgradeFetchError::Interrupted { .. }) && e.is_retryable(), "{e}");
    assert_eq!(std::fs::metadata(&part).expect("the part is kept").len(), 1_000_000);
    proxy.set_mode(FaultMode::Pass);
    let before = reg.log().len();
    let got = via_proxy.download(&through, cut.path(), 1 << 30, None).await.expect("resumed after the cut");
    assert_eq!(sha256_digest(&std::fs::read(&got).expect("downloaded")), resolved.binary_digest);
    let rest = own_bytes.len() - 1_000_000;
    assert!(
        reg.log()[before..]
            .iter()
            .any(|l| l.contains(&resolved.binary_digest) && l.contains(&format!("\" 206 {rest} "))),
        "the retry fetched only the {rest} missing bytes:\n{}",
        reg.log()[before..].join("\n")
    );

    // A corrupt part (the right length, wrong bytes) ends in a digest mismatch and is removed, so
    // the next attempt starts over and succeeds.
    let corrupt = tempfile::tempdir().expect("tempdir");
    let part = corrupt.path().join(format!("{hex}.part"));
    let mut wrong = own_bytes.clone();
    wrong[half] ^= 0xff;
    std::fs::write(&part, &wrong).expect("corrupt part");
    let e = registry.download(&resolved, corrupt.path(), 1 << 30, None).await.unwrap_err();
    assert!(matches!(e, UpgradeFetchError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&format!("expected {}", resolved.binary_digest)), "{e}");
    assert!(!e.is_retryable());
    assert!(!part.exists(), "the corrupt part is removed");
    // Half a part with wrong bytes: the rest is fetched, the whole does not check out.
    std::fs::write(&part, &wrong[half - 10..half + 10]).expect("wrong prefix");
    let e = registry.download(&resolved, corrupt.path(), 1 << 30, None).await.unwrap_err();
    assert!(matches!(e, UpgradeFetchError::DigestMismatch { .. }), "{e}");
    assert!(!part.exists());
    let got = registry.download(&resolved, corrupt.path(), 1 << 30, None).await.expect("retry from zero");
    assert_eq!(sha256_digest(&std::fs::read(&got).expect("downloaded")), resolved.binary_digest);
}
