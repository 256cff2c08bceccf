package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// teardown removes everything a node leaves on the host, whether it stopped cleanly or
// was killed: its processes, mounts, bridge, netfilter rules, cgroups, folders and
// sysctls. Safe to run when nothing is there.
func teardown() error {
	var problems []string
	note := func(err error) {
		if err != nil {
			problems = append(problems, err.Error())
		}
	}
	// Pods first (containerd may be gone already), then the node's daemons: containerd,
	// its shims, and kubelet, kube-proxy and scheduler re-executed from this binary.
	killWhere(func(pid int, cmdline string) bool { return inKubepods(pid) })
	self, _ := os.Executable()
	killWhere(func(pid int, cmdline string) bool {
		return strings.Contains(cmdline, runDir) || strings.Contains(cmdline, stateDir+"/config") ||
			(self != "" && strings.HasPrefix(cmdline, self+"\x00") && pid != os.Getpid() && !isUp(cmdline))
	})
	note(unmountUnder(stateDir, runDir, "/run/netns/cni-"))
	for _, pattern := range []string{"/run/netns/cni-*", "/var/lib/cni/results/llmproxy-*"} {
		matches, _ := filepath.Glob(pattern)
		for _, m := range matches {
			_ = os.Remove(m)
		}
	}
	note(os.RemoveAll(stateDir))
	note(os.RemoveAll(runDir))
	if err := exec.Command("ip", "link", "show", bridgeName).Run(); err == nil {
		note(run("ip", "link", "delete", bridgeName))
	}
	note(dropChains("iptables"))
	note(dropChains("ip6tables"))
	note(removeCgroups())
	note(restoreSysctls())
	if len(problems) > 0 {
		return fmt.Errorf("teardown: %s", strings.Join(problems, "; "))
	}
	return nil
}

// isUp tells a supervisor (`llmproxy-node up`) from its daemons: a later up's teardown
// must not kill the up that runs it, and never the control plane that started it.
func isUp(cmdline string) bool {
	args := strings.Split(cmdline, "\x00")
	return len(args) > 1 && args[1] == "up"
}

func inKubepods(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	return err == nil && strings.Contains(string(data), "/kubepods")
}

// killWhere SIGKILLs every process that matches and waits (briefly) until they are gone.
func killWhere(match func(pid int, cmdline string) bool) {
	entries, _ := os.ReadDir("/proc")
	var victims []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || len(cmdline) == 0 {
			continue // kernel threads and zombies
		}
		if match(pid, string(cmdline)) {
			victims = append(victims, pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range victims {
		for time.Now().Before(deadline) {
			// Gone, or a zombie waiting for its parent (or PID 1) to reap it.
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if err != nil || len(cmdline) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// unmountUnder detaches every mount whose path starts with one of the prefixes,
// deepest first: overlay roots, secret tmpfs volumes, the kubelet's bind mounts,
// network namespaces.
func unmountUnder(prefixes ...string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var targets []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) < 5 {
			continue
		}
		for _, prefix := range prefixes {
			if strings.HasPrefix(fields[4], prefix) {
				targets = append(targets, fields[4])
				break
			}
		}
	}
	sort.Slice(targets, func(i, j int) bool { return len(targets[i]) > len(targets[j]) })
	var failed []string
	for _, target := range targets {
		if err := syscall.Unmount(target, syscall.MNT_DETACH); err != nil && err != syscall.EINVAL && err != syscall.ENOENT {
			failed = append(failed, fmt.Sprintf("%s: %v", target, err))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("unmounting %s", strings.Join(failed, ", "))
	}
	return nil
}

// dropChains removes kube-proxy's KUBE-* and the CNI plugins' CNI-* chains and every
// rule that jumps to them, leaving every other rule as it was.
func dropChains(tool string) error {
	saved, err := exec.Command(tool + "-save").Output()
	if err != nil {
		return nil // no such tool, or no tables: nothing of ours either
	}
	ours := func(line string) bool {
		return strings.HasPrefix(line, ":KUBE-") || strings.HasPrefix(line, ":CNI-") ||
			strings.HasPrefix(line, "-A KUBE-") || strings.HasPrefix(line, "-A CNI-") ||
			strings.Contains(line, " -j KUBE-") || strings.Contains(line, " -j CNI-") ||
			strings.Contains(line, " -g KUBE-") || strings.Contains(line, " -g CNI-")
	}
	var kept []string
	changed := false
	for _, line := range strings.Split(string(saved), "\n") {
		if ours(line) {
			changed = true
			continue
		}
		kept = append(kept, line)
	}
	if !changed {
		return nil
	}
	restore := exec.Command(tool + "-restore")
	restore.Stdin = strings.NewReader(strings.Join(kept, "\n"))
	if out, err := restore.CombinedOutput(); err != nil {
		return fmt.Errorf("%s-restore: %v: %s", tool, err, out)
	}
	return nil
}

// removeCgroups removes the kubelet's kubepods hierarchy from every cgroup controller,
// leaves first. Its processes were killed above; a cgroup empties once they are reaped.
func removeCgroups() error {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if unified, err := os.Stat("/sys/fs/cgroup/kubepods"); err == nil && unified.IsDir() {
		roots = append(roots, "/sys/fs/cgroup/kubepods")
	}
	var failed []string
	for _, root := range roots {
		var dirs []string
		_ = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			for attempt := 0; attempt < 50; attempt++ {
				if err = syscall.Rmdir(dirs[i]); err == nil || err == syscall.ENOENT {
					err = nil
					break
				}
				time.Sleep(50 * time.Millisecond) // a killed process not yet reaped
			}
			if err != nil {
				failed = append(failed, fmt.Sprintf("%s: %v", dirs[i], err))
			}
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("removing cgroups %s", strings.Join(failed, ", "))
	}
	return nil
}

func restoreSysctls() error {
	data, err := os.ReadFile(savedSysctls)
	if os.IsNotExist(err) {
		return nil
	} else if err != nil {
		return err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		if err := os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644); err != nil {
			return err
		}
	}
	return os.Remove(savedSysctls)
}

func run(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
