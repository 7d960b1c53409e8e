// Command helm_render renders a Helm chart the way `helm template` does, for the tests: no helm binary
// and no Kubernetes cluster exist where they run.
//
// It covers what the mbs-csi chart uses: Go text/template with the sprig functions (minus env and
// expandenv, which helm removes too), helm's include, required, fail, toYaml and fromYaml (sprig's toJson is helm's);
// .Values (the chart's values.yaml deep-merged with -f files, then --set overrides; a null deletes a
// default, as in helm), .Release, .Chart (from Chart.yaml), .Template and .Capabilities.
//
// .Capabilities follows `helm template`: --kube-version sets .Capabilities.KubeVersion (default
// defaultKubeVersion, helm's default being the Kubernetes minor of the client-go it was built with), and
// the chart's kubeVersion constraint (Chart.yaml) is checked against it before anything renders, as helm
// does. .Capabilities.APIVersions holds the built-in API group versions (as helm's default set: no CRDs)
// plus every --api-versions value; its Has method answers for "group/version" (and for
// "group/version/Kind" only when given so: the built-in Kinds are not listed).
//
// lookup answers as in `helm template` (an empty map: there is no cluster) unless -lookup names a YAML file
// holding a list of objects: it then answers as `helm install` would against a cluster holding those
// (one object by name, an empty map when it is missing; a "<Kind>List" with the matching items when the
// name is empty). YAML is read through a JSON
// round trip like helm does, so numbers from values files are float64 there too.
//
// Usage:
//
//	helm_render -chart DIR [-f values.yaml]... [--set a.b=value]... [-name RELEASE] [-namespace NS] [-strict]
//	            [--kube-version 1.30.0] [--api-versions group/version]... [-lookup objects.yaml]
//
// It prints every rendered template (files under templates/ whose name does not start with "_"; NOTES.txt
// is rendered but not printed) as YAML documents, each after a "# Source:" comment, in file name order.
// Any template error is printed on stderr and the exit code is 1.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	"github.com/ghodss/yaml"
)

// helm refuses deeper include recursion than this.
const maxIncludeDepth = 1000

// The Kubernetes version when --kube-version is not given: helm's default is the minor of the client-go
// it is built with (v1.34 for helm 3.19).
const defaultKubeVersion = "v1.34.0"

// builtinAPIVersions stands for helm's default API version set: the group versions Kubernetes serves
// without any CustomResourceDefinition (no snapshot.storage.k8s.io, for one).
var builtinAPIVersions = []string{
	"v1", "admissionregistration.k8s.io/v1", "apiextensions.k8s.io/v1", "apiregistration.k8s.io/v1",
	"apps/v1", "authentication.k8s.io/v1", "authorization.k8s.io/v1", "autoscaling/v1", "autoscaling/v2",
	"batch/v1", "certificates.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1", "events.k8s.io/v1",
	"flowcontrol.apiserver.k8s.io/v1", "networking.k8s.io/v1", "node.k8s.io/v1", "policy/v1",
	"rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1", "storage.k8s.io/v1",
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

// String is the version, as helm prints .Capabilities.KubeVersion.
func (k KubeVersion) String() string { return k.Version }

// APIVersions is .Capabilities.APIVersions.
type APIVersions []string

// Has tells whether an API version ("group/version") or a resource ("group/version/Kind") is available.
func (a APIVersions) Has(version string) bool {
	for _, known := range a {
		if known == version {
			return true
		}
	}
	return false
}

// parseKubeVersion reads a --kube-version value the way helm does ("1.30", "v1.30.0", "1.30.0-gke.1").
func parseKubeVersion(text string) (KubeVersion, error) {
	version, err := semver.NewVersion(text)
	if err != nil {
		return KubeVersion{}, fmt.Errorf("invalid kube version %q: %s", text, err)
	}
	return KubeVersion{
		Version:    "v" + version.String(),
		Major:      strconv.FormatUint(version.Major(), 10),
		Minor:      strconv.FormatUint(version.Minor(), 10),
		GitVersion: "v" + version.String(),
	}, nil
}

// checkKubeVersion refuses a Kubernetes version outside the chart's kubeVersion constraint, with helm's
// message.
func checkKubeVersion(chart map[string]interface{}, kube KubeVersion) error {
	constraint, _ := chart["kubeVersion"].(string)
	if constraint == "" {
		return nil
	}
	c, err := semver.NewConstraint(constraint)
	if err != nil {
		return fmt.Errorf("Chart.yaml: invalid kubeVersion %q: %s", constraint, err)
	}
	version, err := semver.NewVersion(kube.Version)
	if err != nil {
		return err
	}
	if !c.Check(version) {
		return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s", constraint, kube.Version)
	}
	return nil
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}

func run() error {
	var valueFiles, sets, apiVersions listFlag
	chartDir := flag.String("chart", "", "chart directory (holding Chart.yaml)")
	release := flag.String("name", "release-name", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	strict := flag.Bool("strict", false, "fail on a reference to a missing value (missingkey=error)")
	flag.Var(&valueFiles, "f", "values file, merged over the chart's values.yaml (repeatable)")
	flag.Var(&sets, "set", "key.path=value override, applied last (repeatable)")
	kubeVersionText := flag.String("kube-version", defaultKubeVersion, "Kubernetes version for .Capabilities.KubeVersion")
	flag.Var(&apiVersions, "api-versions", "API version for .Capabilities.APIVersions (repeatable)")
	lookupFile := flag.String("lookup", "", "YAML list of the objects lookup finds (default: none, as in helm template)")
	flag.Parse()
	if *chartDir == "" || flag.NArg() != 0 {
		flag.Usage()
		return errors.New("-chart DIR is required and no positional arguments are accepted")
	}

	chart, err := readYAMLFile(filepath.Join(*chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	chartName, _ := chart["name"].(string)
	if chartName == "" {
		return errors.New("Chart.yaml has no name")
	}
	kube, err := parseKubeVersion(*kubeVersionText)
	if err != nil {
		return err
	}
	if err := checkKubeVersion(chart, kube); err != nil {
		return err
	}
	values, err := readYAMLFile(filepath.Join(*chartDir, "values.yaml"))
	if err != nil {
		return err
	}
	overrides := map[string]interface{}{}
	for _, file := range valueFiles {
		more, err := readYAMLFile(file)
		if err != nil {
			return err
		}
		overrides = mergeValues(overrides, more, false)
	}
	for _, set := range sets {
		if err := applySet(overrides, set); err != nil {
			return err
		}
	}
	values = mergeValues(values, overrides, true)

	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name":      *release,
			"Namespace": *namespace,
			"Service":   "Helm",
			"IsInstall": true,
			"IsUpgrade": false,
			"Revision":  1,
		},
		"Chart": chartMetadata(chart),
		"Capabilities": map[string]interface{}{
			"KubeVersion": kube,
			"APIVersions": append(APIVersions(append([]string{}, builtinAPIVersions...)), apiVersions...),
			"HelmVersion": map[string]interface{}{"Version": "v3.19.0"},
		},
	}
	var cluster []map[string]interface{}
	if *lookupFile != "" {
		data, err := os.ReadFile(*lookupFile)
		if err != nil {
			return err
		}
		if err := yaml.Unmarshal(data, &cluster); err != nil {
			return fmt.Errorf("%s: %v", *lookupFile, err)
		}
	}
	return render(*chartDir, chartName, top, *strict, cluster)
}

// lookupIn is helm's lookup against the objects of a cluster (nil: no cluster, as in helm template).
func lookupIn(cluster []map[string]interface{}) func(apiVersion, kind, namespace, name string) map[string]interface{} {
	return func(apiVersion, kind, namespace, name string) map[string]interface{} {
		if cluster == nil {
			return map[string]interface{}{}
		}
		items := []interface{}{}
		for _, obj := range cluster {
			meta, _ := obj["metadata"].(map[string]interface{})
			if obj["apiVersion"] != apiVersion || obj["kind"] != kind || (namespace != "" && meta["namespace"] != namespace) {
				continue
			}
			if name == "" {
				items = append(items, obj)
			} else if meta["name"] == name {
				return obj
			}
		}
		if name != "" {
			return map[string]interface{}{}
		}
		return map[string]interface{}{"apiVersion": apiVersion, "kind": kind + "List", "items": items}
	}
}

// readYAMLFile parses a YAML mapping through JSON, as helm does (numbers become float64).
func readYAMLFile(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	if out == nil {
		out = map[string]interface{}{}
	}
	return out, nil
}

// chartMetadata gives Chart.yaml's keys the capitalised names helm's .Chart has (appVersion -> AppVersion).
func chartMetadata(chart map[string]interface{}) map[string]interface{} {
	meta := map[string]interface{}{}
	for key, value := range chart {
		meta[strings.ToUpper(key[:1])+key[1:]] = value
	}
	meta["APIVersion"] = chart["apiVersion"]
	delete(meta, "ApiVersion")
	return meta
}

// mergeValues copies src over dst: maps merge key by key, anything else replaces. With deleteNulls, a
// null in src removes the key (helm's way to unset a default); otherwise nulls are kept for a later merge.
func mergeValues(dst, src map[string]interface{}, deleteNulls bool) map[string]interface{} {
	out := map[string]interface{}{}
	for key, value := range dst {
		out[key] = value
	}
	for key, value := range src {
		if value == nil && deleteNulls {
			delete(out, key)
			continue
		}
		srcMap, srcIsMap := value.(map[string]interface{})
		dstMap, dstIsMap := out[key].(map[string]interface{})
		if srcIsMap && dstIsMap {
			out[key] = mergeValues(dstMap, srcMap, deleteNulls)
		} else {
			out[key] = value
		}
	}
	return out
}

var integerRE = regexp.MustCompile(`^[-+]?[0-9]+$`)

// applySet handles one --set key.path=value the way helm types simple values: integers become int64,
// true/false booleans, null a null; anything else stays a string. Lists and escapes are not supported.
func applySet(into map[string]interface{}, set string) error {
	keyPath, raw, found := strings.Cut(set, "=")
	if !found || keyPath == "" {
		return fmt.Errorf("--set %q: expected key.path=value", set)
	}
	var value interface{} = raw
	switch {
	case raw == "true" || raw == "false":
		value = raw == "true"
	case raw == "null":
		value = nil
	case integerRE.MatchString(raw):
		n, err := strconv.ParseInt(raw, 10, 64)
		if err != nil {
			return fmt.Errorf("--set %q: %v", set, err)
		}
		value = n
	}
	keys := strings.Split(keyPath, ".")
	node := into
	for _, key := range keys[:len(keys)-1] {
		next, ok := node[key].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			node[key] = next
		}
		node = next
	}
	node[keys[len(keys)-1]] = value
	return nil
}

// helmFuncs is sprig's function map adjusted as helm adjusts it, plus helm's own functions.
func helmFuncs(templates **template.Template, cluster []map[string]interface{}) template.FuncMap {
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	depth := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if depth[name] >= maxIncludeDepth {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		depth[name]++
		defer func() { depth[name]-- }()
		var buf bytes.Buffer
		err := (*templates).ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["required"] = func(message string, value interface{}) (interface{}, error) {
		if value == nil {
			return nil, errors.New(message)
		}
		if text, ok := value.(string); ok && text == "" {
			return nil, errors.New(message)
		}
		return value, nil
	}
	funcs["lookup"] = lookupIn(cluster)
	funcs["fail"] = func(message string) (string, error) {
		return "", errors.New(message)
	}
	funcs["toYaml"] = func(value interface{}) string {
		data, err := yaml.Marshal(value)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	funcs["fromYaml"] = func(text string) map[string]interface{} {
		out := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(text), &out); err != nil {
			out["Error"] = err.Error()
		}
		return out
	}
	return funcs
}

func render(chartDir, chartName string, top map[string]interface{}, strict bool, cluster []map[string]interface{}) error {
	root := filepath.Join(chartDir, "templates")
	var names []string
	sources := map[string]string{}
	err := filepath.WalkDir(root, func(file string, entry fs.DirEntry, err error) error {
		if err != nil || entry.IsDir() {
			return err
		}
		rel, err := filepath.Rel(chartDir, file)
		if err != nil {
			return err
		}
		data, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		name := path.Join(chartName, filepath.ToSlash(rel))
		names = append(names, name)
		sources[name] = string(data)
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(names)

	var templates *template.Template
	templates = template.New(chartName).Funcs(helmFuncs(&templates, cluster))
	if strict {
		templates.Option("missingkey=error")
	} else {
		templates.Option("missingkey=zero")
	}
	for _, name := range names {
		if _, err := templates.New(name).Parse(sources[name]); err != nil {
			return err
		}
	}

	var out bytes.Buffer
	for _, name := range names {
		base := path.Base(name)
		if strings.HasPrefix(base, "_") {
			continue
		}
		data := map[string]interface{}{}
		for key, value := range top {
			data[key] = value
		}
		data["Template"] = map[string]interface{}{"Name": name, "BasePath": path.Join(chartName, "templates")}
		var buf bytes.Buffer
		if err := templates.ExecuteTemplate(&buf, name, data); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" || strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.TrimRight(text, "\n"))
	}
	_, err = os.Stdout.Write(out.Bytes())
	return err
}
