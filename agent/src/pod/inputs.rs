//! What a cluster pod needs from the API server besides its spec: the ConfigMaps and Secrets its
//! environment and volumes name, and the service account tokens of its projected volumes.
//!
//! [`references`] lists them from the spec (pure); `cluster::inputs` fetches them; [`PodInputs`] is
//! the fetched result that `spec::plan` reads. The inputs are stored with the pod record so a pod
//! can start again after a reboot with no network at all.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Pod, PodSpec};

pub use crate::store::inputs::{IssuedToken, ObjectData, ObjectKind, PodInputs, TokenRef};

/// What a pod's spec asks the API server for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// ConfigMap names.
    pub config_maps: BTreeSet<String>,
    /// Secret names.
    pub secrets: BTreeSet<String>,
    /// Projected service account tokens.
    pub tokens: BTreeSet<TokenRef>,
}

impl References {
    /// Whether the pod needs nothing from the API server.
    pub fn is_empty(&self) -> bool {
        self.config_maps.is_empty() && self.secrets.is_empty() && self.tokens.is_empty()
    }
}

/// The kubelet's default lifetime of a projected token (an hour, plus the 7 s it adds so a
/// token is never mistaken for a legacy one).
pub const DEFAULT_TOKEN_SECONDS: i64 = 3607;

/// Lists every ConfigMap, Secret (image pull secrets included) and token `pod` refers to.
pub fn references(pod: &Pod) -> References {
    let mut r = References::default();
    let Some(spec) = &pod.spec else { return r };
    collect_volumes(spec, &mut r);
    for s in spec.image_pull_secrets.iter().flatten() {
        r.secrets.insert(s.name.clone());
    }
    for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(k) = &from.config_map_key_ref {
                    r.config_maps.insert(k.name.clone());
                }
                if let Some(k) = &from.secret_key_ref {
                    r.secrets.insert(k.name.clone());
                }
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(c) = &f.config_map_ref {
                r.config_maps.insert(c.name.clone());
            }
            if let Some(s) = &f.secret_ref {
                r.secrets.insert(s.name.clone());
            }
        }
    }
    r
}

fn collect_volumes(spec: &PodSpec, r: &mut References) {
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            r.config_maps.insert(c.name.clone());
        }
        if let Some(s) = &v.secret {
            r.secrets.insert(s.secret_name.clone().unwrap_or_default());
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &src.config_map {
                r.config_maps.insert(c.name.clone());
            }
            if let Some(s) = &src.secret {
                r.secrets.insert(s.name.clone());
            }
            if let Some(t) = &src.service_account_token {
                r.tokens.insert(TokenRef {
                    audience: t.audience.clone().unwrap_or_default(),
                    expiration_seconds: t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
                });
            }
        }
    }
    // An empty name cannot be fetched; plan() reports it against the field.
    r.config_maps.remove("");
    r.secrets.remove("");
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn references_cover_env_env_from_volumes_and_projections() {
        let pod: Pod = serde_saphyr::from_str(
            "
metadata: {name: p}
spec:
  volumes:
  - {name: a, configMap: {name: cm-vol}}
  - {name: b, secret: {secretName: s-vol}}
  - name: c
    projected:
      sources:
      - serviceAccountToken: {path: token}
      - serviceAccountToken: {path: t2, audience: vault, expirationSeconds: 600}
      - configMap: {name: kube-root-ca.crt}
      - secret: {name: s-proj}
  imagePullSecrets: [{name: s-pull}]
  initContainers:
  - {name: i, image: x.wasm, env: [{name: A, valueFrom: {secretKeyRef: {name: s-env, key: k}}}]}
  containers:
  - name: app
    image: x.wasm
    env: [{name: B, valueFrom: {configMapKeyRef: {name: cm-env, key: k}}}]
    envFrom: [{configMapRef: {name: cm-from}}, {secretRef: {name: s-from}}]
",
        )
        .expect("pod");
        let r = references(&pod);
        let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        assert_eq!(names(&r.config_maps), ["cm-env", "cm-from", "cm-vol", "kube-root-ca.crt"]);
        assert_eq!(names(&r.secrets), ["s-env", "s-from", "s-proj", "s-pull", "s-vol"]);
        let tokens: Vec<String> = r.tokens.iter().map(TokenRef::key).collect();
        assert_eq!(tokens, ["#3607", "vault#600"]);
    }

    #[test]
    fn tokens_are_due_at_four_fifths_of_their_life() {
        let issued = Timestamp::from_second(1_000).expect("ts");
        let t =
            IssuedToken { token: "t".into(), issued, expires: Timestamp::from_second(2_000).expect("ts") };
        assert!(!t.due(Timestamp::from_second(1_799).expect("ts")));
        assert!(t.due(Timestamp::from_second(1_800).expect("ts")));
    }
}
