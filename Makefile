# xero-operator — the two commands a newcomer needs are `make test` and `make run`.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
CONTROLPLANE_BUILD := proving-ground/controlplane/build.sh
CRD_FILE := crds/xeroconnection.yaml
CHART_CRD_FILE := charts/xero-operator/files/xeroconnection.yaml

.PHONY: bench soak test test-oldest test-oldest-run check model model-deep dist manifest manifest-drift values-doc values-doc-drift e2e e2e-run image node-images node-deps prerequisites fmt-check clippy crd-drift crds controlplane-bin controlplane run

## test: everything CI checks — format, lints, CRD drift, unit and integration tests against a
## real kube-apiserver + etcd built from Go modules (built once, then cached in ~/.cache; the
## test binaries run side by side, JOBS at a time: proving-ground/integration.sh, and the model
## check beside them) on the newest supported Kubernetes release, the suites that prove the range
## (OLDEST_SUITES) on the oldest, then the end-to-end tests on a real node (`make e2e`).
test: prerequisites fmt-check clippy crd-drift values-doc-drift
	$(CARGO) build --locked --all-targets
	bash scripts/helm.sh >/dev/null
	bash scripts/promtool.sh >/dev/null
	$(MAKE) --no-print-directory manifest-drift
	$(CARGO) build --locked -q -p xero-proving-ground --bin xero-model
	bin_dir="$$(bash $(CONTROLPLANE_BUILD))"; \
	target/debug/xero-model > target/model.log 2>&1 & model=$$!; \
	status=0; \
	target/debug/xero-controlplane --bin-dir "$$bin_dir" -- bash proving-ground/integration.sh \
	  || status=$$?; \
	wait $$model || status=$$?; \
	echo "==== the model check (make model), run beside the test binaries"; cat target/model.log; \
	exit $$status
	$(MAKE) --no-print-directory test-oldest-run
	$(MAKE) --no-print-directory dist
	$(MAKE) --no-print-directory e2e-run

## test-oldest: the CRD, chart, trust, protocol and controller suites on the oldest supported
## Kubernetes release (README "Kubernetes versions"), built like the newest.
OLDEST_SUITES ?= controller protocol controller_ops consumer_trust xero_token trust kubectl_xero helm gitops crd
test-oldest: prerequisites
	$(CARGO) build --locked --all-targets
	bash scripts/helm.sh >/dev/null
	$(MAKE) --no-print-directory test-oldest-run

test-oldest-run:
	@[ -n "$(strip $(OLDEST_SUITES))" ] || { echo "OLDEST_SUITES is empty" >&2; exit 1; }
	bin_dir="$$(bash $(CONTROLPLANE_BUILD) oldest)"; \
	echo "==== the suites that prove the range, on $$(basename "$$bin_dir" | cut -d- -f1)"; \
	target/debug/xero-controlplane --bin-dir "$$bin_dir" -- \
	  env ONLY="$(OLDEST_SUITES)" LOGS=target/integration-oldest bash proving-ground/integration.sh

## check: the fast loop while editing — format, lints, CRD drift, the unit tests and the model
## check; no Go, no root, no control plane. `make test` runs everything.
check: fmt-check clippy crd-drift values-doc-drift
	$(CARGO) test --locked --lib
	$(CARGO) test --locked --test protocol_map -p xero-operator
	$(CARGO) test --locked --test model -p xero-proving-ground

## model: the refresh protocol model-checked with the product's own rules (docs/protocol.md,
## section 11); prints the states explored, the depth and the time. model-deep: a second
## consumer and a second fault (a release build; about 5 minutes and 10 GB of memory).
model:
	$(CARGO) run --locked -q -p xero-proving-ground --bin xero-model

model-deep:
	$(CARGO) run --locked -q --release -p xero-proving-ground --bin xero-model -- --deep

## image: the operator's OCI image, built without Docker (static binaries, non-root, reproducible):
## target/image/xero-operator-<version>.oci.tar. IMAGE_TAG=… for another tag.
image: node-deps
	bash scripts/image.sh $(IMAGE_TAG)

## node-deps: what the real node needs from Debian's packages (containerd, runc, CNI plugins, …).
node-deps:
	bash scripts/node-deps.sh

## node-images: the test node's sandbox (pause) and busybox images.
node-images: node-deps
	bash proving-ground/node/images.sh >/dev/null

## e2e: the end-to-end tests alone: the image installed by Helm on a real node (kubelet,
## containerd, kube-proxy in a network namespace of the run's own), pods mounting the Secret.
## Needs root. E2E_SECRET_SYNC sets the kubelet's Secret re-read period (its default: 1m).
E2E_SECRET_SYNC ?= 10s
e2e: prerequisites
	$(CARGO) build --locked --all-targets
	bash scripts/helm.sh >/dev/null
	$(MAKE) --no-print-directory e2e-run

# The host's state before and after must be the same: the node tears down completely; and a
# launcher killed with SIGKILL is cleaned up after by the next start.
e2e-run: node-deps image node-images
	bin_dir="$$(bash $(CONTROLPLANE_BUILD))"; \
	version="$$(awk -F'"' '/^version = / {print $$2; exit}' Cargo.toml)"; \
	bash proving-ground/node/host-state.sh > target/node-images/host-before.txt; \
	status=0; \
	target/debug/xero-controlplane --bin-dir "$$bin_dir" --node --secret-sync $(E2E_SECRET_SYNC) \
	  --node-image target/node-images/pause.oci.tar --node-image target/node-images/busybox.oci.tar \
	  --node-image "target/image/xero-operator-$$version.oci.tar" \
	  -- $(CARGO) test --locked --test e2e -- --ignored --test-threads=1 --nocapture $(E2E_ARGS) \
	  || status=$$?; \
	bash proving-ground/node/host-state.sh > target/node-images/host-after.txt; \
	diff -u target/node-images/host-before.txt target/node-images/host-after.txt \
	  || { echo "the test node left the above on the host" >&2; exit 1; }; \
	[ "$$status" = 0 ] || exit $$status; \
	bash proving-ground/node/killed-launcher.sh "$$bin_dir"

prerequisites:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
	@command -v go >/dev/null || { echo "go not found: the test control plane is built from Go modules; install Go >= 1.26" >&2; exit 1; }
	@v="$$(GOTOOLCHAIN=local go env GOVERSION)"; printf '%s\n' go1.26 "$$v" | sort -V -C || \
	  { echo "$$v is too old: Kubernetes 1.37 and Helm 3.22 build with Go >= 1.26" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || { echo "rustfmt missing: rustup component add rustfmt" >&2; exit 1; }
	@$(CARGO) clippy --version >/dev/null 2>&1 || { echo "clippy missing: rustup component add clippy" >&2; exit 1; }

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings

## crds: regenerate the committed CRD YAML from the Rust types (and the chart's copy).
crds:
	$(CARGO) run --locked -q --bin crdgen > $(CRD_FILE)
	cp $(CRD_FILE) $(CHART_CRD_FILE)

## dist: the kubectl plugin's release archive and its krew manifest (target/dist/), checked.
dist:
	bash scripts/dist.sh

## values-doc: the chart's values reference (docs/values.md) from its schema and defaults.
values-doc:
	$(CARGO) run --locked -q --bin values-doc > target/values.md && mv target/values.md docs/values.md

values-doc-drift:
	@$(CARGO) run --locked -q --bin values-doc | diff -u docs/values.md - \
	  || { echo "docs/values.md differs from the chart: run 'make values-doc' and commit" >&2; exit 1; }

## manifest: the install without Helm (deploy/xero-operator.yaml), rendered from the chart.
manifest:
	bash scripts/render-manifest.sh > target/xero-operator.yaml && mv target/xero-operator.yaml deploy/xero-operator.yaml

manifest-drift:
	@bash scripts/render-manifest.sh | diff -u deploy/xero-operator.yaml - \
	  || { echo "deploy/xero-operator.yaml differs from the chart: run 'make manifest' and commit" >&2; exit 1; }

crd-drift:
	@$(CARGO) run --locked -q --bin crdgen | diff -u $(CRD_FILE) - \
	  || { echo "$(CRD_FILE) differs from the Rust types: run 'make crds' and commit" >&2; exit 1; }
	@diff -u $(CRD_FILE) $(CHART_CRD_FILE) \
	  || { echo "$(CHART_CRD_FILE) differs from $(CRD_FILE): run 'make crds' and commit" >&2; exit 1; }

controlplane-bin:
	@bash $(CONTROLPLANE_BUILD)

## controlplane: a local control plane for manual use; prints the KUBECONFIG line; Ctrl-C stops it.
## NODE=1 adds a real node (needs root): then run commands in its network namespace with
## `nsenter --net=/proc/<pid>/ns/net` (the launcher prints the line).
controlplane: prerequisites
	$(CARGO) build --locked --bin xero-controlplane
	bin_dir="$$(bash $(CONTROLPLANE_BUILD))"; \
	if [ -n "$(NODE)" ]; then \
	  bash scripts/node-deps.sh && bash scripts/image.sh >/dev/null && bash proving-ground/node/images.sh >/dev/null; \
	  version="$$(awk -F'"' '/^version = / {print $$2; exit}' Cargo.toml)"; \
	  exec target/debug/xero-controlplane --bin-dir "$$bin_dir" --node --secret-sync $(E2E_SECRET_SYNC) \
	    --node-image target/node-images/pause.oci.tar --node-image target/node-images/busybox.oci.tar \
	    --node-image "target/image/xero-operator-$$version.oci.tar"; \
	fi; \
	target/debug/xero-controlplane --bin-dir "$$bin_dir"

## run: the controller on a local control plane with the Xero emulator, an example connection and
## a consumer, narrated. Runs until Ctrl-C; RUN_FOR=60s stops by itself (exit 0).
run: prerequisites
	$(CARGO) build --locked --bin xero-run
	bin_dir="$$(bash $(CONTROLPLANE_BUILD))"; \
	target/debug/xero-run --bin-dir "$$bin_dir"

## bench: against the real API server and the emulator, release build; prints tables and writes
## target/bench/refresh.json (naive vs per-process vs protocol, and protocol ahead of expiry), target/bench/scale.json
## (connections per controller, RSS, idle CPU, a refresh storm) and target/bench/isolation.json (one tenant's storm
## against another app and namespace; memory with hostile specs). SCALE_COUNTS=100,1000,10000 for
## the full scale run (long); SCALE_COUNTS=100000 for the 100,000-connection row (about 45 min with its storm).
SCALE_COUNTS ?= 100,1000
bench: prerequisites
	$(CARGO) build --locked --release --bin xero-bench --bin xero-operator
	bin_dir="$$(bash $(CONTROLPLANE_BUILD))"; \
	target/release/xero-bench refresh --bin-dir "$$bin_dir" $(BENCH_ARGS) && \
	target/release/xero-bench scale --bin-dir "$$bin_dir" --counts $(SCALE_COUNTS) $(SCALE_ARGS) && \
	target/release/xero-bench isolation --bin-dir "$$bin_dir" $(ISOLATION_ARGS)

## soak: chaos, bounded in time (SOAK_FOR, default 3m): consumers and two controller replicas
## under Xero faults, SIGKILLs and an API-server restart; writes target/bench/soak.json and
## fails if a chain broke, an expired token was handed out, a refresh token was lost or
## anything panicked.
SOAK_FOR ?= 3m
soak: prerequisites
	$(CARGO) build --locked --release --bin xero-bench --bin xero-operator
	bin_dir="$$(bash $(CONTROLPLANE_BUILD))"; \
	target/release/xero-bench soak --bin-dir "$$bin_dir" --duration $(SOAK_FOR) $(SOAK_ARGS)
