//! The Pod Security Standards' "restricted" profile (with everything of "baseline" it
//! includes), field by field, as the PodSecurity admission plugin checks it, plus
//! Tandem's own rule: a read-only root filesystem. The test cluster's 1.20 API server
//! has no PodSecurity plugin, so the tests run this on pods read back from it.
//! Works on JSON (`{metadata, spec}`), so a pod from the API server and a pod template
//! rendered by helm are checked the same way.

use serde_json::Value;

/// Volume sources "restricted" allows.
const VOLUME_TYPES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
/// Sysctls "baseline" allows.
const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];
const SELINUX_TYPES: [&str; 5] =
    ["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"];

fn is_true(value: &Value) -> bool {
    value.as_bool() == Some(true)
}

/// Every way `pod` (`{metadata, spec}`) breaks "restricted" or has a writable root
/// filesystem, one line each, naming the field; empty when it complies.
pub fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let spec = &pod["spec"];
    let pod_context = &spec["securityContext"];

    // baseline: host namespaces, host process.
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if is_true(&spec[field]) {
            found.push(format!("spec.{field} is true"));
        }
    }
    if is_true(&pod_context["windowsOptions"]["hostProcess"]) {
        found.push("spec.securityContext.windowsOptions.hostProcess is true".into());
    }
    // baseline: sysctls.
    for sysctl in pod_context["sysctls"].as_array().into_iter().flatten() {
        let name = sysctl["name"].as_str().unwrap_or_default();
        if !SAFE_SYSCTLS.contains(&name) {
            found.push(format!("spec.securityContext.sysctls: {name} is not a safe sysctl"));
        }
    }
    // restricted: volume types (baseline: no hostPath, which this includes).
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or_default();
        let source = volume.as_object().into_iter().flatten().map(|(k, _)| k.as_str()).find(|k| *k != "name");
        if let Some(kind) = source.filter(|k| !VOLUME_TYPES.contains(k)) {
            found.push(format!("volume {name}: {kind} volumes are not allowed"));
        }
    }
    // AppArmor, through the annotation (before 1.30) or the field.
    for (key, value) in pod["metadata"]["annotations"].as_object().into_iter().flatten() {
        let profile = value.as_str().unwrap_or_default();
        if key.starts_with("container.apparmor.security.beta.kubernetes.io/")
            && profile != "runtime/default"
            && !profile.starts_with("localhost/")
        {
            found.push(format!("annotation {key}: AppArmor profile {profile}"));
        }
    }

    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|list| spec[*list].as_array().into_iter().flatten().map(move |c| (*list, c)));
    for (list, container) in containers {
        let at = format!("{list}[{}]", container["name"].as_str().unwrap_or("?"));
        let context = &container["securityContext"];
        if is_true(&context["privileged"]) {
            found.push(format!("{at}: privileged"));
        }
        if context["allowPrivilegeEscalation"].as_bool() != Some(false) {
            found.push(format!("{at}: allowPrivilegeEscalation is not false"));
        }
        let drops = context["capabilities"]["drop"].as_array().into_iter().flatten();
        if !drops.filter_map(Value::as_str).any(|c| c == "ALL") {
            found.push(format!("{at}: capabilities do not drop ALL"));
        }
        for added in context["capabilities"]["add"].as_array().into_iter().flatten() {
            if added.as_str() != Some("NET_BIND_SERVICE") {
                found.push(format!("{at}: adds capability {added}"));
            }
        }
        // runAsNonRoot: the container's own setting, else the pod's.
        let non_root = context["runAsNonRoot"].as_bool().or_else(|| pod_context["runAsNonRoot"].as_bool());
        if non_root != Some(true) {
            found.push(format!("{at}: runAsNonRoot is not true (container or pod)"));
        }
        if context["runAsUser"].as_i64() == Some(0) || pod_context["runAsUser"].as_i64() == Some(0) {
            found.push(format!("{at}: runs as user 0"));
        }
        // seccomp: the container's profile, else the pod's; RuntimeDefault or Localhost.
        let seccomp = context["seccompProfile"]["type"]
            .as_str()
            .or_else(|| pod_context["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            found.push(format!("{at}: seccomp profile {seccomp:?}, not RuntimeDefault or Localhost"));
        }
        for apparmor in [&context["appArmorProfile"]["type"], &pod_context["appArmorProfile"]["type"]] {
            if apparmor.as_str() == Some("Unconfined") {
                found.push(format!("{at}: AppArmor Unconfined"));
            }
        }
        for selinux in [&context["seLinuxOptions"], &pod_context["seLinuxOptions"]] {
            let kind = selinux["type"].as_str().unwrap_or_default();
            if !SELINUX_TYPES.contains(&kind) || !selinux["user"].is_null() || !selinux["role"].is_null() {
                found.push(format!("{at}: SELinux options {selinux}"));
            }
        }
        if context["procMount"].as_str().is_some_and(|m| m != "Default") {
            found.push(format!("{at}: procMount {}", context["procMount"]));
        }
        if is_true(&context["windowsOptions"]["hostProcess"]) {
            found.push(format!("{at}: windowsOptions.hostProcess is true"));
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_i64().is_some_and(|p| p != 0) {
                found.push(format!("{at}: hostPort {}", port["hostPort"]));
            }
        }
        // Tandem's own rule, beyond "restricted".
        if context["readOnlyRootFilesystem"].as_bool() != Some(true) {
            found.push(format!("{at}: readOnlyRootFilesystem is not true"));
        }
    }
    found
}
