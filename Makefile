# The README's two commands: `make demo` (set up, then run the main job on the bundled
# default config) and `make test` (set up, then run every test). Both run scripts/setup.sh
# first, so they work on a fresh machine with nothing installed by hand; it is idempotent
# and quick on a machine already set up. Run as root (setup installs packages; the kernel
# tests load BPF programs).

PYTHON := .venv/bin/python
HEKITRACE := .venv/bin/hekitrace
CONFIG := configs/hekitrace.yaml

.PHONY: setup test test-heki-host demo check fuzz soak deb bench

setup:
	bash scripts/setup.sh

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass
test: setup
	@$(PYTHON) -m pytest -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# Only the vm tier's Heki-v2-compatible test host (tests/vm/hekihost.py): builds its
# kernel on first use (6-9 min cold, cached after), boots it once, runs the mutant boot
test-heki-host: setup
	@$(PYTHON) -m pytest -q tests/vm -k heki_host; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test-heki-host: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# The main job on the bundled default: six simulated Heki guests, each under one attack,
# through exactly the daemon's state and rules; prints each VM's map, the findings and the
# /metrics text. replay exits 1 because it found critical findings: that is the point of
# the demo, so only other statuses fail it.
demo: setup
	@$(HEKITRACE) replay --metrics-file - examples/attack.jsonl; status=$$?; \
	if [ $$status -ne 0 ] && [ $$status -ne 1 ]; then exit $$status; fi

check: setup
	$(HEKITRACE) check --config $(CONFIG)

# Long fuzzing (docs/robustness.md): hypothesis targets x100 examples, then each atheris
# target for FUZZ_SECONDS if atheris is installed. Not part of `make test`.
FUZZ_SECONDS ?= 120
FUZZ_DIR ?= /tmp/hekitrace-fuzz
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q tests/fuzz tests/kernel/test_adversarial_guest.py
	@if $(PYTHON) -c 'import atheris' 2>/dev/null; then \
	  for t in records trace config control; do \
	    mkdir -p $(FUZZ_DIR)/$$t && cp -n tests/fuzz/corpus/seed* $(FUZZ_DIR)/$$t/; \
	    $(PYTHON) tests/fuzz/atheris_targets.py $$t -max_total_time=$(FUZZ_SECONDS) \
	      -artifact_prefix=$(FUZZ_DIR)/crash-$$t- $(FUZZ_DIR)/$$t \
	      || { echo "make fuzz: crash input in $(FUZZ_DIR)/crash-$$t-*"; exit 1; }; \
	  done; \
	else echo "make fuzz: atheris not installed (pip install -e '.[fuzz]'): skipped the coverage-guided targets"; fi

# Soak (minutes): many VMs created and destroyed under a real daemon; SOAK_VMS=2000 for longer.
SOAK_VMS ?= 300
soak: setup
	HEKITRACE_SOAK=1 HEKITRACE_SOAK_VMS=$(SOAK_VMS) $(PYTHON) -m pytest -q -s tests/soak

# The Debian package (docs/install.md): installs its own build dependencies with apt-get
# (debhelper, dh-python, lintian...; not setup's, so `make test` stays lean), builds with
# dpkg-buildpackage in build/deb/, fails on any lintian error, and writes
# dist/hekitrace_VERSION_all.deb (with the source package beside it).
deb:
	bash packaging/build-deb.sh

# Every benchmark once (at most 20 minutes; BENCHMARKS.md): each target against a baseline
# measured in the same run, written to bench/results.json, then BENCHMARKS.md from it.
# Root (bcc, BPF_PROG_TEST_RUN).
bench: setup
	$(PYTHON) bench/run_all.py --output bench/results.json
	$(PYTHON) bench/report.py --results bench/results.json --output BENCHMARKS.md
