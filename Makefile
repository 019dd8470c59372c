# execguard: the README's two commands are `make run` and `make test` (as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXECGUARD := $(VENV)/bin/execguard
RESULTS ?= test-results

.PHONY: help setup setup-test run demo doctor test host-test lint unit bench bench-review clean
.PHONY: vagrant-validate
.PHONY: install uninstall deb rpm cli-docs

help:
	@echo "make run     install what is missing, then run the agent in the foreground (default policy)"
	@echo "make demo    a verification demo: keygen, sign, verify, tamper"
	@echo "make test    install what is missing (incl. test tools), lint, run the whole suite"
	@echo "             (host tests, then the lockdown suite in a qemu VM: make vm-test)"
	@echo "make bench   run the benchmarks in bench/ (figures go in docs/performance.md)"
	@echo "make lint    ruff + mypy"
	@echo "make clean   remove the venv and caches"
	@echo "make install the agent in \$$(PREFIX) (/opt/execguard) + execguard.service (docs/service.md);"
	@echo "             DESTDIR, PREFIX, UNITDIR, SYSCONFDIR respected; make uninstall"
	@echo "make deb     a Debian package of the same install in dist/ (docs/packaging.md)"
	@echo "make rpm     an RPM of it (rpmbuild), for building on the RPM release you deploy to"

setup:
	@./scripts/setup.sh

setup-test:
	@WITH_TEST=1 ./scripts/setup.sh

# The agent in the foreground on the embedded default policy (monitor mode: never blocks).
run: setup
	$(EXECGUARD) run $(RUN_ARGS)

demo: setup
	@./scripts/demo.sh $(EXECGUARD)

doctor: setup
	@$(EXECGUARD) doctor

lint: setup-test
	$(VENV)/bin/ruff check agent tests bench scripts
	$(VENV)/bin/mypy

# The whole suite: lint, the host tests, then the lockdown suite in the test VM (vm.mk).
test: host-test vm-test

# pytest exits 5 when no test ran; make treats that as the failure it is.
host-test: setup-test lint
	@mkdir -p $(RESULTS)
	$(VENV)/bin/pytest --junitxml=$(RESULTS)/junit.xml $(PYTEST_ARGS)

bench: setup-test
	$(PY) bench/hash_throughput.py
	$(PY) bench/verify_cost.py
	$(PY) bench/bundle_verify.py
	$(PY) bench/exec_overhead.py
	$(PY) bench/exec_storm.py

# review at fleet size: 10 million synthetic records from 1,000 hosts (about 12 GiB on disk
# for a few minutes, in /var/tmp); docs/performance.md "Review at fleet size"
bench-review: setup-test
	$(PY) bench/review_scale.py $(BENCH_ARGS)

# The service (docs/service.md): a venv with the agent, the unit, /etc/default/execguard.
PREFIX ?= /opt/execguard
UNITDIR ?= /etc/systemd/system
SYSCONFDIR ?= /etc
DATADIR ?= /usr/local/share
INSTALL_ENV = DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" UNITDIR="$(UNITDIR)" SYSCONFDIR="$(SYSCONFDIR)" \
	DATADIR="$(DATADIR)"

install: setup
	@$(INSTALL_ENV) ./scripts/install.sh install

uninstall:
	@$(INSTALL_ENV) ./scripts/install.sh uninstall

# the man page and bash completion from the argparse parsers (kept in packaging/)
cli-docs: setup-test
	$(PY) scripts/cli_docs.py

deb: setup
	@./scripts/build-deb.sh

rpm: setup
	@./scripts/build-rpm.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(RESULTS) *.egg-info dist

vagrant-validate: setup-test
	./scripts/vagrant-validate.sh

include vm.mk
