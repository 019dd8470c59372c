# The local lockdown test VM (docs/vm-testing.md). Included from the Makefile, which defines
# VENV, RESULTS and the setup-test target.
.PHONY: vm-setup vm-test

# qemu, Debian's stock kernel + its headers, virtme-ng: fails loudly when any is missing.
vm-setup: setup-test
	@VENV=$(VENV) ./scripts/vm-setup.sh

# Two TCG boots: none -> integrity -> confidentiality at runtime, then lockdown= at boot.
# One JUnit XML per mode in $(RESULTS)/vm/; any failure, error or skip fails the target.
vm-test: vm-setup
	@VENV=$(VENV) RESULTS=$(RESULTS) ./scripts/vm-run.sh

# The bpf-lsm exec overhead inside the VM (bench/lsm_overhead.py): off vs monitor vs enforce.
# Figures in $(RESULTS)/vm-bench/lsm-overhead.json; they go in docs/performance.md.
.PHONY: bench-lsm
bench-lsm: vm-setup
	@VENV=$(VENV) RESULTS=$(RESULTS) ./scripts/vm-bench-lsm.sh
