// Command pause is the node's sandbox ("pause") container: it holds a pod's namespaces
// open, reaps any child that ends up under it, and exits on SIGTERM or SIGINT. No
// registry is reachable here, so the node cannot pull registry.k8s.io/pause; this is
// the same behaviour, built statically and packed into an image by llmproxy-node.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
