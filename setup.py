"""Conveyor: an LLM inference engine and OpenAI-compatible API server."""
from setuptools import find_packages, setup

setup(
    name="conveyor",
    version="0.1.0",
    description="LLM inference engine with continuous batching, paged KV cache and an OpenAI-compatible server",
    packages=find_packages(include=["conveyor", "conveyor.*", "engine", "engine.*", "server", "server.*",
                                    "benchmarks", "benchmarks.*"]),
    package_data={"server": ["static/*"], "engine": ["kernels/csrc/*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned so that pip takes the CPU wheel on machines without a GPU;
        # the install script in the README installs it first.
        "torch>=2.4",
        "transformers>=4.48",
        "tokenizers",
        "safetensors",
        "gguf>=0.10",
        "accelerate",
        "numpy",
        "tqdm",
        "starlette",
        "uvicorn",
        "prometheus-client",
        "pyyaml",
        "redis",
        "regex",
        "ninja",  # builds the C++ CPU attention kernel on first use (engine/kernels/cpu_extension.py)
        "swagger-ui-py>=25.7",  # Swagger UI's assets for /docs, served locally
        "xgrammar>=0.2.9,<0.3",  # structured outputs: grammar automata and token masks (engine/structured_output/)
        "jsonschema",  # structured outputs: JSON schemas checked before they are compiled
    ],
    extras_require={
        # GPU kernels; install.sh adds it on machines with an NVIDIA GPU.
        "triton": ["triton"],
        # triton here runs the GPU kernels' tests through Triton's interpreter on CPU.
        "test": ["pytest", "pytest-timeout",
                 "pytest-xdist",  # the README's test command runs the files on two workers (-n 2)
                 "openai", "httpx", "triton", "matplotlib",
                 "openapi-spec-validator", "psutil",
                 "schemathesis==4.32.5",  # tests/test_fuzz_openapi.py (pinned: its API changes)
                 "hypothesis",  # imported by tests/test_fuzz_openapi.py (schemathesis pins its range)
                 "selenium==4.51.0",  # drives Debian's chromium in tests/test_pages_browser.py
                 "jsonschema",  # tests/test_openapi_doc.py checks requests against the document
                 "kubernetes-validate==1.37.0",  # tests/test_deploy_manifests.py (pinned: bundles the k8s schemas)
                 "opentelemetry-api>=1.27", "opentelemetry-sdk>=1.27",  # tests/test_tracing.py
                 "nvidia-ml-py",  # server/gpu_metrics.py's NVML path is imported (no GPU needed)
                 "peft>=0.17"],  # tests/test_lora.py: the reference for LoRA adapters
        "bench": ["matplotlib", "httpx", "psutil"],
        # OpenTelemetry tracing (--otlp-traces-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT)
        "otel": ["opentelemetry-api>=1.27", "opentelemetry-sdk>=1.27", "opentelemetry-exporter-otlp-proto-http>=1.27"],
        # GPU utilization and memory in /metrics through NVML
        "nvml": ["nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["conveyor=conveyor.cli:entry"]},
)
