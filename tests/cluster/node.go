package main

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// coredns.yaml is the cluster DNS: the Deployment, its Service at 10.96.0.10 (the
// kubelet's clusterDNS) and its rights.
//
//go:embed coredns.yaml
var corednsManifest []byte

// The node supervisor, once started, and the address added to lo for it.
var (
	nodeProcess  atomic.Pointer[exec.Cmd]
	nodeDone     = make(chan struct{})
	localAddress atomic.Pointer[string]
)

// startNode runs `llmproxy-node up` (built next to this binary) and returns once the
// node is Ready and untainted and CoreDNS serves.
func startNode(dir, kubeconfig, ca, ip string, images []string, client *http.Client, server string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	binary := filepath.Join(filepath.Dir(self), "llmproxy-node")
	if _, err := os.Stat(binary); err != nil {
		return fmt.Errorf("%s not built (tests/cluster/cluster.sh build --node): %w", binary, err)
	}
	args := []string{"up", "--kubeconfig", kubeconfig, "--ca", ca, "--node-ip", ip, "--log-dir", dir}
	for _, image := range images {
		args = append(args, "--image", image)
	}
	cmd := exec.Command(binary, args...)
	logPath := filepath.Join(dir, "node.log")
	log, err := os.Create(logPath)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	// However this process ends, the node is asked to stop, and so cleans up after itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the node: %w", err)
	}
	nodeProcess.Store(cmd)
	go func() { _ = cmd.Wait(); close(nodeDone) }()

	deadline := time.Now().Add(180 * time.Second)
	for !nodeReady(client, server) {
		select {
		case <-nodeDone:
			return fmt.Errorf("the node stopped; see %s", logPath)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the node is not Ready after 180s; see %s and %s", logPath, filepath.Join(dir, "kubelet.log"))
		}
	}
	manifest := filepath.Join(dir, "coredns.yaml")
	if err := os.WriteFile(manifest, corednsManifest, 0o644); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"apply", "--server-side", "--field-manager=llmproxy-cluster", "-f", manifest},
		{"rollout", "status", "--namespace=kube-system", "deployment/coredns", "--timeout=120s"},
	} {
		kubectl := exec.Command(self, append([]string{"kubectl", "--kubeconfig=" + kubeconfig}, args...)...)
		if out, err := kubectl.CombinedOutput(); err != nil {
			return fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// nodeReady: the node reports Ready and the node-lifecycle controller has lifted its
// not-ready taint, so the scheduler places pods on it.
func nodeReady(client *http.Client, server string) bool {
	resp, err := client.Get(server + "/api/v1/nodes")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var nodes struct {
		Items []struct {
			Spec struct {
				Taints []struct{ Key string } `json:"taints"`
			} `json:"spec"`
			Status struct {
				Conditions []struct{ Type, Status string } `json:"conditions"`
			} `json:"status"`
		} `json:"items"`
	}
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&nodes) != nil || len(nodes.Items) == 0 {
		return false
	}
	node := nodes.Items[0]
	for _, taint := range node.Spec.Taints {
		if strings.HasPrefix(taint.Key, "node.kubernetes.io/") {
			return false
		}
	}
	for _, c := range node.Status.Conditions {
		if c.Type == "Ready" {
			return c.Status == "True"
		}
	}
	return false
}

// stopNode asks the node to stop and waits while it removes what it put on the host.
func stopNode() {
	cmd := nodeProcess.Load()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-nodeDone:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
	}
}

func addLocalAddress(ip string) error {
	out, err := exec.Command("ip", "address", "add", ip+"/32", "dev", "lo").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "File exists") {
		return fmt.Errorf("adding %s to lo: %v: %s", ip, err, out)
	}
	localAddress.Store(&ip)
	return nil
}

func removeLocalAddress(ip string) {
	_ = exec.Command("ip", "address", "del", ip+"/32", "dev", "lo").Run()
}
