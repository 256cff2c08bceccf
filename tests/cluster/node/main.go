// Command llmproxy-node runs one real Kubernetes node for the local control plane
// (../main.go, `llmproxy-cluster up --node`): containerd, runc and the CNI plugins from
// Debian's packages, and kubelet, kube-proxy and kube-scheduler built from the same
// k8s.io/kubernetes module as the control plane. No registry is reachable, so the
// images the node itself needs (pause, CoreDNS, a busybox for workloads) are packed
// here from local binaries and imported into containerd; others come through `load`.
//
// Usage:
//
//	llmproxy-node up --kubeconfig KC --ca CA --node-ip IP --log-dir DIR [--image ARCHIVE]...
//	llmproxy-node load ARCHIVE...     import docker-archive images into the running node
//	llmproxy-node down                remove everything a node leaves on the host
//	llmproxy-node kubelet|kube-proxy|kube-scheduler ARGS...   (re-executed by up)
//
// A node changes the host: a bridge, netfilter rules, cgroups, mounts, two sysctls.
// `up` removes what an earlier node left before it starts, and again when it stops;
// teardown.go lists each thing and how it goes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	kubeproxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// Where the node keeps its state. Fixed paths: one node per machine, and teardown must
// find what a killed node left without being told.
const (
	stateDir   = "/var/lib/llmproxy-node" // kubelet root, containerd root, CNI addresses
	runDir     = "/run/llmproxy-node"     // containerd state and socket
	nodeName   = "llmproxy-node"
	bridgeName = "llmproxy0"
	podCIDR    = "10.244.0.0/24"
	clusterDNS = "10.96.0.10"
)

var socket = filepath.Join(runDir, "containerd.sock")

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: llmproxy-node up|load|down|kubelet|kube-proxy|kube-scheduler [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "up":
		err = up(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "down":
		err = teardown()
	case "kubelet":
		os.Exit(runComponent(kubelet.NewKubeletCommand(context.Background())))
	case "kube-proxy":
		os.Exit(runComponent(kubeproxy.NewProxyCommand()))
	case "kube-scheduler":
		os.Exit(runComponent(scheduler.NewSchedulerCommand()))
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "llmproxy-node:", err)
		os.Exit(1)
	}
}

func runComponent(cmd *cobra.Command) int {
	cmd.SetArgs(os.Args[2:])
	return cli.Run(cmd)
}

func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig of the control plane")
	ca := fs.String("ca", "", "the cluster CA: kubelet trusts client certificates it signed")
	nodeIP := fs.String("node-ip", "", "the node's address, local to this host and reachable from pods")
	logDir := fs.String("log-dir", ".", "where each daemon's log goes")
	var images repeated
	fs.Var(&images, "image", "one more docker-archive to import before the kubelet starts (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *kubeconfig == "" || *ca == "" || *nodeIP == "" {
		return errors.New("--kubeconfig, --ca and --node-ip are required")
	}
	if err := teardown(); err != nil {
		return fmt.Errorf("removing an earlier node: %w", err)
	}
	if err := prepareHost(); err != nil {
		return err
	}
	config, err := writeConfigs(*kubeconfig, *ca, *nodeIP)
	if err != nil {
		return err
	}

	var daemons supervisor
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	shutdown := func(cause error) error {
		daemons.stopAll()
		if err := teardown(); err != nil && cause == nil {
			cause = err
		}
		return cause
	}

	if err := daemons.start(*logDir, "containerd", "containerd", "--config", config.containerd); err != nil {
		return shutdown(err)
	}
	if err := waitForSocket(socket, 30*time.Second); err != nil {
		return shutdown(err)
	}
	system, err := systemImages()
	if err != nil {
		return shutdown(err)
	}
	if err := load(append(system, images...)); err != nil {
		return shutdown(err)
	}
	self, err := os.Executable()
	if err != nil {
		return shutdown(err)
	}
	components := [][]string{
		{"kubelet", self, "kubelet", "--config=" + config.kubelet, "--kubeconfig=" + *kubeconfig,
			"--root-dir=" + filepath.Join(stateDir, "kubelet"), "--hostname-override=" + nodeName,
			"--node-ip=" + *nodeIP, "--v=0"},
		{"kube-proxy", self, "kube-proxy", "--kubeconfig=" + *kubeconfig, "--hostname-override=" + nodeName,
			"--proxy-mode=iptables", "--cluster-cidr=" + podCIDR,
			// Leave the host's conntrack settings alone: this VM may not change them.
			"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
			"--conntrack-tcp-timeout-close-wait=0",
			"--healthz-bind-address=127.0.0.1:10256", "--metrics-bind-address=127.0.0.1:10249", "--v=0"},
		{"kube-scheduler", self, "kube-scheduler", "--kubeconfig=" + *kubeconfig,
			"--authentication-kubeconfig=" + *kubeconfig, "--authorization-kubeconfig=" + *kubeconfig,
			"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259", "--v=0"},
	}
	for _, c := range components {
		if err := daemons.start(*logDir, c[0], c[1], c[2:]...); err != nil {
			return shutdown(err)
		}
	}
	fmt.Println("node started")
	select {
	case <-stop:
		return shutdown(nil)
	case exited := <-daemons.exited:
		return shutdown(fmt.Errorf("%s exited; see %s", exited, filepath.Join(*logDir, exited+".log")))
	}
}

// load imports docker-archive images into the node's containerd, where the kubelet
// finds them (namespace k8s.io). Pods use them with imagePullPolicy Never/IfNotPresent.
func load(archives []string) error {
	for _, archive := range archives {
		out, err := exec.Command("ctr", "--address", socket, "--namespace", "k8s.io",
			"images", "import", "--no-unpack=false", archive).CombinedOutput()
		if err != nil {
			return fmt.Errorf("importing %s: %v: %s", archive, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

func waitForSocket(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := exec.Command("ctr", "--address", path, "version").Run(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("containerd not answering on %s after %s", path, timeout)
}

// repeated collects a flag given several times.
type repeated []string

func (r *repeated) String() string     { return strings.Join(*r, " ") }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

// supervisor runs the node's daemons as children that die with it.
type supervisor struct {
	children []child
	exited   chan string
}

type child struct {
	process *os.Process
	done    chan struct{}
}

func (s *supervisor) start(logDir, name, binary string, args ...string) error {
	if s.exited == nil {
		s.exited = make(chan string, 8)
	}
	log, err := os.Create(filepath.Join(logDir, name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// A supervisor killed outright takes its daemons with it; the next up or down
	// removes what they leave.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	done := make(chan struct{})
	s.children = append(s.children, child{cmd.Process, done})
	go func() {
		_ = cmd.Wait()
		close(done)
		s.exited <- name
	}()
	return nil
}

// stopAll stops the daemons in reverse order of start, each given a few seconds.
func (s *supervisor) stopAll() {
	for i := len(s.children) - 1; i >= 0; i-- {
		c := s.children[i]
		_ = c.process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			_ = c.process.Kill()
			<-c.done
		}
	}
}
