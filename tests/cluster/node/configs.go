package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The sysctls a node needs: routing between pods and Services, and netfilter on the
// bridge so kube-proxy's rules see pod-to-pod Service traffic. Their earlier values are
// kept in runDir and put back by teardown.
var sysctls = map[string]string{
	"net/ipv4/ip_forward":                 "1",
	"net/bridge/bridge-nf-call-iptables":  "1",
	"net/bridge/bridge-nf-call-ip6tables": "1",
}

const savedSysctls = "/var/lib/llmproxy-node.sysctls"

func prepareHost() error {
	for _, dir := range []string{stateDir, runDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
	}
	var saved strings.Builder
	for key, value := range sysctls {
		path := filepath.Join("/proc/sys", key)
		old, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("reading %s: %w (the node needs it)", path, err)
		}
		fmt.Fprintf(&saved, "%s=%s\n", key, strings.TrimSpace(string(old)))
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("setting %s: %w", path, err)
		}
	}
	// kube-proxy turns route_localnet on for NodePorts on loopback: put it back too.
	old, err := os.ReadFile("/proc/sys/net/ipv4/conf/all/route_localnet")
	if err == nil {
		fmt.Fprintf(&saved, "net/ipv4/conf/all/route_localnet=%s\n", strings.TrimSpace(string(old)))
	}
	return os.WriteFile(savedSysctls, []byte(saved.String()), 0o600)
}

type configs struct{ containerd, kubelet string }

func writeConfigs(kubeconfig, ca, nodeIP string) (configs, error) {
	dir := filepath.Join(stateDir, "config")
	c := configs{containerd: filepath.Join(dir, "containerd.toml"), kubelet: filepath.Join(dir, "kubelet.yaml")}
	cni := filepath.Join(dir, "cni")
	if err := os.MkdirAll(cni, 0o700); err != nil {
		return c, err
	}
	files := map[string]string{
		c.containerd: fmt.Sprintf(containerdConfig, stateDir, runDir, socket, pauseImage, cni),
		c.kubelet:    fmt.Sprintf(kubeletConfig, ca, nodeIP, clusterDNS, socket),
		filepath.Join(cni, "10-llmproxy.conflist"): fmt.Sprintf(cniConfig, bridgeName, podCIDR,
			filepath.Join(stateDir, "cni")),
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			return c, err
		}
	}
	return c, nil
}

// containerd 1.6 (Debian 12). restrict_oom_score_adj: root lacks CAP_SYS_RESOURCE in
// this VM, and runc fails every sandbox that would lower its OOM score without it.
// Plain cgroupfs: there is no systemd.
const containerdConfig = `version = 2
root = "%s/containerd"
state = "%s/containerd"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "%s"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%s"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "%s"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
`

// The kubelet trusts client certificates signed by the cluster CA (the API server's,
// for logs and exec) and nothing anonymous. Image garbage collection and disk-pressure
// eviction are off: images cannot be pulled again here, and a shared CI disk's fill
// level says nothing about this node.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
address: %s
readOnlyPort: 0
healthzPort: 0
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [%s]
containerRuntimeEndpoint: unix://%s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: "0%%", imagefs.available: "0%%", nodefs.inodesFree: "0%%"}
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
`

// One bridge, addresses from host-local (its state in the node's folder), masquerade
// for traffic leaving the pod network, hairpin so a pod reaches itself via a Service.
const cniConfig = `{
  "cniVersion": "0.4.0",
  "name": "llmproxy",
  "plugins": [
    {"type": "bridge", "bridge": "%s", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "%s"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "%s"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`
