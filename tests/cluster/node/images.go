package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// The images the node needs itself, packed from local static binaries.
const (
	pauseImage   = "localhost/llmproxy/pause:1"
	corednsImage = "localhost/llmproxy/coredns:v1.12.4"
	// BusyboxImage runs workloads in tests and the node demo: Debian's busybox-static,
	// with sh, wget and friends.
	busyboxImage = "localhost/llmproxy/busybox:1.35"
)

// image is a one-layer image: files copied from the host, symlinks, an entrypoint.
type image struct {
	ref        string
	files      map[string]string // path in the image -> path on the host
	symlinks   map[string]string // path in the image -> target
	entrypoint []string
	cmd        []string
}

// systemImages writes the node's own images as docker archives and returns their paths.
func systemImages() ([]string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	bin := filepath.Dir(self)
	busybox := map[string]string{}
	for _, tool := range []string{"sh", "wget", "cat", "echo", "env", "grep", "sed", "sleep", "head", "tail",
		"tr", "seq", "date", "test", "[", "true", "false", "printf", "nslookup", "ls", "wc", "cut", "timeout"} {
		busybox["bin/"+tool] = "busybox"
	}
	images := []image{
		{ref: pauseImage, files: map[string]string{"pause": filepath.Join(bin, "llmproxy-pause")},
			entrypoint: []string{"/pause"}},
		{ref: corednsImage, files: map[string]string{"coredns": filepath.Join(bin, "coredns")},
			entrypoint: []string{"/coredns"}},
		{ref: busyboxImage, files: map[string]string{"bin/busybox": "/bin/busybox"}, symlinks: busybox,
			cmd: []string{"sh"}},
	}
	dir := filepath.Join(stateDir, "images")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var archives []string
	for i, img := range images {
		path := filepath.Join(dir, fmt.Sprintf("%d.tar", i))
		if err := img.write(path); err != nil {
			return nil, fmt.Errorf("packing %s: %w", img.ref, err)
		}
		archives = append(archives, path)
	}
	return archives, nil
}

// write saves the image as a docker archive (what `docker save` writes), which
// `ctr images import` reads with its name. The layer goes through a file, not memory:
// CoreDNS alone is 75 MB, and this process lives as long as the node.
func (img image) write(path string) error {
	layerFile, err := os.CreateTemp(filepath.Dir(path), "layer-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(layerFile.Name())
	defer layerFile.Close()
	hash := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(layerFile, hash))
	dirs := map[string]bool{}
	addDirs := func(name string) error {
		for d := filepath.Dir(name); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755}); err != nil {
				return err
			}
		}
		return nil
	}
	for name, source := range img.files {
		if err := addDirs(name); err != nil {
			return err
		}
		if err := copyFile(tw, name, source); err != nil {
			return err
		}
	}
	for name, target := range img.symlinks {
		if err := addDirs(name); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	layerDigest := hex.EncodeToString(hash.Sum(nil))
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config": map[string]any{
			"Entrypoint": img.entrypoint,
			"Cmd":        img.cmd,
			"Env":        []string{"PATH=/bin"},
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + layerDigest}},
	})
	if err != nil {
		return err
	}
	configDigest := sha256.Sum256(config)
	configName := hex.EncodeToString(configDigest[:]) + ".json"
	layerName := layerDigest + "/layer.tar"
	manifest, err := json.Marshal([]map[string]any{{"Config": configName, "RepoTags": []string{img.ref}, "Layers": []string{layerName}}})
	if err != nil {
		return err
	}

	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer out.Close()
	archive := tar.NewWriter(out)
	if err := copyFile(archive, layerName, layerFile.Name()); err != nil {
		return err
	}
	for _, entry := range []struct {
		name string
		data []byte
	}{{configName, config}, {"manifest.json", manifest}} {
		if err := archive.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: entry.name, Mode: 0o644, Size: int64(len(entry.data))}); err != nil {
			return err
		}
		if _, err := archive.Write(entry.data); err != nil {
			return err
		}
	}
	return archive.Close()
}

// copyFile adds the file at source to the archive as name, executable.
func copyFile(archive *tar.Writer, name, source string) error {
	f, err := os.Open(source)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	if err := archive.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: info.Size()}); err != nil {
		return err
	}
	_, err = io.Copy(archive, f)
	return err
}
