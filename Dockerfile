# UNTESTED documentation (docs/pipelines.md, "On a cluster"): the project's machines have no
# Docker, so this file has never been built. It shows the shape of an image for the
# KubernetesPodOperator variant of pipelines/airflow/simile_dag.py.
#
#   docker build -t registry.example.com/simile:latest .
#
# Stage 1 builds the six release binaries against the PyPI torch wheel (as scripts/env.sh does);
# stage 2 keeps the binaries and torch's shared libraries, at the same path, since the
# binaries carry an rpath to them.
FROM rust:1.89-bookworm AS build
# libgloo-dev: the gloo headers build.rs compiles cpp/ against (build stage only).
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        libgloo-dev \
    && rm -rf /var/lib/apt/lists/*
ENV SIMILE_CACHE=/opt/simile-cache
WORKDIR /src
COPY . .
RUN . scripts/env.sh && cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 fonts-aenigma \
        ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# torch's libraries at the path the binaries' rpath names.
COPY --from=build /opt/simile-cache/torch-2.13.0 /opt/simile-cache/torch-2.13.0
COPY --from=build /src/target/release/simile-prepare /src/target/release/simile-train \
     /src/target/release/simile-embed /src/target/release/simile-distance \
     /src/target/release/simile-rerank /src/target/release/simile-score /usr/local/bin/
COPY pipelines /opt/simile/pipelines
ENV SIMILE_CACHE=/work/.simile-cache
WORKDIR /work
CMD ["simile-prepare", "--help"]
