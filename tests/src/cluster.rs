//! The cluster tier's harness: an admin client for the API server named by `LICHEN_E2E_KUBECONFIG`,
//! and node identities issued through the cluster's own CSR API, so the agent runs with exactly the
//! credentials a node has (Node authorizer, NodeRestriction).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

/// The cluster under test.
pub struct Cluster {
    /// An admin client.
    pub client: Client,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// Connects with `LICHEN_E2E_KUBECONFIG`. The cluster tier has no meaning without a cluster, so a
    /// missing variable fails the run rather than passing it.
    pub async fn from_env() -> Cluster {
        let path = std::env::var_os("LICHEN_E2E_KUBECONFIG").map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "LICHEN_E2E_KUBECONFIG is not set: the e2e tier needs a cluster admin kubeconfig \
                 (../shared/realk8s/up.sh provides one at /opt/realk8s/admin.kubeconfig)"
            )
        });
        let client = lichen::cluster::client::connect(&path).await.expect("admin kubeconfig works");
        Cluster { client, kubeconfig: path }
    }

    /// The admin kubeconfig, for running `kubectl` against the cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server URL and CA from the admin kubeconfig, for node kubeconfigs.
    fn cluster_entry(&self) -> (String, String) {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cluster = kc.clusters.first().and_then(|c| c.cluster.clone()).expect("a cluster entry");
        let ca = cluster.certificate_authority_data.expect("embedded CA data");
        (cluster.server.expect("server"), ca)
    }

    /// Issues a client certificate for `system:node:<name>` through a CSR the admin approves, and
    /// writes a node kubeconfig into `dir`.
    pub async fn node_kubeconfig(&self, name: &str, dir: &Path) -> PathBuf {
        let key = dir.join("node.key");
        let csr = dir.join("node.csr");
        run("openssl", &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path(&key)]);
        let subj = format!("/O=system:nodes/CN=system:node:{name}");
        run("openssl", &["req", "-new", "-key", path(&key), "-subj", &subj, "-out", path(&csr)]);
        let csrs: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let csr_name = format!("lichen-e2e-{name}");
        let _ = csrs.delete(&csr_name, &DeleteParams::default()).await;
        let request = CertificateSigningRequest {
            metadata: kube::api::ObjectMeta { name: Some(csr_name.clone()), ..Default::default() },
            spec: CertificateSigningRequestSpec {
                request: ByteString(std::fs::read(&csr).expect("csr")),
                signer_name: "kubernetes.io/kube-apiserver-client-kubelet".into(),
                usages: Some(vec![
                    "digital signature".into(),
                    "key encipherment".into(),
                    "client auth".into(),
                ]),
                ..Default::default()
            },
            status: None,
        };
        csrs.create(&PostParams::default(), &request).await.expect("create CSR");
        let approval = CertificateSigningRequest {
            status: Some(CertificateSigningRequestStatus {
                conditions: Some(vec![CertificateSigningRequestCondition {
                    type_: "Approved".into(),
                    status: "True".into(),
                    reason: Some("LichenE2E".into()),
                    ..Default::default()
                }]),
                certificate: None,
            }),
            ..request
        };
        csrs.patch_approval(&csr_name, &PatchParams::default(), &Patch::Merge(&approval))
            .await
            .expect("approve");
        let cert = crate::wait_for_async(Duration::from_secs(30), "the signed certificate", || async {
            csrs.get(&csr_name).await.ok()?.status?.certificate.map(|c| c.0)
        })
        .await;
        let (server, ca) = self.cluster_entry();
        let b64 = |b: &[u8]| base64(b);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n- name: node\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
             contexts:\n- name: default\n  context: {{cluster: c, user: node}}\ncurrent-context: default\n",
            b64(&cert),
            b64(&std::fs::read(&key).expect("key"))
        );
        let out = dir.join("node.kubeconfig");
        std::fs::write(&out, text).expect("write kubeconfig");
        let _ = csrs.delete(&csr_name, &DeleteParams::default()).await;
        out
    }

    /// The API server's URL and its CA (PEM), as a board is given them to join.
    pub fn server_and_ca(&self) -> (String, Vec<u8>) {
        use base64::Engine;
        let (server, ca) = self.cluster_entry();
        (server, base64::engine::general_purpose::STANDARD.decode(ca.trim()).expect("CA data is base64"))
    }

    /// The cluster's bootstrap token: `LICHEN_E2E_BOOTSTRAP_TOKEN`, else the `bootstrap-token` file
    /// next to the admin kubeconfig (where realk8s keeps it).
    pub fn bootstrap_token(&self) -> String {
        if let Ok(t) = std::env::var("LICHEN_E2E_BOOTSTRAP_TOKEN") {
            return t;
        }
        let file = self.kubeconfig.with_file_name("bootstrap-token");
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}; set LICHEN_E2E_BOOTSTRAP_TOKEN", file.display()))
            .trim()
            .to_owned()
    }

    /// Deletes a node left by an earlier run of the same test.
    pub async fn delete_node(&self, name: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} is needed: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
