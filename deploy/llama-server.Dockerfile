# llama.cpp's llama-server for the "remote" profile of deploy/compose.yaml (README, "Inference
# on servers"). Built as scripts/build-llama-server.sh builds it outside Docker: from the
# llama.cpp source that the llama-cpp-python sdist vendors (the package the bot's image
# compiles, deploy/Dockerfile), with the portable CPU flags of scripts/bootstrap.sh. So the
# server computes with the same llama.cpp as the in-process backend.
#
# Build (compose does it: `docker compose -f deploy/compose.yaml --profile remote build`):
#   docker build -f deploy/llama-server.Dockerfile -t loopbot-llama-server deploy
# Run (the flags compose.yaml uses; it listens on 0.0.0.0:8080 unless told otherwise):
#   docker run -d -v loopbot-data:/data:ro -p 127.0.0.1:8080:8080 loopbot-llama-server \
#     -m /data/models/qwen1_5-0_5b-chat-q8_0.gguf --parallel 4 -c 8192 -ctk q8_0 -ctv q8_0 -fa on
# Both images take the newest llama-cpp-python that the requirement allows when they are
# built. To build the server from exactly the bot's version, ask the bot's image for it
#   docker compose -f deploy/compose.yaml run --rm --entrypoint python loopbot \
#     -c 'import llama_cpp; print(llama_cpp.__version__)'
# and pass it: --build-arg LLAMA_CPP_PYTHON="llama-cpp-python==<that version>"
# The version it was built from is in /usr/local/share/llama-server/llama-cpp-python-version.
# A build for a machine without AVX2 (or to tune for one CPU):
#   --build-arg CMAKE_ARGS="-DGGML_NATIVE=OFF"

ARG PYTHON_VERSION=3.11

# ---- build: llama-server from the vendored llama.cpp (a few minutes on 2 cores) ------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The requirement of pyproject.toml and deploy/Dockerfile: keep the three in step.
ARG LLAMA_CPP_PYTHON="llama-cpp-python>=0.3.16,<0.4"
# Empty = the portable flags of scripts/portable-flags.sh (repeated below: this build
# context is deploy/ alone): x86-64-v3 (AVX2/FMA/F16C) with AVX-512
# and AMX off (a native build crashes on another CPU, and ggml's AMX matmul segfaults with
# Q8_0 models on CPUs that report AMX).
ARG CMAKE_ARGS=""
ARG TARGETARCH
WORKDIR /src
RUN set -eu; \
    pip download --quiet --no-deps --no-binary :all: "$LLAMA_CPP_PYTHON" -d /src/sdist; \
    tar -xzf /src/sdist/llama_cpp_python-*.tar.gz -C /src; \
    tree=$(echo /src/llama_cpp_python-*); \
    echo "${tree#/src/llama_cpp_python-}" > /src/llama-cpp-python-version; \
    if [ -z "$CMAKE_ARGS" ]; then \
      case "${TARGETARCH:-$(uname -m)}" in \
        amd64|x86_64) CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DGGML_AMX_BF16=OFF" ;; \
        *) CMAKE_ARGS="-DGGML_NATIVE=OFF" ;; \
      esac; \
    fi; \
    echo "llama-cpp-python $(cat /src/llama-cpp-python-version); CMAKE_ARGS=$CMAKE_ARGS"; \
    cmake -S "$tree/vendor/llama.cpp" -B /src/build -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $CMAKE_ARGS; \
    cmake --build /src/build --target llama-server -j "$(nproc)"

# ---- runtime: the binary alone, as a non-root user ------------------------------------------
FROM debian:bookworm-slim AS runtime
# libgomp1: ggml's OpenMP threads. curl: the HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libstdc++6 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin llama
COPY --from=build /src/build/bin/llama-server /usr/local/bin/llama-server
COPY --from=build /src/llama-cpp-python-version /usr/local/share/llama-server/
# The same uid as the bot's user, so it reads the model the bot fetched onto the shared volume.
USER llama
# Defaults for flags not given (the command line wins): listen on every interface of the
# container; publish the port on the host's loopback only, if at all.
ENV HOME=/tmp \
    LLAMA_ARG_HOST=0.0.0.0 \
    LLAMA_ARG_PORT=8080
EXPOSE 8080
# /health: 503 while the model loads, 200 once it serves.
HEALTHCHECK --interval=10s --timeout=5s --start-period=2m --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/health"]
ENTRYPOINT ["llama-server"]
