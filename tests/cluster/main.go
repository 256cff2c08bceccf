// Command llmproxy-cluster runs a real, disposable Kubernetes control plane on loopback:
// an embedded etcd, kube-apiserver and (optionally) kube-controller-manager, all built
// from the upstream Go modules. It exists because tests and the local demo need the real
// API server (CRD schemas, CEL, finalizers, RBAC, admission policies) and this machine
// has no container engine and cannot download release binaries.
//
// Usage:
//
//	llmproxy-cluster up --dir DIR        start; writes DIR/kubeconfig once ready, runs until SIGTERM
//	llmproxy-cluster up --node ...       the same with one real node (node/main.go): pods run
//	llmproxy-cluster kubectl ARGS...     kubectl of the same Kubernetes release
//	kubectl ARGS...                      the same, when invoked through a symlink named kubectl
//
// The kube-controller-manager runs as a child process of `up` (re-executing this binary)
// because the apiserver and the controller-manager both own process-wide state (signal
// handling, flag and metric registries) and do not share one process cleanly.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"

	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		os.Exit(runKubectl(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: llmproxy-cluster up|kubectl|kube-controller-manager [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "up":
		tuneGC()
		if err := up(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "llmproxy-cluster:", err)
			os.Exit(1)
		}
	case "kubectl":
		os.Exit(runKubectl(os.Args[2:]))
	case "kube-controller-manager":
		tuneGC()
		cmd := controllermanager.NewControllerManagerCommand()
		cmd.SetArgs(os.Args[2:])
		os.Exit(cli.Run(cmd))
	default:
		fmt.Fprintf(os.Stderr, "llmproxy-cluster: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

// tuneGC trades memory for CPU, as a disposable test cluster on a small machine may:
// writing ProxyTokens in bulk, Go's collector took about a third of the API server's
// CPU at the default GOGC of 100. At 400, the scale bench's 100,000 ProxyTokens (a
// create and a status patch each) took 177 s instead of 212 on two cores, the process
// growing to the soft limit below (6 GB) instead of 3.9 GB; the tests' few hundred
// objects stay far under it. GOGC and GOMEMLIMIT in the environment still win.
func tuneGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(6 << 30)
	}
}

func runKubectl(args []string) int {
	os.Args = append([]string{"kubectl"}, args...)
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
	return 0
}

func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", ".cluster", "state folder: certificates, etcd data, logs and the kubeconfig")
	port := fs.Int("secure-port", 0, "API server port on 127.0.0.1 (0: a free one)")
	withKCM := fs.Bool("controller-manager", true, "also run kube-controller-manager (garbage collector, namespace and service-account controllers)")
	exitWithParent := fs.Bool("exit-with-parent", false, "stop when the process that started this one exits (test harnesses)")
	var extra repeated
	fs.Var(&extra, "apiserver-arg", "one more kube-apiserver flag, e.g. --apiserver-arg=--watch-cache=false (repeatable)")
	node := fs.Bool("node", false, "also run a real node (kubelet, containerd, kube-proxy, scheduler, CoreDNS): see node/main.go")
	nodeIP := fs.String("node-ip", "10.250.0.1", "with --node: the address the API server and kubelet serve on, added to lo so pods reach it")
	var images repeated
	fs.Var(&images, "image", "with --node: a docker-archive to import into the node before it starts (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(abs, "kubeconfig")
	// The cluster is disposable (fsync is off, the state folder is wiped on start), so
	// stopping means stopping now: kube-apiserver's own graceful shutdown waits for its
	// watches to drain and can take minutes.
	quit := make(chan struct{}, 1)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		select {
		case <-signals:
		case <-quit:
		}
		stopNow(kubeconfig)
	}()
	if *exitWithParent {
		go exitWhenOrphaned(quit)
	}
	// The kubeconfig is the readiness signal for scripts: never leave a stale one around.
	_ = os.Remove(kubeconfig)
	etcdDir := filepath.Join(abs, "etcd")
	_ = os.RemoveAll(etcdDir)

	host := "127.0.0.1"
	var extraIPs []net.IP
	if *node {
		// Pods reach the API server through the kubernetes Service, whose endpoint is the
		// advertised address: a loopback one is not valid, so the node gets its own,
		// local to this host and routed to from the pod bridge.
		host = *nodeIP
		extraIPs = append(extraIPs, net.ParseIP(host))
		if err := addLocalAddress(host); err != nil {
			return err
		}
		defer removeLocalAddress(host)
	}
	certs, err := generatePKI(filepath.Join(abs, "pki"), extraIPs...)
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}

	etcd, etcdURL, err := startEtcd(etcdDir, filepath.Join(abs, "etcd.log"))
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer etcd.Close()

	if *port == 0 {
		if *port, err = freePort(); err != nil {
			return err
		}
	}
	server := "https://" + host + ":" + strconv.Itoa(*port)

	flags := []string{
		"--advertise-address=" + host,
		"--bind-address=" + host,
		"--secure-port=" + strconv.Itoa(*port),
		"--etcd-servers=" + etcdURL,
		"--tls-cert-file=" + certs.servingCert,
		"--tls-private-key-file=" + certs.servingKey,
		"--client-ca-file=" + certs.caCert,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + certs.saPub,
		"--service-account-signing-key-file=" + certs.saKey,
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--cert-dir=" + filepath.Join(abs, "pki", "generated"),
		"--v=0",
	}
	if *node {
		flags = append(flags,
			// For kubectl logs/exec: the API server is the kubelet's client, and reaches it
			// by the node's address (its name resolves nowhere).
			"--kubelet-client-certificate="+certs.adminCert,
			"--kubelet-client-key="+certs.adminKey,
			"--kubelet-preferred-address-types=InternalIP",
		)
	} else {
		// Loopback addresses are not valid endpoints; nothing here needs the kubernetes Service.
		flags = append(flags, "--endpoint-reconciler-type=none")
	}
	cmd := apiserver.NewAPIServerCommand()
	cmd.SetArgs(append(flags, extra...))
	serveErr := make(chan error, 1)
	go func() { serveErr <- cmd.Execute() }()

	client, err := adminHTTPClient(certs)
	if err != nil {
		return err
	}
	if err := waitReady(client, server, serveErr); err != nil {
		return err
	}
	// Components get the kubeconfig under another name: the real one means "ready".
	adminKubeconfig := filepath.Join(abs, "admin.kubeconfig")
	if err := writeKubeconfig(adminKubeconfig, server, certs); err != nil {
		return err
	}

	controllers := "garbagecollector,namespace,serviceaccount,serviceaccount-token,clusterrole-aggregation"
	if *node {
		// What workloads need: Deployments and their ReplicaSets, Service endpoints for
		// kube-proxy and CoreDNS, the node's not-ready taint lifted, kube-root-ca.crt for
		// service-account volumes, PodDisruptionBudget status.
		controllers += ",deployment,replicaset,endpoint,endpointslice,nodelifecycle,root-ca-cert-publisher,disruption,podgc"
	}
	if *withKCM || *node {
		kcm := exec.Command(os.Args[0], "kube-controller-manager",
			"--kubeconfig="+adminKubeconfig,
			"--controllers="+controllers,
			"--leader-elect=false",
			"--use-service-account-credentials=false",
			"--service-account-private-key-file="+certs.saKey,
			"--root-ca-file="+certs.caCert,
			"--secure-port=0",
			"--v=0",
		)
		logFile, err := os.Create(filepath.Join(abs, "controller-manager.log"))
		if err != nil {
			return err
		}
		kcm.Stdout, kcm.Stderr = logFile, logFile
		// The child dies with us, however we die: no leaked processes.
		kcm.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := kcm.Start(); err != nil {
			return fmt.Errorf("starting kube-controller-manager: %w", err)
		}
		controllerManager.Store(kcm.Process)
		defer func() { _ = kcm.Process.Kill(); _ = kcm.Wait() }()
	}
	if *node {
		if err := startNode(abs, adminKubeconfig, certs.caCert, host, images, client, server); err != nil {
			stopNode()
			return err
		}
	}
	if err := writeKubeconfig(kubeconfig, server, certs); err != nil {
		return err
	}

	fmt.Println(kubeconfig)
	// The API server stops on SIGTERM/SIGINT (its own signal context); then etcd stops.
	err = <-serveErr
	_ = os.Remove(kubeconfig)
	stopNode()
	return err
}

// repeated collects a flag given several times.
type repeated []string

func (r *repeated) String() string     { return strings.Join(*r, " ") }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

// controllerManager is the kube-controller-manager child, once started.
var controllerManager atomic.Pointer[os.Process]

// stopNow ends the control plane at once: the kubeconfig goes first (it is the
// readiness signal), then the controller-manager, then this process.
func stopNow(kubeconfig string) {
	_ = os.Remove(kubeconfig)
	stopNode()
	if p := controllerManager.Load(); p != nil {
		_ = p.Kill()
	}
	if ip := localAddress.Load(); ip != nil {
		removeLocalAddress(*ip)
	}
	os.Exit(0)
}

// exitWhenOrphaned asks for a stop once the parent is gone, so a test run that crashes
// or is killed never leaves a control plane behind. Polling the parent pid needs no
// cooperation from the parent and no unsafe prctl call.
func exitWhenOrphaned(quit chan<- struct{}) {
	parent := os.Getppid()
	for range time.Tick(500 * time.Millisecond) {
		if os.Getppid() != parent {
			quit <- struct{}{}
			return
		}
	}
}

func startEtcd(dir, logPath string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.Name = "llmproxy-test"
	clientURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
	peerURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.Name + "=" + peerURL.String()
	// A test cluster trades durability for speed: nothing here must survive a crash.
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{logPath}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, clientURL.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", fmt.Errorf("etcd not ready after 60s")
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func adminHTTPClient(p *pki) (*http.Client, error) {
	cert, err := tls.LoadX509KeyPair(p.adminCert, p.adminKey)
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(p.caCert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}},
	}, nil
}

// waitReady polls /readyz and then the default namespace, which the API server creates
// from its own bootstrap controller shortly after it reports ready.
func waitReady(c *http.Client, server string, serveErr <-chan error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	for _, path := range []string{"/readyz", "/api/v1/namespaces/default"} {
		for {
			resp, err := c.Get(server + path)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			select {
			case err := <-serveErr:
				return fmt.Errorf("kube-apiserver exited: %v", err)
			case <-ctx.Done():
				return fmt.Errorf("kube-apiserver not ready after 120s (last check %s)", path)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

func writeKubeconfig(path, server string, p *pki) error {
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: llmproxy-test
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: admin
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: llmproxy-test
  context:
    cluster: llmproxy-test
    user: admin
    namespace: default
current-context: llmproxy-test
`, server, p.caCert, p.adminCert, p.adminKey)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
