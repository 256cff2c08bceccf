//! The local control plane is a real Kubernetes API server: CEL on CRDs, finalizers,
//! ValidatingAdmissionPolicy, RBAC, and garbage collection by owner references.

mod support;

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use support::{client, eventually, kubeconfig};

async fn namespace(client: &Client, name: &str) -> String {
    let name = format!("{name}-{}", std::process::id());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    name
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_cel_rules_reject_invalid_objects_with_their_message() {
    let client = client().await;
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": { "name": "gadgets.cluster-test.llmproxy.io" },
        "spec": {
            "group": "cluster-test.llmproxy.io",
            "scope": "Namespaced",
            "names": { "plural": "gadgets", "singular": "gadget", "kind": "Gadget" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "properties": { "min": { "type": "integer" }, "max": { "type": "integer" } },
                        "x-kubernetes-validations": [{ "rule": "self.min <= self.max", "message": "min must not exceed max" }]
                    }}
                }}
            }]
        }
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch("gadgets.cluster-test.llmproxy.io", &PatchParams::apply("cluster-test").force(), &Patch::Apply(&crd))
        .await
        .unwrap();
    let ns = namespace(&client, "cel").await;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster-test.llmproxy.io", "v1", "Gadget"),
        "gadgets",
    );
    let gadgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let gadget = |name: &str, min: i64, max: i64| {
        let mut object = DynamicObject::new(name, &resource);
        object.data = json!({ "spec": { "min": min, "max": max } });
        object
    };
    // The CRD may take a moment to be served.
    eventually(Duration::from_secs(20), || async {
        gadgets.create(&PostParams::default(), &gadget("ok", 1, 2)).await.ok()
    })
    .await;

    let status = api_error(gadgets.create(&PostParams::default(), &gadget("bad", 3, 2)).await);
    assert_eq!(status.code, 422);
    assert!(status.message.contains("min must not exceed max"), "{}", status.message);
}

#[tokio::test]
async fn an_object_with_a_finalizer_survives_delete() {
    let client = client().await;
    let ns = namespace(&client, "finalizer").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let map: ConfigMap = serde_json::from_value(
        json!({ "metadata": { "name": "kept", "finalizers": ["cluster-test.llmproxy.io/keep"] } }),
    )
    .unwrap();
    maps.create(&PostParams::default(), &map).await.unwrap();
    maps.delete("kept", &DeleteParams::default()).await.unwrap();

    let kept = maps.get("kept").await.expect("still there after DELETE");
    assert!(kept.metadata.deletion_timestamp.is_some());

    maps.patch("kept", &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "finalizers": null } })))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async { maps.get_opt("kept").await.unwrap().is_none().then_some(()) }).await;
}

#[tokio::test]
async fn a_validating_admission_policy_denies_delete_with_its_message() {
    let client = client().await;
    let ns = namespace(&client, "vap").await;
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": { "name": "cluster-test-no-delete" },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["DELETE"], "resources": ["configmaps"]
            }]},
            "validations": [{
                "expression": "!has(oldObject.metadata.labels) || !('protected' in oldObject.metadata.labels)",
                "message": "protected ConfigMaps cannot be deleted",
                "reason": "Forbidden"
            }]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": { "name": "cluster-test-no-delete" },
        "spec": { "policyName": "cluster-test-no-delete", "validationActions": ["Deny"],
                  "matchResources": { "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": ns } } } }
    }))
    .unwrap();
    let apply = PatchParams::apply("cluster-test").force();
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .patch("cluster-test-no-delete", &apply, &Patch::Apply(&policy))
        .await
        .unwrap();
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .patch("cluster-test-no-delete", &apply, &Patch::Apply(&binding))
        .await
        .unwrap();

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let protected = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": { "protected": "yes" } } })).unwrap()
    };
    // Policies load asynchronously: probe with throwaway objects until it bites.
    let mut probe = 0;
    eventually(Duration::from_secs(20), || {
        probe += 1;
        let (maps, name) = (maps.clone(), format!("probe-{probe}"));
        let object = protected(&name);
        async move {
            maps.create(&PostParams::default(), &object).await.unwrap();
            maps.delete(&name, &DeleteParams::default()).await.is_err().then_some(())
        }
    })
    .await;

    maps.create(&PostParams::default(), &protected("guarded")).await.unwrap();
    let status = api_error(maps.delete("guarded", &DeleteParams::default()).await);
    assert!(maps.get_opt("guarded").await.unwrap().is_some());
    assert_eq!(status.code, 403);
    assert!(status.message.contains("protected ConfigMaps cannot be deleted"), "{}", status.message);
}

#[tokio::test]
async fn rbac_denies_a_service_account_without_rights() {
    let admin = client().await;
    let ns = namespace(&admin, "rbac").await;
    let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": "nobody" } })).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &sa).await.unwrap();

    let mut config =
        Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig()).unwrap(), &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:nobody"));
    let nobody = Client::try_from(config).unwrap();
    let status = api_error(Api::<Secret>::namespaced(nobody, &ns).list(&Default::default()).await);
    assert_eq!(status.code, 403);
    assert!(status.message.contains(&format!("system:serviceaccount:{ns}:nobody")), "{}", status.message);
}

#[tokio::test]
async fn the_garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let client = client().await;
    let ns = namespace(&client, "gc").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "owner" } })).unwrap();
    let owner = maps.create(&PostParams::default(), &owner).await.unwrap();
    let dependent: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "dependent", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid.unwrap()
    }]}}))
    .unwrap();
    maps.create(&PostParams::default(), &dependent).await.unwrap();
    maps.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), || async { maps.get_opt("dependent").await.unwrap().is_none().then_some(()) })
        .await;
}

#[tokio::test]
async fn kubectl_reports_the_built_version() {
    let output =
        std::process::Command::new(support::repo().join("tests/cluster/cluster.sh")).arg("build").output().unwrap();
    let binary = String::from_utf8(output.stdout).unwrap();
    let version = std::process::Command::new(binary.trim())
        .args(["kubectl", "--kubeconfig"])
        .arg(kubeconfig())
        .args(["get", "--raw", "/version"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&version.stdout);
    let expected = format!("\"gitVersion\": \"v{}\"", support::kubernetes_version());
    assert!(text.contains(&expected), "{text}");
}
