# pcl-hpc for CUDA clusters: the pins of constraints.txt (torch 2.13.0 from PyPI is the CUDA build
# on Linux x86_64), installed in a venv, run as a non-root user.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/pcl-hpc
COPY pyproject.toml constraints.txt README.md ./
COPY pcl_hpc ./pcl_hpc
COPY launchers ./launchers
COPY configs ./configs
RUN pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt .

RUN useradd --create-home --uid 1001 pcl
USER pcl
WORKDIR /home/pcl
ENV TORCH_EXTENSIONS_DIR=/home/pcl/.cache/torch_extensions
ENTRYPOINT ["pcl-hpc"]
CMD ["--help"]
